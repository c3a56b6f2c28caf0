"""The measuring protocol over `gdn_lab.grid`: a learning rate tuned per point at the first seed,
then the other seeds at that rate.

A grid of every rate at every seed (notebook 02's protocol) costs rates x seeds runs per point;
this one costs rates + seeds - 1, which is what lets a dozen variants on two tasks (notebook 07)
or a ladder of sizes (notebook 08) fit one GPU session:

    points = [({"variant": "GDN"}, gdn_config, data), ({"variant": "no conv"}, no_conv_config, data)]
    result = tune_then_seed(points, TrainConfig(steps=600), "runs/07/lm", learning_rates=[1e-3, 3e-3],
                            seeds=[0, 1, 2], metric="final_val_loss", higher_is_better=False)
    result.table       # one row per point: mean, std, range over seeds (grid.over_seeds), its chosen rate

1. Every point trains at every rate of `learning_rates` with the first seed; its rate is the one
   with the best `metric` (`grid.best_over_lr`: a diverged run is the worst).
2. Every point trains again at its chosen rate with each further seed. A seed sets the model's
   initialisation and the data stream: task data draws other batches (`TaskData.replace(seed=...)`),
   text data shuffles its windows in another order (`sweep.seeded_data`); validation stays fixed.
The first seed's number is the best of the grid and the others are not, so the spread over seeds
includes the luck of the rate choice, and the mean leans slightly optimistic (as zoology's
best-of-grid does for every seed). A point may carry its own TrainConfig as a fourth element (a
size ladder at a fixed tokens-per-parameter budget: steps from the size). Everything is resumable
as `grid.run` is: finished trials are read back, interrupted ones continue from their checkpoint.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import grid
from .config import ConfigError, TrainConfig
from .sweep import seeded_data

Point = tuple  # (labels, ModelConfig, data) or (labels, ModelConfig, data, TrainConfig)


@dataclass
class ProtocolResult:
    """`records`: every trial's record (grid phase, then the seeds); `best`: one record per (point,
    seed), the first seed's at its best rate (with "lr_scores"); `table`: `grid.over_seeds(best,
    metric)`, one row per point with "chosen_lr" added; `metric`, `higher_is_better` as run."""

    records: list[dict]
    best: list[dict]
    table: list[dict]
    metric: str
    higher_is_better: bool

    def row(self, **match) -> dict:
        """The table row whose labels equal `match` (`grid.find_row`)."""
        return grid.find_row(self.table, **match)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "table": self.table,
                "best": self.best, "records": self.records}


def _key(labels: dict, record: dict | None = None) -> str:
    source = labels if record is None else {key: record.get(key) for key in labels}
    return json.dumps(source, sort_keys=True)


def tune_then_seed(points: Sequence[Point], train_config: TrainConfig, run_dir: str | pathlib.Path,
                   learning_rates: Sequence[float], seeds: Sequence[int], metric: str,
                   higher_is_better: bool = True, score: grid.Score | None = None, workers: int = 1,
                   progress: bool = False, extend_grid: int = 0) -> ProtocolResult:
    """Run the protocol (module docstring) over `points` in `run_dir` (`grid.run`'s folders:
    `run_dir/<point>/lr<rate>_seed<seed>`) and summarise `metric` over `seeds`.

    `score(model, data)`: extra numbers per trial (e.g. `recall.evaluate_task`; None for text, whose
    record already holds final_val_loss). `workers`: trials trained side by side (`grid.run`).
    `extend_grid`: rounds of `grid.extend_at_edges` on the first seed's grid before a rate is chosen
    (a point whose best rate is the grid's lowest or highest gets one more rate beyond it per round).
    """
    if not points:
        raise ConfigError("no points to run; give at least one (labels, config, data)")
    if not learning_rates:
        raise ConfigError("learning_rates is empty; give one rate or more (one rate: no tuning)")
    if not seeds:
        raise ConfigError("seeds is empty; give at least one seed")
    plans = [(dict(p[0]), p[1], p[2], p[3] if len(p) > 3 else train_config) for p in points]
    names = list(plans[0][0]) if plans else []
    if any(list(labels) != names for labels, *_ in plans):
        raise ConfigError(f"every point needs the same label names in the same order ({names}); "
                          "add the missing ones")
    keys = [_key(labels) for labels, *_ in plans]
    if len(set(keys)) != len(keys):
        raise ConfigError("two points share their labels: give every point distinct labels")
    first, extra = int(seeds[0]), [int(s) for s in seeds[1:]]

    tuning = [trial for labels, config, data, config_t in plans
              for trial in grid.expand([(labels, config, data)], config_t, learning_rates, [first])]
    records = grid.run(tuning, run_dir, score=score, workers=workers, progress=progress)
    tuning, records = grid.extend_at_edges(tuning, run_dir, records, metric, higher_is_better, rounds=extend_grid,
                                           score=score, workers=workers, progress=progress)
    tuned = grid.best_over_lr(records, metric, higher_is_better)
    chosen = {key: next(r["lr"] for r in tuned if _key(labels, r) == key)
              for (labels, *_), key in zip(plans, keys)}

    repeats = [trial for (labels, config, data, config_t), key in zip(plans, keys) for seed in extra
               for trial in grid.expand([(labels, config, seeded_data(data, seed - first))],
                                        config_t.replace(lr=chosen[key]), None, [seed])]
    repeated = grid.run(repeats, run_dir, score=score, workers=workers, progress=progress) if repeats else []
    best = tuned + grid.best_over_lr(repeated, metric, higher_is_better)
    table = [{**row, "chosen_lr": chosen[_key(dict.fromkeys(names), row)]} for row in grid.over_seeds(best, metric)]
    return ProtocolResult(records + repeated, best, table, metric, higher_is_better)


def total(result: ProtocolResult, key: str) -> Any:
    """The sum of `key` over every trial record (missing values count 0): train_seconds, tokens."""
    return sum(r.get(key) or 0 for r in result.records)


def lr_grid(result: ProtocolResult, label: str | Sequence[str]) -> dict[str, tuple[list[float], list[float | None]]]:
    """The rate grid of the first seed as `gdn_lab.viz.line_plot` series: {point name: (rates, metric at
    each rate)}, the name being the value of `label` (several labels: their values joined by ' ')."""
    names = [label] if isinstance(label, str) else list(label)
    first = min(r["seed"] for r in result.best)
    series = {}
    for record in result.best:
        if record["seed"] == first:
            rates = sorted(record["lr_scores"], key=float)
            series[" ".join(str(record[n]) for n in names)] = ([float(r) for r in rates],
                                                               [record["lr_scores"][r] for r in rates])
    return series
