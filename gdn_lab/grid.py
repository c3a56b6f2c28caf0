"""Experiment grids: every point trained at several learning rates and seeds, scored, summarised.

The protocol a claim needs (zoology's best-of-grid learning rate, several seeds, mean and
spread), as three calls over the one training loop:

    points = [({"model": "GDN", "num_kv_pairs": 4}, gdn_config, mqar_data), ...]
    trials = grid.expand(points, TrainConfig(steps=3000, stop_at_val_acc=0.99),
                         learning_rates=[3e-4, 1e-3, 3e-3], seeds=[0, 1, 2])
    records = grid.run(trials, "runs/02/mqar", score=functools.partial(recall.evaluate_task, batch_size=256))
    best = grid.best_over_lr(records, "accuracy")      # one record per (point, seed): its best rate
    table = grid.over_seeds(best, "accuracy")           # one row per point: mean, std, range over seeds

A trial is one (point, learning rate, seed): its run directory is
`run_dir/<point>/lr<rate>_seed<seed>`, holding train's checkpoints and `trial.json` (the record)
once it finished. `run` reads finished trials back and resumes interrupted ones from their last
checkpoint, so a sweep continues across Colab disconnects and device calls; settings that differ
from a folder's saved ones stop it with one line. With `workers > 1` trials train in that many
processes (spawned; for small models on one large GPU, which a single run leaves mostly idle).
A trial whose loss diverges is recorded with status 'diverged' and scores as the worst.

The seed sets the model's initialisation and, for data with a `replace(seed=...)` (task data),
the training and validation streams: the spread over seeds covers both.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import math
import multiprocessing
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig, TrainConfig
from .env import pick_device
from .models import CausalLM, build_model
from .results import load_json, write_json
from .stats import summarize
from .train import TrainingDiverged, read_checkpoint, train

TRIAL_FILE = "trial.json"
FINAL_CHECKPOINT = "checkpoints/final.pt"  # a finished run's weights, under its folder
Score = Callable[[CausalLM, Any], dict]


@dataclass
class Trial:
    """One run of a grid: `labels` name the point (JSON values, e.g. {"model": "GDN", "seq_len": 64}),
    `train_config` carries its learning rate and seed, `data` is any batch source."""

    labels: dict
    config: ModelConfig
    data: Any
    train_config: TrainConfig

    @property
    def point(self) -> str:
        """The point's folder name: 'model-GDN_seq_len-64' (labels in order; other characters become '-')."""
        text = "_".join(f"{key}-{value}" for key, value in self.labels.items())
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")

    @property
    def folder(self) -> str:
        return f"{self.point}/lr{self.train_config.lr:g}_seed{self.train_config.seed}"


def expand(points: Iterable[tuple[dict, ModelConfig, Any]], train_config: TrainConfig,
           learning_rates: Sequence[float] | None = None, seeds: Sequence[int] | None = None) -> list[Trial]:
    """Every (labels, config, data) point at every rate in `learning_rates` (default: train_config.lr)
    and seed in `seeds` (default: train_config.seed), in that nesting order."""
    rates = list(learning_rates) if learning_rates else [train_config.lr]
    seeds = list(seeds) if seeds else [train_config.seed]
    trials = []
    for labels, config, data in points:
        for seed in seeds:
            seeded = data.replace(seed=seed) if hasattr(data, "replace") and hasattr(data, "seed") else data
            trials += [Trial(dict(labels), config, seeded,
                             train_config.replace(lr=float(rate), seed=int(seed), seq_len=seeded.seq_len))
                       for rate in rates]
    return trials


# Settings that do not change what a run computes: a run made with other values is still this run.
RUN_INDEPENDENT = {"model": {"backend", "recompute_gdn"}, "train": {"device", "log_every", "save_every"}}


