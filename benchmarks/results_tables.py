"""The README's tables of the research notebooks' committed GPU results, written from the JSON alone.

    python3 benchmarks/results_tables.py            # print the tables
    python3 benchmarks/results_tables.py --write    # put them into README.md between the markers

The README holds them between `<!-- results-tables:begin -->` and `<!-- results-tables:end -->`;
tests/test_benchmarks.py checks that the block equals what this script writes from
`benchmarks/results/`, so a number in those tables cannot drift from the file it came from.
Cells: mean over seeds [worst, best] (each seed at its best rate); a point whose trials have not all
finished shows each seed's best so far and how many trials finished (e.g. "4/6 trials").
"""
from __future__ import annotations

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results-tables:begin -->", "<!-- results-tables:end -->"


ORDER = ["GDN", "GDN slow decay", "DeltaNet", "Transformer", "Transformer (no conv)", "Hybrid"]


def _cell(summary: dict, point: dict) -> str:
    """A complete point: mean [worst, best] over seeds. An unfinished one: each seed's best so far and
    how many of its trials finished (a mean over unfinished seeds would mislead)."""
    if summary["mean"] is None:
        return "n/a"
    if not point["complete"]:
        seeds = ", ".join(f"seed {s} {v:.3f}" for s, v in zip(summary["seeds"], summary["values"], strict=True))
        return f"{seeds} ({point['finished_trials']}/{point['expected_trials']} trials)"
    return f"{summary['mean']:.3f} [{summary['min']:.3f}, {summary['max']:.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def _grid_table(points: list[dict], row_key: str, column_key: str, metric: str, column_name) -> str:
    rows = sorted(dict.fromkeys(p[row_key] for p in points),
                  key=lambda r: ORDER.index(r) if r in ORDER else len(ORDER))
    columns = sorted({p[column_key] for p in points}, key=lambda c: (isinstance(c, str), c))
    found = {(p[row_key], p[column_key]): p for p in points}
    body = [[row] + [_cell(found[row, c][metric], found[row, c]) if (row, c) in found else "not run" for c in columns]
            for row in rows]
    return _table([row_key] + [column_name(c) for c in columns], body)


def mqar_table() -> str:
    payload = json.loads((RESULTS / "02_toy_tasks" / "partial_protocol_h200.json").read_text())
    points = payload["results"]["mqar"]["points"]
    pairs = {p["seq_len"]: p["num_kv_pairs"] for p in points}
    return (f"MQAR accuracy (notebook 02; {payload['source']}):\n\n"
            + _grid_table(points, "model", "seq_len", "accuracy", lambda t: f"T={t}, {pairs[t]} pairs"))


def passkey_table() -> str:
    payload = json.loads((RESULTS / "05_long_context" / "partial_passkey_h200.json").read_text())
    points = payload["results"]["passkey"]["points"]
    return (f"Passkey exact match at the training length (notebook 05; {payload['source']}):\n\n"
            + _grid_table(points, "model", "haystack", "exact_match", lambda h: f"{h} haystack"))


def hybrids_table() -> str:
    """Every variant at each rate (first seed), then its best rate over all its seeds."""
    payload = json.loads((RESULTS / "04_hybrids" / "sweep.json").read_text())
    runs, summary = payload["results"]["runs"], payload["results"]["summary"]
    rates = sorted({r["lr"] for r in runs})
    names = list(dict.fromkeys(r["name"] for r in runs))
    loss = {(r["name"], r["lr"]): r for r in runs if r["seed"] == payload["config"]["train"]["seed"]}

    def cell(name: str, lr: float) -> str:
        run = loss.get((name, lr))
        return "not run" if run is None else f"{run['final_val_loss']:.4f}" if run["status"] == "ok" else run["status"]

    def best(name: str) -> str:
        row = summary[name]
        if row["mean"] is None:
            return "diverged at every rate"
        values = f"{row['mean']:.3f} [{row['min']:.3f}, {row['max']:.3f}]" if row["n"] > 1 else f"{row['mean']:.3f}"
        return f"{values} ({row['n']} seed{'s' if row['n'] > 1 else ''} at {row['lr']:g})"

    body = [[name] + [cell(name, lr) for lr in rates] + [best(name)] for name in names]
    env, steps = payload["environment"], payload["config"]["train"]["steps"]
    reused = sum(bool(r.get("reused")) for r in runs)
    provenance = f"commit {env['git_commit']}" + (f"; {reused} of the {len(runs)} runs read back from an earlier "
                                                  f"session's finished runs" if reused else "")
    return (f"Hybrids, final validation loss (nats per byte): each rate at the first seed, then the best rate "
            f"over its seeds (notebook 04; {steps} steps; {env['device_name']}, {provenance}):\n\n"
            + _table(["variant"] + [f"lr {lr:g}" for lr in rates] + ["best rate, mean [worst, best]"], body))


def state_table() -> str:
    payload = json.loads((RESULTS / "02_toy_tasks" / "partial_protocol_h200.json").read_text())
    points = payload["results"]["state"]["points"]
    if not points:
        return ""
    return ("MQAR accuracy against the GDN state's key dims per layer, H*K (notebook 02; its defaults: 64 pairs "
            "in 256 tokens; "
            f"{payload['source']}):\n\n"
            + _grid_table(points, "model", "state_key_dims", "accuracy", lambda k: f"H*K={k}"))


def scaling_table() -> str:
    path = RESULTS / "08_scaling" / "partial_runs_h200.json"
    if not path.exists():
        return ""
    payload = json.loads(path.read_text())
    points = payload["results"]["runs"]["points"]
    return (f"Scaling, final validation loss (nats per byte) by size (notebook 08, partial; {payload['source']}):\n\n"
            + _grid_table(points, "arch", "shape", "final_val_loss", lambda s: f"{s}"))


def tables() -> str:
    return "\n\n".join(t for t in [mqar_table(), state_table(), hybrids_table(), passkey_table(), scaling_table()] if t)


def block() -> str:
    return f"{BEGIN}\n{tables()}\n{END}"


def readme_block(text: str) -> str | None:
    """The marked block of `text` (markers included), or None."""
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN): text.index(END) + len(END)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the README's marked block")
    args = parser.parse_args(argv)
    if not args.write:
        print(tables())
        return
    text = README.read_text()
    old = readme_block(text)
    if old is None:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block to replace")
    README.write_text(text.replace(old, block()))
    print("README.md tables written")


if __name__ == "__main__":
    main()
