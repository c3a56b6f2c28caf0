#!/usr/bin/env bash
# The GPU work of one device-tool session, in two calls (each call may run 10 minutes at most).
#
#   source .whl/activate.sh && export GDN_LAB_COMMIT=<sha> && bash benchmarks/gpu_session.sh timings; save_tune_cache
#   source .whl/activate.sh && bash benchmarks/gpu_session.sh collect; save_tune_cache
#
# `timings` runs the timed benchmarks alone on the GPU (parity, training throughput, long-context
# scan), then starts the untimed full-size runs in the background (setsid: they outlive the call,
# but not the machine, which goes back 30 s after a call ends: call `collect` at once), one after
# another: notebook 05 (long context; it reads the committed scan), notebook 02 (toy tasks) and the
# hybrid sweep of notebook 04. Side by side they were slower than in sequence (session 2: three jobs
# made each of notebook 02's runs 3.4x slower). `collect` runs the GPU tests meanwhile (the decode
# tests time things and stay out: run tests/test_gpu_decode.py alone), waits for the background
# chain (at most --wait seconds) and packs the results. Everything lands in /tmp/gpu and comes back
# as one tarball per call under $OUT (the device tool returns at most 8 files).
set -u
R=/tmp/gpu
mkdir -p "$R" benchmarks/results
export PYTHONUNBUFFERED=1
# result files are named by the GPU model: parity_h100.json on an H100, parity_h200.json on an H200
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE '[ahlb][0-9]{2,3}' | head -1 |
  tr '[:upper:]' '[:lower:]')
DEV=${DEV:-gpu}
# the device's copy of the tree has no (or stale) git metadata: results record the commit from here
[ -n "${GDN_LAB_COMMIT:-}" ] || echo "warning: export GDN_LAB_COMMIT=<sha>, or the results record a stale commit" >&2

timed() {  # timed SECONDS NAME command...: run, log to $R/NAME.log, record the exit status
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$R/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$R/steps.txt"
}

job_line() {  # job_line JOB: the shell line that runs JOB, logs it and leaves $R/JOB.done
  # EXTRA_<job> adds arguments, e.g. EXTRA_nb02="--param workers=6" (fewer clients on one GPU's memory)
  local extra="EXTRA_$1"
  # JOB_TIMEOUT bounds a job that hangs; it keeps counting while the job is paused (`pause`)
  echo "start=\$SECONDS; timeout ${JOB_TIMEOUT:-1740} ${JOB_COMMAND[$1]} ${!extra:-} >'$R/$1.log' 2>&1; \
echo \"$1 rc=\$? \$((SECONDS - start))s\" >>'$R/steps.txt'; touch '$R/$1.done'"
}