def check_run_dir(run_dir: str | pathlib.Path, config: ModelConfig, train_config: TrainConfig, data,
                  argument: str = "run_dir") -> None:
    """ConfigError (one line) when `run_dir` holds a run made with other model, training or data
    settings than these (`RUN_INDEPENDENT` fields aside); nothing when it holds none or the same.
    `argument`: the caller's parameter the message tells the user to change."""
    saved_path = pathlib.Path(run_dir, "config.json")
    if not saved_path.exists():
        return
    describe = data.describe() if hasattr(data, "describe") else None
    wanted = json.loads(json.dumps({"model": config.to_dict(), "train": train_config.to_dict(), "data": describe},
                                   default=str))
    saved = load_json(saved_path)
    # a field added since the run was saved held its default there
    defaults = {section: json.loads(json.dumps({item.name: item.default for item in dataclasses.fields(cls)
                                                if item.default is not dataclasses.MISSING}))
                for section, cls in (("model", ModelConfig), ("train", TrainConfig))}
    for section in ("model", "train", "data"):
        old, new = saved.get(section), wanted.get(section)
        if old is None or new is None:  # a run directory made without data settings (or data without them)
            continue
        old = {**defaults.get(section, {}), **old}
        for key in sorted(set(old) | set(new)):
            if key not in RUN_INDEPENDENT.get(section, ()) and old.get(key) != new.get(key):
                raise ConfigError(f"{run_dir} holds a run with {section} {key}={old.get(key)!r}, not {new.get(key)!r}; "
                                  f"pass another {argument} or delete {run_dir}")


def _run_one(trial: Trial, folder: pathlib.Path, score: Score | None, progress: bool) -> dict:
    """Train, score and record one trial (the body of a worker)."""
    torch.manual_seed(trial.train_config.seed)
    model = build_model(trial.config)
    record = {**trial.labels, "lr": trial.train_config.lr, "seed": trial.train_config.seed,
              "num_params": model.num_params(), "run_dir": str(folder)}
    try:
        result = train(model, trial.train_config, trial.data, folder, resume="auto", progress=progress)
    except TrainingDiverged as err:
        record.update(status="diverged", error=str(err))
    else:
        metrics = result.metrics
        record.update(status="ok", steps=metrics["steps"], stopped_early=metrics.get("stopped_early", False),
                      tokens=metrics["tokens"], train_seconds=metrics["train_seconds"],
                      final_val_loss=metrics["final_val_loss"], final_val_acc=metrics["final_val_acc"],
                      **(score(model, trial.data) if score is not None else {}))
    write_json(folder / TRIAL_FILE, record)
    del model
    _release_gpu_memory()
    return record


def _release_gpu_memory() -> None:
    """Hand a finished trial's GPU memory back (its CUDA-graph pools and cached blocks): a worker
    process trains trial after trial, and 13 processes that kept theirs filled an H200's 140 GB."""
    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def run(trials: Sequence[Trial], run_dir: str | pathlib.Path, score: Score | None = None, workers: int = 1,
        progress: bool = False) -> list[dict]:
    """Train every trial not finished yet in `run_dir`, score it with `score(model, data)` (a dict
    merged into its record; must be picklable when workers > 1: a module-level function or a
    functools.partial of one), and return the records in the order of `trials`.

    A record holds the labels, lr, seed, num_params, run_dir, status ('ok' | 'diverged'), steps,
    stopped_early, tokens, train_seconds, final_val_loss, final_val_acc and the score's keys.
    """
    run_dir = pathlib.Path(run_dir)
    folders = [run_dir / trial.folder for trial in trials]
    if len(set(folders)) != len(folders):
        raise ConfigError("two trials share a folder: give points distinct labels")
    for trial, folder in zip(trials, folders, strict=True):
        check_run_dir(folder, trial.config, trial.train_config, trial.data)
    # a record read back names the folder it is in now (a pack of finished trials moves between machines)
    records: list[dict | None] = [{**load_json(f / TRIAL_FILE), "run_dir": str(f)} if (f / TRIAL_FILE).exists()
                                  else None for f in folders]
    todo = [i for i, record in enumerate(records) if record is None]
    _train_trials(trials, folders, todo, records, score, workers, progress, desc=run_dir.name)
    return records


