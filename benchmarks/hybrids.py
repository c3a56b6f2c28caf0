"""The hybrid study of notebook 04 as one command (the notebook's full profile is the primary path:
`python -m gdn_lab run 04 --profile full`; this script runs the same protocol with the same defaults
and writes a results JSON and HTML figures, for the GPU session's background chain).

    python benchmarks/hybrids.py --max-seconds 570 --out benchmarks/results/hybrids_h200.json \\
        --fig-dir docs/figures/hybrids
    python benchmarks/hybrids.py --smoke --device cpu            # two tiny variants on the CPU, under a minute

Variants (--patterns, `gdn_lab.config.hybrid_layers`): pure GDN, transformer, sparse (layers 3
and 7 of 8), alternating, late (6-7); add 'ratio:8', 'ratio:25', 'ratio:42' for the seed's k/12
ratios. Model: the `h100` preset (the seed's exp10 model: GDN heads of 64, value dim 64, SwiGLU
MLP, SDPA attention with RoPE) at --hidden-size x --num-layers (256 x 8, 7.5M parameters),
hidden_size // 64 heads for GDN and attention alike. GDN layers run on FLA's chunk kernels on the
GPU (backend 'auto' -> 'fla'), bf16 autocast, CUDA-graphed steps.
Data: byte tokens of --corpus ('python-source': the installed packages' code, no download),
windows of 1024, batch 48, 440 steps by default: 21.6M tokens per run, the same batches for every
variant of a seed. Protocol (`gdn_lab.sweep.run_sweep`): every variant at every rate of
--learning-rates (first seed), its best kept; the --seeded best variants over --seeds seeds.

--max-seconds is a budget for the whole command (data, calibration and sweep, every rate and
seed counted): a few steps of a pure GDN and a pure transformer model are timed, then --steps is
lowered for every run alike (`gdn_lab.sweep.budget_train_config`; the plan lands in the sweep
directory). The run directories (--sweep-dir, ~0.2 GB of checkpoints per run at the defaults) make
the command resumable: run it again and finished runs are read back, an interrupted one continues.

Writes --out with `gdn_lab.results.save_results` (environment, config, seed; `results` is the
SweepResult plus the budget plan, the ranking-stability check and the comparison with the seed's
ranking) and the figures of `gdn_lab.viz.sweep_figures` as HTML pages into --fig-dir.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

STARTED = time.perf_counter()

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import benchmark_parser, environment_line  # noqa: E402
from gdn_lab.config import TrainConfig, get_preset  # noqa: E402
from gdn_lab.data import lm_data  # noqa: E402
from gdn_lab.env import environment_report  # noqa: E402
from gdn_lab.results import save_results  # noqa: E402
from gdn_lab.sweep import (  # noqa: E402
    SEED_EXP10,
    budget_train_config,
    compare_with_seed,
    hybrid_variants,
    rank_stability,
    run_sweep,
)
from gdn_lab.viz import save_html, sweep_figures  # noqa: E402

# the notebook's defaults (tests/test_benchmarks.py checks that they agree)
PATTERNS = ["gdn", "transformer", "sparse", "alternating", "late"]
LEARNING_RATES = [1e-3, 2e-3, 4e-3, 8e-3]
SMOKE = {"hidden_size": 32, "num_layers": 2, "head_dim": 16, "corpus": "pydoc", "max_chars": 60_000, "seq_len": 32,
         "batch_size": 4, "steps": 6, "eval_every": 1, "eval_batches": 1, "patterns": ["gdn", "transformer"],
         "learning_rates": [1e-3, 3e-3], "seeds": 2, "seeded": 1, "max_seconds": 0,
         "sweep_dir": "runs/hybrids_smoke"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "2 tiny variants, 6 steps (CPU, under a minute)", dtype=False)
    parser.add_argument("--patterns", nargs="+", default=PATTERNS, help="hybrid pattern names")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64, help="GDN and attention head dim; heads = hidden // this")
    parser.add_argument("--corpus", default="python-source", help="'python-source', 'pydoc' or a HF dataset name")
    parser.add_argument("--max-chars", type=int, default=30_000_000, help="characters of the corpus read")
    parser.add_argument("--tokenizer", default="byte", help="'byte', 'bpe:<vocab>' or a HF tokenizer name")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=440, help="steps per run (at most, with --max-seconds)")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=LEARNING_RATES,
                        help="the grid: every variant at each rate, its best kept")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the best variants")
    parser.add_argument("--seeded", type=int, default=3, help="how many of the best variants get the extra seeds")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="budget for the whole command; scales --steps down (default: none, as the notebook)")
    parser.add_argument("--sweep-dir", default="runs/hybrids", help="run directories (checkpoints; resumable)")
    parser.add_argument("--fig-dir", type=pathlib.Path, help="folder for the figures as HTML")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = environment_report(args.device)
    print(environment_line(report, report["dtype"]), flush=True)

    data = lm_data(args.corpus, args.tokenizer, seq_len=args.seq_len, seed=args.seed, max_chars=args.max_chars)
    heads = args.hidden_size // args.head_dim
    base = get_preset("h100").model.replace(vocab_size=data.vocab_size, hidden_size=args.hidden_size,
                                            num_layers=args.num_layers, num_heads=heads, head_dim=args.head_dim,
                                            attn_num_heads=heads)
    variants = hybrid_variants(base, args.patterns)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               warmup_steps=max(1, args.steps // 10), eval_every=args.eval_every,
                               eval_batches=args.eval_batches, seed=args.seed, device=args.device)
    protocol = {"learning_rates": args.learning_rates, "seeds": args.seeds, "seeded": args.seeded}
    print(f"data: {data.describe()}", flush=True)

    plan = None
    if args.max_seconds:
        plan = budget_train_config(variants, train_config, data, args.max_seconds, sweep_dir=args.sweep_dir,
                                   min_steps=min(20, args.steps), spent_seconds=time.perf_counter() - STARTED,
                                   **protocol)
        train_config = plan.train_config
        print(f"budget {args.max_seconds:g} s: {plan.requested_steps} -> {train_config.steps} steps per run; "
              f"estimated {plan.estimated_seconds:.0f} s after {plan.calibration_seconds:.0f} s of calibration; "
              f"s/step " + ", ".join(f"{n} {s:.3f}" for n, s in plan.step_seconds.items()), flush=True)

    sweep = run_sweep(variants, train_config, data, args.sweep_dir, progress=False,
                      notes={"corpus": args.corpus, "device": report["device_name"], "model": base.to_dict()},
                      **protocol)
    comparison, stability = compare_with_seed(sweep), rank_stability(sweep)
    print(sweep.table())
    order = "stable" if stability["stable"] else f"pairs {stability['swapped']} swap"
    print(f"ranking: {' < '.join(sweep.ranking())}; over the last 30% of steps {stability['steps']}: {order}")
    print(f"seed's variants: this run {' < '.join(comparison['run_order'])}; the seed "
          f"{' < '.join(comparison['seed_order'])} ({comparison['agreeing_pairs']} of {len(comparison['pairs'])} "
          f"pairs agree, {comparison['tied_pairs']} tie; seed losses {SEED_EXP10['val_loss']})")
    print(f"total {time.perf_counter() - STARTED:.0f} s", flush=True)

    results = {**sweep.to_dict(), "budget": plan, "comparison": comparison, "stability": stability}
    if args.out:
        config = {**vars(args), "model": base.to_dict(),
                  "train": train_config.to_dict(), "seed_exp10": SEED_EXP10}
        print(f"wrote {save_results(args.out, results, config=config, seed=args.seed, device=args.device)}")
    if args.fig_dir:
        for name, figure in sweep_figures(sweep).items():
            print(f"wrote {save_html(figure, args.fig_dir / f'hybrids_{name}.html')}")
    return results


if __name__ == "__main__":
    main()