chain() {  # chain JOB...: the jobs one after another, in the background; "nb02+nb05" runs two side by side
  local script="$R/chain.sh" step job
  echo "set -u; cd '$PWD'" >"$script"
  for step in "$@"; do
    for job in ${step//+/ }; do
      if [[ $step == *+* ]]; then echo "( $(job_line "$job") ) &" >>"$script"; else job_line "$job" >>"$script"; fi
    done
    [[ $step == *+* ]] && echo "wait" >>"$script"
  done
  setsid nohup bash "$script" </dev/null >/dev/null 2>&1 &
  echo "background, in this order: $*" | tee -a "$R/steps.txt"
}

start_mps() {  # MPS=1: one MPS server lets small models' kernels from several processes run at once
  # (without it, processes take turns on the GPU). A user-space daemon; the card's settings stay as they are.
  # (default pipe directory, so that every later process on this machine, tests too, goes through it)
  if nvidia-cuda-mps-control -d && timeout 90 python3 -c "import torch; print(torch.ones(1, device='cuda').sum().item())"; then
    echo "MPS on" | tee -a "$R/steps.txt"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    echo "MPS did not start: processes take turns on the GPU" | tee -a "$R/steps.txt"
    return 1
  fi
}

declare -A JOB_COMMAND=(
  [nb02]="python3 -m gdn_lab run 02_toy_tasks --profile full --run-dir $R/nb02"
  # notebook 04 trains all its steps: its max_seconds cap measured a shared GPU twice and planned fewer
  [nb04]="python3 -m gdn_lab run 04_hybrids --profile full --run-dir $R/nb04 --param max_seconds=None"
  [nb05]="python3 -m gdn_lab run 05_long_context --profile full --run-dir $R/nb05"
  [nb07]="python3 -m gdn_lab run 07_ablations --profile full --run-dir $R/nb07"
  [nb08]="python3 -m gdn_lab run 08_scaling --profile full --run-dir $R/nb08"
  [hybrids]="python3 benchmarks/hybrids.py --out $R/hybrids_${DEV}.json --fig-dir $R/hybrids_figures \
--sweep-dir /tmp/hybrids-runs"
)

pack_partial() {  # pack_partial JOB STEM ARGS...: $R/partial/STEM/{partial.json,finished_trials_<dev>.tar.xz}
  local job=$1 stem=$2; shift 2
  [ -d "$R/$job/$stem" ] || return 0
  mkdir -p "$R/partial/$stem"
  local args=("$@")
  [ "$1" = --sweep ] || args+=(--source "$DEV, commit ${GDN_LAB_COMMIT:-unknown}" --out "$R/partial/$stem/partial_$DEV.json")
  python3 benchmarks/partial_results.py "$R/$job/$stem" "${args[@]}" \
    --pack "$R/partial/$stem/finished_trials_$DEV.tar.xz" >>"$R/partial.log" 2>&1 || echo "pack_partial $job failed" >&2
}

case "${1:-}" in
timings)
  # TIMED and BACKGROUND choose the steps (default: all but memory); e.g. TIMED=memory BACKGROUND="nb04 nb02+nb05"
  # (the chain runs its jobs one after another, "a+b" side by side: without MPS=1 processes time-slice one GPU)
  # (TIMED="" runs none: `-` not `:-`, which took an empty TIMED for unset and cost the sixth session 4 minutes)
  timed_steps=${TIMED-parity train_throughput long_context}
  jobs=${BACKGROUND-nb05 nb02 hybrids}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/gpu.txt"
  for step in $timed_steps; do
    case $step in
      parity) timed 130 parity python3 benchmarks/parity.py --out "$R/parity_${DEV}.json" ;;
      train_throughput) timed 240 train_throughput python3 benchmarks/train_throughput.py \
        --models gdn fla transformer gdn_v64 --out "$R/train_throughput_${DEV}.json" ;;
      long_context) timed 150 long_context python3 benchmarks/long_context.py --out "$R/long_context_${DEV}.json" ;;
      # issue 23: the recompute_gdn lever's peak memory and cost at 16k, eager and graphed, beside the transformer
      memory) timed 300 memory python3 benchmarks/train_throughput.py --contexts 16384 --rounds 2 \
        --models gdn gdn_recompute gdn_recompute_core transformer gdn+graph gdn_recompute+graph \
        gdn_recompute_core+graph transformer+graph \
        --out "$R/train_memory_${DEV}.json"
        timed 300 recompute_tests python3 -m pytest -m gpu tests/test_gpu_train.py -k recompute -q -s ;;
      *) echo "unknown timed step $step" >&2 ;;
    esac
  done
  for job in ${jobs//+/ }; do
    [ -n "${JOB_COMMAND[$job]:-}" ] || { echo "unknown background job $job" >&2; exit 2; }
  done
  # side by side only through MPS; without it the jobs run one after another
  [ "${MPS:-0}" = 1 ] && start_mps || jobs=${jobs//+/ }
  # a notebook starts from the committed finished trials of its interrupted profile, where there are
  # some (benchmarks/partial_results.py packs them; grid.run and sweep.run_sweep read them back)
  for job in ${jobs//+/ }; do
    stem=$(sed -n 's/.* run \([0-9][0-9]_[a-z_]*\) .*/\1/p' <<<"${JOB_COMMAND[$job]}")
    finished=benchmarks/results/$stem/finished_trials_h200.tar.xz
    if [ -n "$stem" ] && [ -f "$finished" ]; then
      mkdir -p "$R/$job/$stem" && tar xJf "$finished" -C "$R/$job/$stem" && echo "$job: resumes from $finished"
    fi
  done
  # shellcheck disable=SC2086
  [ -z "$jobs" ] || chain $jobs
  echo "$jobs" >"$R/background.txt"
  tar czf "$OUT/timings.tar.gz" -C "$R" --exclude nb02 --exclude nb05 --exclude hybrids_figures .
  cat "$R/steps.txt"
  ;;
collect)
  wait_s=${2:-330}  # after the tests: within one 10-minute call
  # correctness only, so it may share the GPU with the background runs
  [ -e "$R/gpu_tests.log" ] || [ "${TESTS:-1}" = 0 ] || timed 240 gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_parity.py \
    tests/test_gpu_train.py tests/test_longctx.py tests/test_probe.py \
    --deselect tests/test_gpu_parity.py::test_parity_script_meets_fla_tolerances
  for _ in $(seq "$wait_s"); do
    pending=0
    for job in $(tr + ' ' <"$R/background.txt" 2>/dev/null); do [ -e "$R/$job.done" ] || pending=1; done
    [ "$pending" = 0 ] && break
    sleep 1
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  # memory per process (MPS clients grew trial after trial in the sixth session until the GPU was full)
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | sort -t, -k2 -n -r | head -16
  # finished trials per notebook grid, to plan the next call
  # (a run folder lr<rate>_seed<seed> counts once, whether it holds a grid's trial.json or a sweep's metrics.json)
  find "$R" \( -name trial.json -o -name metrics.json \) -path '*/lr*_seed*/*' -printf '%h\n' | sort -u |
    sed "s|$R/||" | cut -d/ -f1-3 | sort | uniq -c
  # the finished trials of each grid, summarised and packed as benchmarks/results/<notebook>/ keeps them
  # (benchmarks/partial_results.py), in case the profile does not finish in this session
  # (the notebooks' default rates and seeds; 07 and 08 tune the rate at the first seed, then the others)
  rates=(--learning-rates 3e-4 1e-3 3e-3); tuned_rates=(--learning-rates 1e-3 3e-3)
  pack_partial nb02 02_toy_tasks "${rates[@]}" --grid mqar:accuracy,exact_match:2 --grid state:accuracy:3 \
    --grid copy:exact_match:2
  pack_partial nb05 05_long_context "${rates[@]}" --grid passkey:exact_match,digit_accuracy,distractor_rate:2
  pack_partial nb04 04_hybrids --sweep runs --sweep longer
  pack_partial nb07 07_ablations "${tuned_rates[@]}" --grid lm:final_val_loss:3:tuned,lower \
    --grid mqar:accuracy:3:tuned
  pack_partial nb08 08_scaling "${tuned_rates[@]}" --grid runs:final_val_loss:2:tuned,lower
  # checkpoints stay behind: executed notebooks, metrics, results JSON, figures and logs come back
  tar cJf "$OUT/full_runs.tar.xz" -C "$R" --exclude '*.pt' --exclude 'plotly.min.js' .
  ls -la "$OUT"
  cat "$R/steps.txt"
  ;;
pause | resume | stop)
  # pause JOB: SIGSTOP its process tree (its GPU memory stays; the others get the GPU's time), resume
  # JOB: SIGCONT, stop JOB: SIGTERM (its finished trials stay; `collect` packs them). The seventh
  # session did this by hand when four notebooks at once left each too slow to finish anything.
  job=${2:?"usage: bash benchmarks/gpu_session.sh $1 JOB (e.g. nb02)"}
  tree() { echo "$1"; for child in $(pgrep -P "$1"); do tree "$child"; done; }
  top=$(pgrep -f "^timeout [^ ]* ${JOB_COMMAND[$job]:?unknown job $job}" | head -1)
  [ -n "$top" ] || { echo "$job is not running" >&2; exit 1; }
  # the `timeout` process itself stays untouched: stopping it would stop its clock, stopping nothing else
  pids=$(tree "$top" | grep -vx "$top")
  case $1 in pause) signal=STOP ;; resume) signal=CONT ;; stop) signal=TERM ;; esac
  # shellcheck disable=SC2086
  kill -"$signal" $pids && echo "$1 $job: signal $signal to $(wc -w <<<"$pids") processes" | tee -a "$R/steps.txt"
  # a stopped process keeps SIGTERM pending until it runs again (as GNU timeout does: TERM, then CONT)
  # shellcheck disable=SC2086
  [ "$signal" = TERM ] && kill -CONT $pids 2>/dev/null
  true
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh timings | collect [wait seconds] | pause|resume|stop JOB" >&2
  exit 2
  ;;
esac