def ensure_checkpoints(trials: Sequence[Trial], run_dir: str | pathlib.Path, records: Sequence[dict],
                       select: Callable[[list[dict]], Iterable[dict]], score: Score | None = None,
                       workers: int = 1, progress: bool = False) -> list[dict]:
    """`run`'s records, where every record that `select(records)` picks (e.g. each point's best rate)
    has its final checkpoint: a finished trial without one (read back from a pack of finished trials,
    `benchmarks/partial_results.py`, which leaves checkpoints behind) is trained again, its record
    replaced, and `select` asked again until all it picks have weights for `load_model`.

    On the CPU a trial trained again gives its record again (bitwise); on a GPU the scores may move in
    the last digits, which is why `select` sees the new records.
    """
    run_dir = pathlib.Path(run_dir)
    folders = [run_dir / trial.folder for trial in trials]
    records = list(records)
    index = {str(folder): i for i, folder in enumerate(folders)}
    while True:
        missing = sorted({index[str(pathlib.Path(r["run_dir"]))] for r in select(records)
                          if r["status"] == "ok" and not has_weights(r)})
        if not missing:
            return records
        print(f"{run_dir.name}: training {len(missing)} finished trial(s) again for their weights (no final "
              f"checkpoint in their folders)")
        # each folder keeps its record until the new one replaces it (train starts afresh: no checkpoint),
        # so a pack made meanwhile still holds it
        _train_trials(trials, folders, missing, records, score, workers, progress, desc=run_dir.name)


