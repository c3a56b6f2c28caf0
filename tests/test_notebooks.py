"""Every numbered notebook, executed at smoke size through the runner, judged by its metrics.json.

One runner call executes them all (session fixture); then one test per notebook asserts on the
numbers that notebook wrote. A notebook without an entry in CHECKS fails: running is not passing.
"""
from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import NOTEBOOKS_DIR, load_benchmark

from gdn_lab import grid
from gdn_lab.data import ByteTokenizer
from gdn_lab.longctx import shortest_prompt
from gdn_lab.runner import NOTEBOOK_GLOB, run_notebooks
from gdn_lab.sweep import variant_name

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob(NOTEBOOK_GLOB))
SMOKE = yaml.safe_load((NOTEBOOKS_DIR / "ci_params.yml").read_text())

pytestmark = [pytest.mark.notebooks, pytest.mark.timeout(1800)]


def check_00_quickstart(m: dict) -> None:
    assert m["device"] == "cpu" and m["backend"] == "torch"
    assert m["logits_shape"] == [1, m["prompt_tokens"], m["vocab_size"]]
    # an untrained model predicts nearly uniformly: cross-entropy ~ ln(vocab)
    assert abs(m["loss_at_init"] - math.log(m["vocab_size"])) < 0.1, m["loss_at_init"]
    assert m["generated_tokens"] == SMOKE["00_quickstart"]["max_new_tokens"]
    assert m["greedy_matches_parallel"] is True
    family = m["family_params"]
    assert m["params"] == family["gdn"] > 0
    # per-layer parameter counts do not depend on position: a hybrid interpolates linearly
    layers, attn = m["num_layers"], m["hybrid_attn_layers"]
    assert 0 < attn < layers
    assert family["hybrid"] * layers == family["gdn"] * (layers - attn) + family["transformer"] * attn


def check_01_layer_internals(m: dict) -> None:
    for key in ("scratch_vs_layer_rel_rmse", "chunk_vs_recurrent_rel_rmse", "chunk_vs_recurrent_state_rel_rmse"):
        assert m[key] < 1e-5, (key, m[key])
    assert m["probe_max_rel_error"] < 1e-4 and m["implicit_attention_rel_rmse"] < 1e-4
    smoke = SMOKE["01_layer_internals"]
    assert m["probed_gdn_layers"] == 2 and m["kept_state_steps"] == smoke["state_frames"]
    assert m["train_steps"] == smoke["train_steps"]
    assert len(m["figures"]) == 9
    for key in ("accuracy_trained_gdn", "accuracy_untrained_gdn", "accuracy_transformer", "chance_accuracy",
                "answer_hit_rate_trained", "answer_hit_rate_untrained", "answer_hit_rate_transformer"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])


