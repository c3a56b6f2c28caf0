"""What an interrupted notebook grid leaves behind, summarised and packed so that the next GPU session
resumes it instead of starting over.

    python3 benchmarks/partial_results.py /tmp/gpu/nb02/02_toy_tasks \
        --grid mqar:accuracy,exact_match:2 --grid state:accuracy:3 --grid copy:exact_match:2 \
        --learning-rates 3e-4 1e-3 3e-3 --source "one H200, commit ca765d1" \
        --out benchmarks/results/02_toy_tasks/partial_protocol_h200.json \
        --pack benchmarks/results/02_toy_tasks/finished_trials_h200.tar.xz

A sweep of `gdn_lab.sweep` (notebook 04) keeps its own summary (`sweep.json`, rewritten as runs
finish); `--sweep runs` packs its finished runs (metrics.json, training_results.json, variant.json,
config.json) for `sweep.run_sweep` to read back (`--sweep runs --sweep longer`: both folders'):

    python3 benchmarks/partial_results.py /tmp/gpu/nb04/04_hybrids --sweep runs \
        --pack benchmarks/results/04_hybrids/finished_trials_h200.tar.xz

Each `--grid NAME:METRICS:SEEDS[:FLAGS]` (`GridSpec`) is a folder of `gdn_lab.grid` trials under the run directory
(`NAME/<point>/lr<rate>_seed<seed>/trial.json`). For every point the JSON holds the summary the
notebook itself would print (`grid.best_over_lr` on the first metric, then `grid.over_seeds` for each
metric), whether the point is complete (every rate at every seed finished), and every trial record.
A summary of an incomplete point covers the seeds that finished (its "seeds" list says which).
`--pack` writes the finished trials' `trial.json` and `config.json` (no checkpoints) with paths
relative to the run directory; `grid.run` reads them back as finished and trains only the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tarfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gdn_lab import grid  # noqa: E402
from gdn_lab.results import load_json, write_json  # noqa: E402

KEPT_FILES = (grid.TRIAL_FILE, "config.json")
SWEEP_FILES = ("metrics.json", "training_results.json", "variant.json", "config.json")


@dataclasses.dataclass
class GridSpec:
    """One `--grid NAME:METRICS:SEEDS[:FLAGS]`: FLAGS 'tuned' (`gdn_lab.protocol.tune_then_seed`: every
    rate at the first seed, then one rate per further seed) and 'lower' (the first metric is a loss:
    the best rate is the lowest), comma-separated."""

    name: str
    metrics: list[str]
    seeds: int
    tuned: bool = False
    higher_is_better: bool = True

    def expected_trials(self, learning_rates: list[float]) -> int:
        return len(learning_rates) + self.seeds - 1 if self.tuned else len(learning_rates) * self.seeds


def parse_grid(text: str) -> GridSpec:
    """'mqar:accuracy,exact_match:2' -> GridSpec('mqar', ['accuracy', 'exact_match'], 2);
    'lm:final_val_loss:3:tuned,lower' -> a tuned grid whose best rate has the lowest loss."""
    parts = text.split(":")
    flags = set(parts[3].split(",")) if len(parts) == 4 else set()
    if len(parts) not in (3, 4) or not parts[2].isdigit() or not flags <= {"tuned", "lower"}:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: write NAME:METRIC[,METRIC...]:SEEDS[:tuned,lower]")
    return GridSpec(parts[0], parts[1].split(","), int(parts[2]), "tuned" in flags, "lower" not in flags)


def finished_trials(folder: pathlib.Path) -> list[pathlib.Path]:
    """The trial folders under `folder` that hold a trial.json, sorted."""
    return sorted(path.parent for path in folder.glob(f"*/*/{grid.TRIAL_FILE}"))


def summarise_grid(folder: pathlib.Path, spec: GridSpec, learning_rates: list[float]) -> dict:
    """One grid's records, its per-point summaries over seeds and which points are complete."""
    records = [load_json(path / grid.TRIAL_FILE) for path in finished_trials(folder)]
    if not records:
        return {"trials": 0, "points": [], "records": []}
    metrics = spec.metrics
    best = grid.best_over_lr(records, metrics[0], spec.higher_is_better)
    tables = {metric: grid.over_seeds(best, metric) for metric in metrics}
    expected = spec.expected_trials(learning_rates)
    points = []
    for row in tables[metrics[0]]:
        labels = {key: row[key] for key in row if key not in ("metric", "seeds", "lrs") and key not in _SUMMARY_KEYS}
        done = [r for r in records if all(r.get(key) == value for key, value in labels.items())]
        points.append({**labels, "complete": len(done) == expected, "finished_trials": len(done),
                       "expected_trials": expected,
                       **{metric: _summary(grid.find_row(tables[metric], **labels)) for metric in metrics}})
    return {"trials": len(records), "points": points, "records": records}


_SUMMARY_KEYS = ("mean", "std", "min", "max", "spread", "n", "failed", "values")


def _summary(row: dict) -> dict:
    return {key: row[key] for key in (*_SUMMARY_KEYS, "seeds", "lrs")}


def pack(run_dir: pathlib.Path, trials: list[pathlib.Path], files: tuple[str, ...], out: pathlib.Path) -> int:
    """Write `files` of each folder in `trials` (those present; no checkpoints) into `out`, with paths
    relative to `run_dir`; returns the number of folders."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        for trial in trials:
            for file in files:
                if (trial / file).exists():
                    tar.add(trial / file, arcname=str((trial / file).relative_to(run_dir)))
    return len(trials)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=pathlib.Path, help="the notebook's run directory (holds the grid folders)")
    parser.add_argument("--grid", type=parse_grid, action="append", default=[], help="NAME:METRICS:SEEDS[:tuned,lower]")
    parser.add_argument("--sweep", action="append", default=[],
                        help="a gdn_lab.sweep folder under run_dir whose finished runs --pack packs (repeatable)")
    parser.add_argument("--learning-rates", type=float, nargs="+")
    parser.add_argument("--source", help="where and at which commit the trials ran")
    parser.add_argument("--out", type=pathlib.Path, help="the summary JSON of the grids")
    parser.add_argument("--pack", type=pathlib.Path, help="tar.xz of the finished trials, for resuming")
    args = parser.parse_args(argv)
    if args.sweep:
        if not args.pack:
            parser.error("--sweep packs a sweep's finished runs: give --pack")
        runs = sorted(path.parent for sweep in args.sweep for path in (args.run_dir / sweep).glob("*/*/metrics.json"))
        print(f"packed {pack(args.run_dir, runs, SWEEP_FILES, args.pack)} finished runs into {args.pack}")
        return
    if not (args.grid and args.learning_rates and args.source and args.out):
        parser.error("summarising grids needs --grid, --learning-rates, --source and --out")
    summary = {spec.name: summarise_grid(args.run_dir / spec.name, spec, args.learning_rates) for spec in args.grid}
    write_json(args.out, {"source": args.source, "learning_rates": args.learning_rates,
                          "grids": {spec.name: dataclasses.asdict(spec) for spec in args.grid}, "results": summary})
    for name, result in summary.items():
        complete = sum(p["complete"] for p in result["points"])
        print(f"{name}: {result['trials']} trials, {complete} of {len(result['points'])} points with trials complete")
    if args.pack:
        trials = [trial for spec in args.grid for trial in finished_trials(args.run_dir / spec.name)]
        print(f"packed {pack(args.run_dir, trials, KEPT_FILES, args.pack)} trials into {args.pack}")


if __name__ == "__main__":
    main()