def _train_trials(trials: Sequence[Trial], folders: Sequence[pathlib.Path], todo: Sequence[int],
                  records: list, score: Score | None, workers: int, progress: bool, desc: str) -> None:
    """Train trials[i] for i in `todo` into folders[i], in `workers` processes, and put each record at records[i]."""
    bar = tqdm(total=len(trials), initial=len(trials) - len(todo), desc=desc, disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            records[i] = _run_one(trials[i], folders[i], score, progress=False)
            bar.update()
    else:
        context, workers = multiprocessing.get_context("spawn"), min(workers, len(todo))
        # the math runs on the GPU; CPU threads beyond one per worker only fight each other (8 workers with
        # torch's default 16 threads each ran a tiny model's step 100x slower on an H200 host)
        on_gpu = pick_device(trials[0].train_config.device).type == "cuda"
        threads = 1 if on_gpu else max(1, (os.cpu_count() or 1) // workers)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                                                    initargs=(threads,)) as pool:
            futures = {pool.submit(_run_one, trials[i], folders[i], score, False): i for i in todo}
            for future in concurrent.futures.as_completed(futures):
                records[futures[future]] = future.result()
                bar.update()
    bar.close()


def has_weights(record: dict) -> bool:
    """Whether a trial record's run directory holds its final checkpoint (what `load_model` reads)."""
    return (pathlib.Path(record["run_dir"]) / FINAL_CHECKPOINT).exists()


def load_model(record: dict, backend: str | None = None) -> CausalLM:
    """The trained model of a trial record (its run directory's final checkpoint), on the CPU;
    `backend` overrides the saved config's (e.g. 'torch' to probe a GPU-trained model on the CPU)."""
    folder = pathlib.Path(record["run_dir"])
    path = folder / FINAL_CHECKPOINT
    if not path.exists():
        raise ConfigError(f"{folder} has no final checkpoint (status {record.get('status')!r}); train it first "
                          f"(grid.ensure_checkpoints trains finished trials again for their weights)")
    saved = read_checkpoint(path)  # checked against the size and sha256 saved beside it
    config = ModelConfig(**saved["model_config"])
    if backend is not None:
        config = config.replace(backend=backend)
    model = build_model(config)
    model.load_state_dict(saved["model"])
    return model.eval()


def _labels_of(records: Sequence[dict]) -> list[str]:
    """The label keys of grid records: everything before 'lr' in a record."""
    keys = list(records[0])
    return keys[:keys.index("lr")]


def _groups(records: Sequence[dict], by_seed: bool) -> list[list[dict]]:
    """The records grouped by point (labels equal), and by seed too with `by_seed`, in first-seen order."""
    labels = _labels_of(records)
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = tuple(json.dumps(record.get(name), sort_keys=True) for name in labels)
        groups.setdefault(key + ((record["seed"],) if by_seed else ()), []).append(record)
    return list(groups.values())


def best_over_lr(records: Sequence[dict], metric: str, higher_is_better: bool = True) -> list[dict]:
    """For each (point, seed), the record of the learning rate with the best `metric` (ties: lower
    final_val_loss; a diverged run is the worst), with "lr_scores" {rate: metric} added. As in
    zoology the choice is made on the scores themselves: it reports what the best rate reached."""
    if not records:
        return []

    def rank(record: dict) -> tuple:
        value = record.get(metric)
        if value is None:
            return (0, 0.0, 0.0)
        return (1, value if higher_is_better else -value, -(record.get("final_val_loss") or 0.0))

    best = []
    for group in _groups(records, by_seed=True):
        chosen = dict(max(group, key=rank))
        chosen["lr_scores"] = {f"{r['lr']:g}": r.get(metric) for r in group}
        best.append(chosen)
    return best


def at_grid_edge(best: Sequence[dict], metric: str | None = None, solved: float | None = None,
                 min_rates: int = 3) -> dict[str, list[dict]]:
    """Of `best_over_lr`'s records, those that kept the lowest or the highest rate their point was
    trained at (a grid of `min_rates` rates or more: of two, every choice is an edge):
    {"lowest": [...], "highest": [...]}. A point at an
    edge may do better beyond the grid; many there say the grid is misplaced. With `metric` and
    `solved`, a record whose metric reached `solved` is left out (it cannot do better: several rates
    often tie there, and the tie-break picks one).

    >>> rows = [{"lr": 3e-4, "lr_scores": {"0.0003": 0.9, "0.001": 0.5, "0.003": 0.1}},
    ...         {"lr": 1e-3, "lr_scores": {"0.0003": 0.4, "0.001": 0.8, "0.003": 0.2}}]
    >>> {side: [r["lr"] for r in rows] for side, rows in at_grid_edge(rows).items()}
    {'lowest': [0.0003], 'highest': []}
    """
    edges: dict[str, list[dict]] = {"lowest": [], "highest": []}
    for record in best:
        if metric is not None and solved is not None and (record.get(metric) or 0.0) >= solved:
            continue
        rates = sorted(float(rate) for rate in record["lr_scores"])
        for side, edge in (("lowest", rates[0]), ("highest", rates[-1])):
            if len(rates) >= max(2, min_rates) and math.isclose(record["lr"], edge, rel_tol=1e-5):  # keys: 6 digits
                edges[side].append(record)
    return edges


NICE_MANTISSAS = (1.0, 2.0, 3.0, 5.0)  # learning rates as people write them: 1, 2, 3 or 5 x 10^k


def beyond_edge(rates: Sequence[float], side: str) -> float:
    """The rate one grid step past the `side` ("lowest" | "highest") edge of `rates`: the edge's ratio
    to its neighbour applied once more, rounded in log space to 1, 2, 3 or 5 x 10^k (and kept
    strictly beyond the edge).

    >>> beyond_edge([3e-4, 1e-3, 3e-3], "lowest"), beyond_edge([3e-4, 1e-3, 3e-3], "highest")
    (0.0001, 0.01)
    >>> beyond_edge([1e-4, 3e-4, 1e-3, 3e-3], "lowest")
    3e-05
    """
    rates = sorted(float(rate) for rate in rates)
    if len(rates) < 2 or side not in ("lowest", "highest"):
        raise ConfigError(f"beyond_edge needs two rates or more and side 'lowest' or 'highest', not {rates}, {side!r}")
    edge, neighbour = (rates[0], rates[1]) if side == "lowest" else (rates[-1], rates[-2])
    exact = edge * edge / neighbour
    exponent = math.floor(math.log10(exact))
    candidates = [m * 10.0 ** e for e in (exponent - 1, exponent, exponent + 1) for m in NICE_MANTISSAS]
    nice = min(candidates, key=lambda rate: abs(math.log10(rate / exact)))
    nice = float(f"{nice:.1g}")  # 1e-4, not 0.00010000000000000002
    beyond = nice < edge if side == "lowest" else nice > edge
    return nice if beyond and not math.isclose(nice, edge, rel_tol=1e-5) else exact


def _beats_inward_neighbour(record: dict, side: str, higher_is_better: bool) -> bool:
    """Whether a best-of-grid record at its grid's `side` edge scored strictly better than the next rate
    inward: a choice made by the tie-break among equal scores says nothing about rates beyond."""
    scores = sorted(((float(rate), value) for rate, value in record["lr_scores"].items()), key=lambda item: item[0])
    edge, inward = (scores[0][1], scores[1][1]) if side == "lowest" else (scores[-1][1], scores[-2][1])
    if edge is None:
        return False
    if inward is None:
        return True
    return edge > inward if higher_is_better else edge < inward


def extend_at_edges(trials: Sequence[Trial], run_dir: str | pathlib.Path, records: Sequence[dict], metric: str,
                    higher_is_better: bool = True, solved: float | None = None, rounds: int = 1,
                    score: Score | None = None, workers: int = 1, progress: bool = False
                    ) -> tuple[list[Trial], list[dict]]:
    """Bracket every best rate: `run`'s trials and records, with one more trial a grid step beyond the
    edge (`beyond_edge`: 1e-4 below {3e-4, 1e-3, 3e-3}, 1e-2 above) for each (point, seed) whose best
    rate is the lowest or the highest it was trained at and scored strictly better there than at the
    next rate inward (`at_grid_edge`); up to `rounds` times. Left alone: a best trial that stopped
    early (it reached its training target, `TrainConfig.stop_at_val_acc`, and a rate beyond would
    stop there too) and, with `solved` (a metric where higher is better), one whose metric reached
    it. A best rate at the edge of its grid is not a tuned rate: the optimum may lie beyond it
    (zoology sweeps 1e-4 .. 1e-2). A grid of two rates grows toward the better one: three rates for
    the price of a third where the first two say where to look. Resumable as `run` is.

    Returns (trials, records) with the new ones appended, aligned as `run`'s, for `best_over_lr`,
    `ensure_checkpoints` and the rest.
    """
    if solved is not None and not higher_is_better:
        raise ConfigError(f"solved={solved} is a threshold to reach from below; a metric to minimise "
                          f"({metric!r}, higher_is_better=False) takes solved=None")
    run_dir = pathlib.Path(run_dir)
    trials, records = list(trials), list(records)
    for _ in range(max(0, rounds)):
        index = {str(run_dir / trial.folder): i for i, trial in enumerate(trials)}
        best = best_over_lr(records, metric, higher_is_better)
        edges = at_grid_edge(best, metric if solved is not None else None, solved, min_rates=2)
        extra = []
        for side, rows in edges.items():
            for record in rows:
                if not record.get("stopped_early") and _beats_inward_neighbour(record, side, higher_is_better):
                    trial = trials[index[str(pathlib.Path(record["run_dir"]))]]
                    rate = beyond_edge(record["lr_scores"], side)  # its keys are the rates trained
                    extra.append(dataclasses.replace(trial, train_config=trial.train_config.replace(lr=rate)))
        if not extra:
            break
        where = ", ".join(f"{t.point} seed {t.train_config.seed} at {t.train_config.lr:g}" for t in extra)
        print(f"{run_dir.name}: {len(extra)} best rate(s) at the edge of their grid, one trial beyond each: {where}")
        trials += extra
        records += run(extra, run_dir, score=score, workers=workers, progress=progress)
    return trials, records


def over_seeds(records: Sequence[dict], metric: str) -> list[dict]:
    """One row per point: its labels, `metric` summarised over seeds (`stats.summarize`: mean, std,
    min, max, spread, n, failed, values), the seeds and the learning rates the records used."""
    if not records:
        return []
    labels = _labels_of(records)
    rows = []
    for group in _groups(records, by_seed=False):
        group = sorted(group, key=lambda r: r["seed"])
        rows.append({**{key: group[0][key] for key in labels}, **summarize([r.get(metric) for r in group]),
                     "metric": metric, "seeds": [r["seed"] for r in group], "lrs": [r["lr"] for r in group]})
    return rows


def find_row(rows: Sequence[dict], **match) -> dict:
    """The one row whose fields equal `match`, e.g. `find_row(table, model="GDN", seq_len=512)`."""
    found = [r for r in rows if all(r.get(key) == value for key, value in match.items())]
    if len(found) != 1:
        raise ConfigError(f"{len(found)} rows match {match}; add fields until one does")
    return found[0]