def check_02_toy_tasks(m: dict) -> None:
    smoke = SMOKE["02_toy_tasks"]
    names = ["GDN", "GDN slow decay", "DeltaNet", "Transformer", "Transformer (no conv)", "Hybrid"]
    assert m["models"] == names
    for name in names:
        assert list(m["mqar_accuracy"][name]) == [str(t) for t in smoke["mqar_lengths"]]
        for length, accuracy in m["mqar_accuracy"][name].items():
            low, high = m["mqar_accuracy_range"][name][length]
            assert 0 <= low <= accuracy <= high <= 1
        assert 0 <= m["copy_exact_match"][name] <= 1
        assert m["copy_longest"][name] in [0, *smoke["copy_eval_lengths"]]
    assert set(m["mqar_solved_everywhere"]) <= set(names)
    assert m["learning_rates"] == smoke["learning_rates"] and m["seeds"] == list(range(smoke["num_seeds"]))
    dims = {str(2 * k) for k in smoke["state_head_dims"]}  # num_heads (2, the default) x head_dim
    assert set(m["state_accuracy"]) == set(m["state_non_decreasing"]) == {"GDN"}  # state_models' default
    assert all(set(by_size) == dims for by_size in m["state_accuracy"].values())
    vocab = smoke["mqar_vocab_size"]
    assert math.isclose(m["mqar_chance"], 1 / (vocab - vocab // 2))
    assert math.isclose(m["copy_chance"], 1 / (smoke["copy_vocab_size"] - 2))
    rates, seeds = len(smoke["learning_rates"]), smoke["num_seeds"]
    pairs = (len(names) * len(smoke["mqar_lengths"]) * seeds  # (point, seed) pairs; state: one model (GDN)
             + len(smoke["state_head_dims"]) * smoke["state_num_seeds"] + len(names) * seeds)
    # every pair at every rate, and at most one more rate per pair (extend_grid = 1) where its best was an edge
    assert pairs * rates <= m["trials"] <= pairs * (rates + 1) and m["diverged"] == 0
    beyond = {grid.beyond_edge(smoke["learning_rates"], side) for side in ("lowest", "highest")}
    assert m["extend_grid"] == 1 and set(m["lr_beyond_grid"]) <= beyond
    trials = m["trials"]
    assert m["stopped_early"] <= trials and m["train_seconds"] > 0
    assert set(m["lr_at_grid_edge"]) == {"lowest", "highest"}  # counted by grid.at_grid_edge (tests/test_grid.py)


def check_03_lm_training(m: dict) -> None:
    assert m["device"] == "cpu" and m["backend"] == "torch"
    assert abs(m["initial_train_loss"] - math.log(m["vocab_size"])) < 0.1, m["initial_train_loss"]
    assert m["final_val_loss"] < m["initial_train_loss"]
    assert m["resume_max_abs_diff"] == 0.0  # resume continues bit-exactly on the CPU
    smoke = SMOKE["03_lm_training"]
    assert m["extended_steps"] == smoke["steps"] + smoke["extend_steps"]
    assert m["extended_final_val_loss"] < m["final_val_loss"]
    assert m["generated_tokens"] == smoke["max_new_tokens"]
    losses = m["final_val_loss_by_model"]
    assert set(losses) == {"gdn", "transformer"}
    assert all(math.isfinite(v) and v < math.log(m["vocab_size"]) for v in losses.values()), losses
    assert set(m["tokens_by_model"].values()) == {m["tokens"]}  # equal token budgets


def check_04_hybrids(m: dict) -> None:
    smoke = SMOKE["04_hybrids"]
    names = [variant_name(p) for p in smoke["patterns"]] + [f"swa-{variant_name(p)}" for p in smoke["swa_patterns"]]
    assert m["source"] == "trained" and m["variants"] == names
    assert set(m["status"].values()) == {"ok"}
    assert set(m["tokens"].values()) == {smoke["steps"] * smoke["batch_size"] * smoke["seq_len"]}
    # the grid: every variant at every rate, each keeping the rate of its lowest loss
    rates = smoke["learning_rates"]
    assert m["learning_rates"] == rates
    for name in names:
        scores = m["lr_scores"][name]
        assert set(scores) == {f"{r:g}" for r in rates} and all(math.isfinite(v) for v in scores.values())
        assert f"{m['chosen_lr'][name]:g}" == min(scores, key=scores.get)
    # seeds: the best `seeded` variants (by their grid loss) get `seeds` seeds, the others one
    grid_best = sorted(names, key=lambda n: min(m["lr_scores"][n].values()))
    assert m["seeds"] == {n: list(range(smoke["seeds"])) if n in grid_best[:smoke["seeded"]] else [0] for n in names}
    assert m["runs"] == len(names) * len(rates) + smoke["seeded"] * (smoke["seeds"] - 1)
    losses = m["final_val_loss"]
    assert all(math.isfinite(x) and x < math.log(256) - 0.05 for x in losses.values()), losses
    for name in names:  # a one-seed variant's mean is its grid loss at the chosen rate
        if len(m["seeds"][name]) == 1:
            assert losses[name] == min(m["lr_scores"][name].values()) and m["val_loss_range"][name] == 0
    seeded = [n for n in names if len(m["seeds"][n]) > 1]
    assert m["seed_noise"] == max(m["val_loss_range"][n] for n in seeded) > 0
    assert m["ranking"] == sorted(losses, key=losses.get)
    # ranking stability over the last 30%: steps 5 and 6 of 6, one order per evaluation
    assert m["stability_steps"] == [5, 6] and len(m["stability_orders"]) == 2
    assert m["rank_stable"] == (m["stability_orders"][0] == m["stability_orders"][1])
    assert m["stability_orders"][-1] == m["ranking"]
    assert m["attn_layers"] == {"gdn": [], "transformer": list(range(smoke["num_layers"])), "swa-late": []}
    assert m["layouts"] == {"gdn": "GG", "transformer": "AA", "swa-late": "GS"}  # sliding window in layer 1
    assert m["seed_order"] == ["gdn", "transformer"] and m["seed_pairs"] == 1
    assert m["seed_pairs_agreeing"] + m["seed_pairs_tied"] <= 1
    gap = abs(losses["gdn"] - losses["transformer"])
    assert m["seed_pairs_tied"] == int(gap <= m["seed_noise"])  # both ranges are at most the noise here
    agrees = m["run_order_of_seed_variants"] == m["seed_order"]
    assert m["seed_pairs_agreeing"] == int(agrees and not m["seed_pairs_tied"])
    assert m["budget_steps"] is None
    # the longer runs: pure GDN and the transformer at `longer` x steps; the gap at each evaluation ends at
    # the gap of their final losses, and the 1x gap by step ends at the 1x means' gap
    assert m["longer_steps"] == smoke["longer"] * smoke["steps"]
    for name, lr in m["longer_chosen_lr"].items():  # the best of 1 and 0.5 x the rate the grid chose
        assert any(lr == pytest.approx(m["chosen_lr"][name] * f) for f in (1.0, 0.5))
    longer_loss, longer_gaps = m["longer_final_val_loss"], m["longer_gap_by_step"]
    assert [g["step"] for g in longer_gaps] == list(range(1, m["longer_steps"] + 1))  # eval_every 1
    assert longer_gaps[-1]["gap"] == pytest.approx(longer_loss["transformer"] - longer_loss["gdn"])
    assert m["transformer_gap_by_step"][-1]["gap"] == pytest.approx(losses["transformer"] - losses["gdn"])
    assert isinstance(m["longer_gap_closing"], bool)


def check_05_long_context(m: dict) -> None:
    smoke = SMOKE["05_long_context"]
    models, haystacks = ["GDN", "GDN slow decay", "DeltaNet", "Transformer"], ["noise", "text"]
    assert m["models"] == models and m["haystacks"] == haystacks
    train_len, depths = smoke["train_len"], smoke["depths"]
    shortest = shortest_prompt(ByteTokenizer())  # prompt lengths: from half the row (or the shortest) to the row
    assert m["train_context_len"] == [max(shortest, train_len // 2), train_len - 4]
    assert m["eval_lengths"] == [train_len - 4] + [f * train_len for f in smoke["extrapolation"]]
    runs_per_point = len(smoke["learning_rates"]) * len(smoke["seeds"])
    assert m["trials"] == len(models) * len(haystacks) * runs_per_point
    assert m["trial_status"] == {"ok": m["trials"], "diverged": 0}
    assert set(m["lr_at_grid_edge"]) == {"lowest", "highest"}  # counted by grid.at_grid_edge (tests/test_grid.py)
    assert m["learned_threshold"] == 0.0 and m["not_learned"] == {h: [] for h in haystacks}  # smoke: all "learned"
    for name in models:
        for haystack in haystacks:
            p = m["passkey"][name][haystack]
            assert p["exact_match"]["n"] == len(smoke["seeds"]) and p["seeds"] == smoke["seeds"]
            assert all(0.0 <= v <= 1.0 for v in p["exact_match"]["values"] + p["digit_accuracy"]["values"])
            # a prompt answered with the distractor's number is not answered right: the two shares add to <= 1
            assert all(0.0 <= d <= 1.0 - e + 1e-9 for d, e in zip(p["distractor_rate"]["values"],
                                                                    p["exact_match"]["values"], strict=True))
            assert p["exact_match"]["min"] <= p["exact_match"]["mean"] <= p["exact_match"]["max"]
            assert set(p["chosen_lr"]) <= set(smoke["learning_rates"])
            assert [sorted(s) for s in p["lr_scores"]] == [sorted(f"{r:g}" for r in smoke["learning_rates"])] * len(
                smoke["seeds"])
            assert all(1 <= steps <= smoke["steps"] for steps in p["steps"])
            assert p["learned_runs"] == len(smoke["seeds"])
            assert list(p["extrapolation"]) == [str(n) for n in m["eval_lengths"]]
            assert all(0.0 <= a <= 1.0 for a in p["extrapolation"].values())
            cells = p["cells"]
            assert sorted((c["context_len"], c["depth"]) for c in cells) == sorted(
                (n, d) for n in m["eval_lengths"] for d in depths)
            assert all(c["num_samples"] == smoke["num_samples"] and c["haystack"] == haystack for c in cells)
    assert m["paper_s_niah_1"] == {"1024": 98.4, "2048": 88.4, "4096": 91.4, "8192": 91.8}
    assert 0 < m["lm_epochs"] < 1  # the language model sees less than one pass over its corpus
    for name in ("GDN", "Transformer"):
        buckets = m["loss_by_position"][name]
        assert buckets and all(math.isfinite(b["loss"]) for b in buckets)
        assert math.isfinite(m["lm_val_loss"][name])
    state = m["state_norm"]
    assert state["context_len"] == smoke["state_norm_len"] and state["model"] in ("GDN", "GDN slow decay", "DeltaNet")
    assert math.isfinite(state["final_max"]) and state["final_max"] > 0
    scan = m["scan"]
    assert {r["model"] for r in scan} == {"gdn", "transformer", "hybrid"}
    assert all(r["status"] in ("ok", "oom", "skipped") for r in scan)
    assert all(m["scan_max_ok_len"][name] > 0 for name in ("gdn", "transformer", "hybrid"))
    # peak memory is measured on GPUs only: its figure exists where the scan has the numbers
    memory = ["scan_train_peak_mib"] if any(r.get("train_peak_mib") is not None for r in scan) else []
    assert m["figures"] == sorted(["loss_by_position", "scan_train_ms", "state_norm", *memory,
                                   *(f"passkey_{haystack}" for haystack in haystacks)])


def check_06_benchmarks(m: dict) -> None:
    assert m["figures"] >= 1
    assert m["sources"]["decode"], "the committed decode JSON must be read"
    for source in m["parity"].values():  # a measured ratio per judged comparison, never an empty table
        # 0 is a measurement too: in bf16 gdn_lab's fla backend gives FLA's own layer bit for bit
        assert source["worst_ratio"] and all(math.isfinite(r) and r >= 0 for r in source["worst_ratio"].values())
    for source in m["decode"].values():
        assert all(source["targets"].values()), source["targets"]  # issue 13's decode targets, as measured


def check_07_ablations(m: dict) -> None:
    smoke = SMOKE["07_ablations"]
    chosen = ["GDN", *smoke["only_variants"]]  # the order of gdn_lab.ablations.ablation_variants
    assert m["variants"] == chosen
    rates, seeds = smoke["learning_rates"], list(range(smoke["num_seeds"]))
    assert m["learning_rates"] == rates and m["seeds"] == seeds
    for name in chosen:
        low, high = m["lm_val_loss_range"][name]
        assert math.isfinite(m["lm_val_loss"][name]) and low <= m["lm_val_loss"][name] <= high < math.log(256)
        low, high = m["mqar_accuracy_range"][name]
        assert 0 <= low <= m["mqar_accuracy"][name] <= high <= 1
        assert m["lm_seeds"][name] == m["mqar_seeds"][name] == seeds
        assert m["lm_chosen_lr"][name] in m["lr_tried"]["lm"] and m["mqar_chosen_lr"][name] in m["lr_tried"]["mqar"]
    beyond = {grid.beyond_edge(rates, "lowest"), grid.beyond_edge(rates, "highest")}  # extend_grid's one round
    assert m["extend_grid"] == 1 and set(m["lr_tried"]["lm"]) - set(rates) <= beyond
    assert set(rates) <= set(m["lr_tried"]["mqar"]) <= set(rates) | beyond
    assert set(m["lm_tokens"].values()) == {smoke["lm_steps"] * smoke["lm_batch_size"] * smoke["lm_seq_len"]}
    others = set(chosen) - {"GDN"}
    for verdicts in (m["lm_verdict"], m["mqar_verdict"]):
        assert set(verdicts) == others and set(verdicts.values()) <= {"better", "worse", "tie"}
    assert m["paper_rows"] == {"no decay (DeltaNet)": "w. naive Delta Rule", "head_dim x2": "w. Head Dim 256"}
    assert m["paper_agreeing"] + m["paper_disagreeing"] + m["paper_unresolved"] == 2
    assert m["state_size"]["head_dim x2"] == 2 * m["state_size"]["GDN"]  # same H*K, twice the key dim per head
    vocab = smoke["mqar_vocab_size"]
    assert math.isclose(m["mqar_chance"], 1 / (vocab - vocab // 2))
    # per variant and task: the rate grid at the first seed, one rate past its better edge (a loss never ties
    # between two rates, so every LM grid grows; an MQAR grid whose rates tie does not), the other seeds
    base = len(chosen) * 2 * (len(rates) + len(seeds) - 1)
    assert base + len(chosen) <= m["trials"] <= base + 2 * len(chosen) and m["diverged"] == 0
    assert m["train_seconds"] > 0


def check_08_scaling(m: dict) -> None:
    smoke = SMOKE["08_scaling"]
    archs, shapes = ["gdn", "transformer", "sparse"], [f"{h}x{n}" for h, n in smoke["shapes"]]
    rates, seeds = smoke["learning_rates"], list(range(smoke["num_seeds"]))
    assert m["architectures"] == archs and m["shapes"] == shapes and m["learning_rates"] == rates
    beyond = {grid.beyond_edge(rates, "lowest"), grid.beyond_edge(rates, "highest")}
    assert set(rates) < set(m["lr_tried"]) <= set(rates) | beyond  # every loss grid grows past its better edge
    for arch in archs:
        params = [m["params"][arch][shape] for shape in shapes]
        assert params == sorted(params) and params[0] > 0
        for shape in shapes:
            n, tokens, steps = m["params"][arch][shape], m["tokens"][arch][shape], m["steps"][arch][shape]
            batch = m["batch_size"][arch][shape]
            # a fixed tokens-per-parameter budget: the steps follow from the size, at least min_steps of them
            # (the batch shrinks where the budget would give fewer)
            assert steps >= smoke["min_steps"] and batch <= smoke["batch_size"]
            assert tokens == steps * batch * smoke["seq_len"]
            assert abs(tokens - smoke["tokens_per_param"] * n) <= batch * smoke["seq_len"] / 2
            assert m["flops"][arch][shape] > 6 * n * tokens  # 6ND plus the head and the mixers
            low, high = m["val_loss_range"][arch][shape]
            assert low <= m["val_loss"][arch][shape] <= high < math.log(256)
            assert m["seeds"][arch][shape] == seeds and m["chosen_lr"][arch][shape] in m["lr_tried"]
    assert set(m["alpha"]) | set(m["fit_errors"]) == set(archs)
    for arch, alpha in m["alpha"].items():
        low, high = m["alpha_interval"][arch]
        assert 0 < alpha < 3 and low <= high and m["irreducible"][arch] >= 0
        assert m["alpha_stderr"][arch] is None or m["alpha_stderr"][arch] >= 0
        assert m["alpha_pure"][arch] is not None
    assert set(m["winners"]) == set(shapes) and set(m["winners"].values()) <= set(archs)
    assert all(set(tied) <= set(archs) - {m["winners"][shape]} for shape, tied in m["tied_with_winner"].items())
    assert min(m["batch_size"]["gdn"].values()) < smoke["batch_size"]  # the smallest size shrank its batch
    assert m["kaplan_alpha_N"] == 0.076 and 0.27 < m["chinchilla_alpha_here"] < 0.35
    # the grid, one rate past its better edge (a loss never ties between two rates), the other seeds
    assert m["trials"] == len(archs) * len(shapes) * (len(rates) + 1 + len(seeds) - 1) and m["diverged"] == 0


CHECKS = {
    "00_quickstart": check_00_quickstart,
    "01_layer_internals": check_01_layer_internals,
    "02_toy_tasks": check_02_toy_tasks,
    "03_lm_training": check_03_lm_training,
    "04_hybrids": check_04_hybrids,
    "05_long_context": check_05_long_context,
    "06_benchmarks": check_06_benchmarks,
    "07_ablations": check_07_ablations,
    "08_scaling": check_08_scaling,
}


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """One runner call for every notebook that has smoke parameters (a missing entry fails its own test)."""
    runnable = [path for path in NOTEBOOKS if path.stem in SMOKE]
    runs = run_notebooks(runnable, "smoke", tmp_path_factory.mktemp("smoke"), progress=False) if runnable else []
    return {run.stem: run for run in runs}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_at_smoke_size(notebook, smoke_runs):
    assert notebook.stem in SMOKE, f"add {notebook.stem}'s tiny CPU parameters to notebooks/ci_params.yml"
    assert notebook.stem in CHECKS, f"add a CHECKS entry for {notebook.stem} to tests/test_notebooks.py"
    run = smoke_runs[notebook.stem]
    assert run.status == "ok", run.error
    CHECKS[notebook.stem](run.metrics)


def test_04_hybrids_shows_the_committed_gpu_sweep(tmp_path):
    """With `results_json`, notebook 04 trains nothing and reports the committed GPU sweep: its
    metrics must be that file's numbers, and its ranking the order of their losses."""
    saved_path = NOTEBOOKS_DIR.parent / "benchmarks" / "results" / "hybrids_h200.json"
    saved = json.loads(saved_path.read_text())["results"]
    (run,) = run_notebooks([NOTEBOOKS_DIR / "04_hybrids.ipynb"], "smoke", tmp_path,
                           overrides={"results_json": str(saved_path)}, progress=False)
    assert run.status == "ok", run.error
    m = run.metrics
    losses = {v["name"]: v["final_val_loss"] for v in saved["variants"]}
    assert m["source"] == "loaded" and m["variants"] == list(losses)
    assert m["final_val_loss"] == losses
    assert m["ranking"] == sorted(losses, key=losses.get) == saved["ranking"]
    assert m["seed_pairs"] == 3 and m["seed_pairs_agreeing"] == saved["comparison"]["agreeing_pairs"]
    # saved before the grid: one seed, the rule's rate, so no seed range and no tie
    assert m["runs"] == len(losses) and set(map(len, m["seeds"].values())) == {1}
    assert m["chosen_lr"] == {v["name"]: v["lr"] for v in saved["variants"]}
    assert m["seed_noise"] is None and m["seed_pairs_tied"] == 0 and m["ties_with_best"] == []
    assert m["stability_steps"] == [150, 175, 200, 203]  # the last 30% of 203 steps


def test_06_draws_what_each_module_keeps_for_the_backward(tmp_path):
    """A throughput file with gdn_lab.memory's breakdown (a CPU smoke run here): notebook 06 draws it."""
    results_dir = tmp_path / "results"
    load_benchmark("train_throughput").main(["--smoke", "--device", "cpu", "--models", "gdn", "transformer",
                                             "--contexts", "32", "--rounds", "1",
                                             "--out", str(results_dir / "train_throughput_cpu.json")])
    (run,) = run_notebooks([NOTEBOOKS_DIR / "06_benchmarks.ipynb"], "smoke", tmp_path / "run", progress=False,
                           overrides={"results_dir": str(results_dir), "benchmarks": ["train_throughput"]})
    assert run.status == "ok", run.error
    saved = json.loads((results_dir / "train_throughput_cpu.json").read_text())["results"]["saved_bytes_per_token"]
    assert run.metrics["train_throughput"]["train_throughput_cpu.json"]["saved_bytes_per_token"] == saved
    assert run.metrics["figures"] == 2  # tokens/s against context (no peak memory on the CPU), and the bars


def test_04_hybrids_reproduces_the_committed_full_protocol(tmp_path):
    """Notebook 04 pointed at the committed full-protocol sweep (benchmarks/results/04_hybrids/sweep.json,
    26 runs on an H200) writes the committed metrics.json again: every number the GPU run wrote (chosen
    rates, seed ranges, ranking, its stability, the comparison with the seed) follows from the runs.
    Keys added since (the gap by step) are checked against the final losses below."""
    folder = NOTEBOOKS_DIR.parent / "benchmarks" / "results" / "04_hybrids"
    (run,) = run_notebooks([NOTEBOOKS_DIR / "04_hybrids.ipynb"], "smoke", tmp_path,
                           overrides={"results_json": str(folder / "sweep.json")}, progress=False)
    assert run.status == "ok", run.error
    committed = json.loads((folder / "metrics.json").read_text())
    assert committed["runs"] == 26 and committed["source"] == "trained"
    measured_where = {"device", "source", "seconds"}
    assert {k: run.metrics[k] for k in committed if k not in measured_where} == {
        k: v for k, v in committed.items() if k not in measured_where}
    # the transformer's gap to pure GDN at each evaluation ends at the gap of the final losses, and shrank
    # at every evaluation of the last 30% (the evidence behind "catching up, not converged")
    gaps = run.metrics["transformer_gap_by_step"]
    loss = committed["final_val_loss"]
    assert gaps[-1]["step"] == 440 and gaps[-1]["gap"] == pytest.approx(loss["transformer"] - loss["gdn"])
    assert run.metrics["transformer_gap_closing"] and gaps[0]["gap"] > 3 * gaps[-1]["gap"]
    figures = {path.stem for path in (tmp_path / "04_hybrids" / "figures").glob("*.html")}
    assert figures == {"val_loss", "lr_grid", "placement", "throughput"}  # docs/figures/04_hybrids_* come from here


def test_05_default_scan_results_is_committed():
    """Notebook 05 reads the committed GPU scan by default: the file its parameter names must exist
    and hold records for the three scanned models."""
    import papermill

    default = papermill.inspect_notebook(str(NOTEBOOKS_DIR / "05_long_context.ipynb"))["scan_results"]["default"]
    path = NOTEBOOKS_DIR / json.loads(default)
    records = json.loads(path.read_text())["results"]["records"]
    assert {r["model"] for r in records} == {"gdn", "transformer", "hybrid"}
    assert max(r["seq_len"] for r in records if r["status"] == "ok") >= 16384
