"""Sweeps: several model variants through the one training loop, each at its best learning rate,
the best of them over several seeds, collected into one table.

    base = ModelConfig(vocab_size=data.vocab_size, hidden_size=256, num_layers=8, num_heads=4, head_dim=64,
                       attn_num_heads=4)
    variants = hybrid_variants(base, ["gdn", "transformer", "sparse", "alternating", "late"])
    sweep = run_sweep(variants, TrainConfig(steps=440, batch_size=48, seq_len=1024), data, "runs/hybrids",
                      learning_rates=[1e-3, 2e-3, 4e-3], seeds=3, seeded=3)
    print(sweep.table())                   # per variant: chosen lr, loss mean ± std over seeds
    print(rank_stability(sweep))           # does the order hold over the last 30% of training?

The protocol. Every run uses `gdn_lab.train.train` with the same steps, batch and sequence length.
1. Learning rates: with `learning_rates`, every variant trains at every rate with the first seed
   (`train_config.seed`); its rate is the one with the lowest final validation loss
   (`gdn_lab.grid.best_over_lr`). Without, one rate per variant from `lr_by_variant` (default
   `seed_learning_rate`, the seed's rule: 1e-3 pure GDN, 2e-3 anything with attention).
2. Seeds: the `seeded` best variants (by that loss) train again at their chosen rate with seeds
   seed+1, ..., seed+seeds-1. A seed sets the model's initialisation and the order of the training
   batches (data with a `seed`: its shuffle seed moves by the same offset); the validation
   batches stay the same, and within one seed every variant sees the same batches.
3. Summary per variant: final validation loss over its seeds (`gdn_lab.grid.over_seeds` ->
   `gdn_lab.stats.summarize`); two variants tie when their means differ by no more than the larger
   seed range (`gdn_lab.stats.compare`), a variant with one seed borrowing the largest range
   measured in the sweep (`SweepResult.noise`).

Each run (variant, lr, seed) gets its own run directory `sweep_dir/<name>/lr<lr>_seed<seed>`.
Resumable: a run that finished (its metrics.json exists) is read back, not retrained; an
interrupted one resumes from its newest checkpoint (`resume='auto'`). So a Colab disconnect
costs at most the run in progress, and of that only the steps since its last checkpoint.
Settings that differ from those a run directory was made with stop the sweep before anything of
that phase trains (one-line ConfigError). A run whose loss diverges is recorded with status
'diverged' (the worst rate of a grid) and the sweep goes on.

Files: `sweep_dir/sweep.json` (the SweepResult, rewritten after every run),
`sweep_dir/<name>/lr<lr>_seed<seed>/` (train's run directory, plus `variant.json`: status, peak
memory, wall time), `sweep_dir/budget.json` (the plan of `budget_train_config`, when one was made).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import grid, stats
from .config import MIXER_LAYER_FIELDS, ConfigError, ModelConfig, TrainConfig
from .env import pick_device
from .models import build_model, count_params
from .results import load_json, save_results, write_json
from .train import TrainingDiverged, train

# The seed's hybrid study (exp10): pure GDN, pure transformer, the three named hybrids and the
# k/12 ratios 1/12, 3/12, 5/12 (8%, 25%, 42%), written as ratios so they carry to any depth.
SEED_PATTERNS = ("gdn", "transformer", "sparse", "alternating", "late", "ratio:8", "ratio:25", "ratio:42")
# What the seed reported for exp10 (H100). Its "DeltaNet" is the pure Gated DeltaNet model, 'gdn' here.
SEED_EXP10 = {
    "val_loss": {"sparse": 4.055, "gdn": 4.396, "transformer": 5.146},
    "hidden_size": 768, "num_layers": 12, "num_heads": 12, "seq_len": 1024, "batch_size": 48, "steps": 1000,
    "tokens": 49_152_000, "params": "188M-302M", "lr": {"gdn": 1e-3, "attention": 2e-3},
}
# The anchor at convergence: in the GDN paper (arXiv 2412.06464) the transformer (Transformer++) trails
# pure Gated DeltaNet by about 0.1 nat per token at 1.3B parameters and 100B tokens.
GDN_PAPER_TRANSFORMER_GAP = {"nats": 0.1, "params": "1.3B", "tokens": "100B", "source": "arXiv 2412.06464"}
SWEEP_FILE, VARIANT_FILE, BUDGET_FILE = "sweep.json", "variant.json", "budget.json"
_NAME = re.compile(r"[A-Za-z0-9._+-]+")


def variant_name(pattern: str) -> str:
    """A run-directory name for a hybrid pattern: 'ratio:25' -> 'ratio25', '3/12' -> '3of12', 'sparse' -> 'sparse'."""
    return pattern.replace("ratio:", "ratio").replace("/", "of")


def hybrid_variants(base: ModelConfig,
                    patterns: Sequence[str] | Mapping[str, str | Sequence[int]] = SEED_PATTERNS,
                    mixer: str = "attn") -> dict[str, ModelConfig]:
    """`base` with the layers of each pattern given to `mixer`, every other layer Gated DeltaNet:
    {name: ModelConfig}.

    `patterns`: pattern names (see `gdn_lab.config.hybrid_layers`; each variant is named by
    `variant_name`), or {name: pattern or layer indices}. The default is the seed's study; at 12
    layers it gives gdn (), transformer (0..11), sparse (5, 11), alternating (1, 3, ..., 11),
    late (8, 9, 10, 11), ratio8 (11,), ratio25 (3, 7, 11), ratio42 (1, 4, 6, 9, 11): the k/12
    layers are spaced evenly, ending at the last layer (the seed does not say where they go).
    `mixer`: 'attn' (full attention) or 'swa' (sliding-window attention of `base.swa_window`
    tokens), e.g. `hybrid_variants(base, {"gdn+swa": "sparse"}, mixer="swa")`.
    """
    if mixer not in MIXER_LAYER_FIELDS:
        raise ConfigError(f"mixer={mixer!r}; use one of {sorted(MIXER_LAYER_FIELDS)} (the other layers are 'gdn')")
    named = dict(patterns) if isinstance(patterns, Mapping) else {variant_name(p): p for p in patterns}
    cleared = {name: () for name in MIXER_LAYER_FIELDS.values()}
    return {name: base.replace(**{**cleared, MIXER_LAYER_FIELDS[mixer]: layers if isinstance(layers, str)
                                  else tuple(layers)})
            for name, layers in named.items()}


def seed_learning_rate(config: ModelConfig, gdn_lr: float = 1e-3, attention_lr: float = 2e-3) -> float:
    """The seed's rule: `gdn_lr` (1e-3) for a pure Gated DeltaNet model, `attention_lr` (2e-3) for
    hybrids and the transformer (sliding-window attention counts as attention)."""
    return attention_lr if config.attention_ratio else gdn_lr


LAYOUT_LETTERS = {"gdn": "G", "attn": "A", "swa": "S"}


def layout(config: ModelConfig) -> str:
    """One letter per layer, first layer first: 'G' Gated DeltaNet, 'A' attention, 'S' sliding-window
    attention ('GGGGGAGGGGGA': sparse at 12)."""
    return "".join(LAYOUT_LETTERS[mixer] for mixer in config.mixers)


@dataclass
class VariantResult:
    """One run of a sweep: variant `name` at learning rate `lr` and seed `seed`. Losses are mean
    cross-entropy per token (nats) on the validation batches; `tokens_per_second` counts training
    steps only (train_seconds, no evaluation); `wall_seconds` is the wall clock of the train call
    that finished the run (evaluations and checkpoint writes included; after a resume only the
    resumed part); `peak_memory_mib` is `torch.cuda.max_memory_allocated` over that call (None on
    the CPU). `curve` holds one record per evaluation: step, tokens, train_loss (of that step), val_loss."""

    name: str
    attn_layers: tuple[int, ...]
    layout: str
    attention_ratio: float
    lr: float
    params: int
    status: str
    seed: int = 0
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    peak_memory_mib: float | None = None
    run_dir: str | None = None
    reused: bool = False
    error: str | None = None
    curve: list[dict] = field(default_factory=list)


@dataclass
class SweepResult:
    """Every run of a sweep (`runs`: variants in the order given, each variant's learning-rate grid
    at the first seed, then the extra seeds) and its `setup`: the shared train config (before each
    run's learning rate and seed), the data description, the protocol and any notes.

    Per variant: `chosen_lr` (lowest final validation loss at the first seed), `summary` (that
    loss over seeds at the chosen rate), `ranking` (by mean), `compare` (better, worse or tie),
    and `result[name]`: the run that represents the variant (chosen rate, first seed)."""

    runs: list[VariantResult]
    setup: dict
    sweep_dir: str | None = None

    @property
    def names(self) -> list[str]:
        """The variant names, in the order they were given."""
        return list(dict.fromkeys(run.name for run in self.runs))

    def runs_of(self, name: str) -> list[VariantResult]:
        """Every run of variant `name` (KeyError names the variants there are)."""
        found = [run for run in self.runs if run.name == name]
        if not found:
            raise KeyError(f"no variant {name!r} in this sweep; it has {self.names}")
        return found

    def _records(self) -> list[dict]:
        return [{"variant": run.name, "lr": run.lr, "seed": run.seed,
                 "final_val_loss": run.final_val_loss if run.status == "ok" else None} for run in self.runs]

    def summaries(self) -> dict[str, dict]:
        """{name: summary} for every variant: `stats.summarize` of the final validation loss over its
        seeds at the chosen rate (mean, std, min, max, spread, n, failed, values), plus "variant",
        "lr" (the chosen rate), "lr_scores" ({rate: loss} of the first seed's grid; None where a run
        diverged), "seeds" and "lrs" (of the runs summarised)."""
        first_seed = min(run.seed for run in self.runs)
        best = grid.best_over_lr(self._records(), "final_val_loss", higher_is_better=False)
        chosen = {r["variant"]: r for r in best if r["seed"] == first_seed}
        at_chosen = [r for r in best if r["seed"] == first_seed or r["lr"] == chosen[r["variant"]]["lr"]]
        return {row["variant"]: {**row, "lr": chosen[row["variant"]]["lr"],
                                 "lr_scores": chosen[row["variant"]]["lr_scores"]}
                for row in grid.over_seeds(at_chosen, "final_val_loss")}

    def chosen_lr(self, name: str) -> float:
        """The learning rate of variant `name` with the lowest final validation loss at the first seed."""
        self.runs_of(name)
        return self.summaries()[name]["lr"]

    def __getitem__(self, name: str) -> VariantResult:
        """The run that represents variant `name`: at its chosen rate, first seed."""
        lr, first_seed = self.chosen_lr(name), min(run.seed for run in self.runs_of(name))
        return next(run for run in self.runs_of(name) if run.lr == lr and run.seed == first_seed)

    @property
    def noise(self) -> float | None:
        """The largest seed range (max - min final loss over seeds) among variants with two or more
        finished seeds: what a variant with one seed is taken to vary by (None: no seeds measured)."""
        spreads = [s["spread"] for s in self.summaries().values() if s["n"] >= 2]
        return max(spreads) if spreads else None

    def compare(self, a: str, b: str) -> str:
        """'better', 'worse' or 'tie': variant `a` against `b` by mean final loss (lower is better).
        A tie when the gap is within the larger seed range of the two (`stats.compare`); a variant
        with one seed counts with the sweep's `noise` as its range."""
        floor = self.noise or 0.0
        summaries = self.summaries()
        widened = [{**summaries[n], "spread": max(summaries[n]["spread"] or 0.0, floor)
                    if summaries[n]["n"] < 2 else summaries[n]["spread"]} for n in (a, b)]
        return stats.compare(*widened, higher_is_better=False)

    def ranking(self) -> list[str]:
        """Names of the variants with a finished run, best (lowest mean final validation loss) first."""
        summaries = self.summaries()
        return sorted((n for n in self.names if summaries[n]["mean"] is not None), key=lambda n: summaries[n]["mean"])

    def mean_curve(self, name: str) -> list[dict]:
        """Validation loss of variant `name` at each evaluation, averaged over its finished seeds at
        the chosen rate: [{"step", "tokens", "val_loss", "n"}] (steps every such run evaluated)."""
        lr = self.chosen_lr(name)
        curves = [run.curve for run in self.runs_of(name) if run.lr == lr and run.status == "ok" and run.curve]
        if not curves:
            return []
        steps = sorted(set.intersection(*({r["step"] for r in curve} for curve in curves)))
        by_step = [{r["step"]: r for r in curve} for curve in curves]
        return [{"step": step, "tokens": by_step[0][step]["tokens"], "n": len(curves),
                 "val_loss": sum(c[step]["val_loss"] for c in by_step) / len(curves)} for step in steps]

    def table(self) -> str:
        """One row per variant: rank, layout, attention share, chosen lr, loss mean ± std over seeds
        (n seeds), seed range, the loss at every rate of the grid, size, tokens, speed, memory."""
        summaries = self.summaries()
        ranks = {name: i + 1 for i, name in enumerate(self.ranking())}
        rates = sorted({run.lr for run in self.runs})
        width = max([len("layout")] + [len(run.layout) for run in self.runs])

        def fmt(value, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        header = (f"{'rank':>4}  {'variant':<12} {'layout':<{width}} {'attn':>5} {'lr':>8} "
                  f"{'val loss (seeds)':>24} {'range':>7}  " + " ".join(f"{f'@{r:.0e}':>8}" for r in rates)
                  + f" {'params':>8} {'tokens':>11} {'tokens/s':>10} {'peak MiB':>9}")
        lines = [header]
        for name in self.names:
            s, run = summaries[name], self[name]
            # '-': the rate diverged; blank: the variant did not train at that rate
            scores = " ".join(f"{fmt(s['lr_scores'][f'{r:g}'], '.4f') if f'{r:g}' in s['lr_scores'] else '':>8}"
                              for r in rates)
            spread = fmt(s["spread"] if s["n"] > 1 else None, ".4f")
            lines.append(
                f"{fmt(ranks.get(name), 'd'):>4}  {name:<12} {run.layout:<{width}} {run.attention_ratio:>5.0%} "
                f"{s['lr']:>8.1e} {stats.format_summary(s, 4):>24} {spread:>7}  {scores} {run.params / 1e6:>7.2f}M "
                f"{fmt(run.tokens, ',d'):>11} {fmt(run.tokens_per_second, ',.0f'):>10} "
                f"{fmt(run.peak_memory_mib, ',.0f'):>9}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data (runs as dicts, the summary per variant, the ranking) for JSON; `from_dict` reads it back."""
        return {"runs": [dataclasses.asdict(run) for run in self.runs], "summary": self.summaries(),
                "ranking": self.ranking(), "setup": self.setup, "sweep_dir": self.sweep_dir}

    def to_json(self, path: str | os.PathLike) -> pathlib.Path:
        """Write `to_dict()` with `gdn_lab.results.save_results` (environment, config and seed stamped)."""
        return save_results(path, self.to_dict(), config=self.setup, seed=self.setup.get("train", {}).get("seed"))

    @classmethod
    def from_dict(cls, payload: dict) -> SweepResult:
        """From `to_dict()`, or from a whole `save_results` file holding one (its "results" entry).
        Sweeps saved before the learning-rate grid (a "variants" list, one run each) read as one
        run per variant at seed 0."""
        if "results" in payload and "runs" not in payload and "variants" not in payload:
            payload = payload["results"]
        runs = [VariantResult(**{**run, "attn_layers": tuple(run["attn_layers"])})
                for run in payload.get("runs", payload.get("variants", []))]
        return cls(runs, payload.get("setup", {}), payload.get("sweep_dir"))

    @classmethod
    def from_json(cls, path_or_url: str | os.PathLike) -> SweepResult:
        """Load a sweep written by `to_json` (or a benchmark's results JSON): a path, or an http(s) URL
        such as the raw GitHub address of a committed result."""
        text = str(path_or_url)
        if text.startswith(("http://", "https://")):
            from urllib.request import urlopen

            with urlopen(text, timeout=60) as response:
                return cls.from_dict(json.loads(response.read()))
        if not pathlib.Path(path_or_url).is_file():
            raise ConfigError(f"no sweep result at {path_or_url}; pass the path of a sweep.json or a results JSON")
        return cls.from_dict(load_json(path_or_url))


def rank_stability(result: SweepResult, window: float = 0.3) -> dict:
    """Does the ranking hold over the last `window` of training? The variants (those that finished)
    ranked by mean validation loss (`SweepResult.mean_curve`) at every evaluation whose step is at
    least (1 - window) x the last step.

    Returns {"window", "steps" (those evaluations), "orders" (best first, one per step), "stable"
    (the same order at every one of them), "final_order", "swapped" (pairs [a, b] whose order
    changes inside the window), "evaluations" (how many; a window with one evaluation is stable
    by definition: evaluate more often)}."""
    if not 0 < window <= 1:
        raise ConfigError(f"window={window}; use a fraction of training in (0, 1], e.g. 0.3 for the last 30%")
    curves = {name: {r["step"]: r["val_loss"] for r in result.mean_curve(name)} for name in result.ranking()}
    curves = {name: curve for name, curve in curves.items() if curve}
    common = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
    last = common[-1] if common else 0
    steps = [step for step in common if step >= (1 - window) * last]
    orders = [sorted(curves, key=lambda name, s=step: curves[name][s]) for step in steps]
    swapped = [[a, b] for a, b in itertools.combinations(sorted(curves), 2)
               if len({curves[a][s] < curves[b][s] for s in steps}) > 1]
    return {"window": window, "steps": steps, "orders": orders, "stable": len({tuple(o) for o in orders}) <= 1,
            "final_order": orders[-1] if orders else [], "swapped": swapped, "evaluations": len(steps)}


def gap_over_steps(result: SweepResult, ahead: str, behind: str) -> list[dict]:
    """[{"step", "gap"}] at every evaluation both variants have: `behind`'s mean validation loss minus
    `ahead`'s (`SweepResult.mean_curve`: each at its chosen rate, mean over its seeds). A gap that
    still shrinks at the last evaluations says the budget, not the architecture, sets its final size."""
    curves = [{row["step"]: row["val_loss"] for row in result.mean_curve(name)} for name in (ahead, behind)]
    common = sorted(set(curves[0]) & set(curves[1]))
    return [{"step": step, "gap": curves[1][step] - curves[0][step]} for step in common]


def still_closing(gaps: Sequence[dict], steps: Sequence[int]) -> bool:
    """Whether the gap (`gap_over_steps`) fell from each of `steps` to the next (e.g. the evaluations
    of `rank_stability`'s window); False with fewer than two of them."""
    window = [row["gap"] for row in gaps if row["step"] in set(steps)]
    return len(window) >= 2 and all(later < earlier for earlier, later in zip(window, window[1:]))


# ----------------------------------------------------------------------------- running


def run_sweep(variants: Mapping[str, ModelConfig], train_config: TrainConfig, data, sweep_dir: str | os.PathLike,
              lr_by_variant: Mapping[str, float | Sequence[float]] | Callable[[ModelConfig], float] | None = None,
              learning_rates: Sequence[float] | None = None, seeds: int = 1, seeded: int | None = None,
              progress: bool = True, notes: dict | None = None) -> SweepResult:
    """Train every variant with `gdn_lab.train.train` on `data` under `train_config` (the protocol
    in the module docstring), each run in `sweep_dir/<name>/lr<lr>_seed<seed>`, and return the runs;
    finished runs are read back, not retrained.

    learning_rates: the grid every variant trains at (first seed), its best rate kept; None: the rates
    of each variant from `lr_by_variant` (None: `seed_learning_rate`; a function of the ModelConfig, or
    {name: lr}, or {name: [lr, ...]}: a grid of its own per variant, its best rate kept). seeds: how
    many seeds (train_config.seed and the next ones); seeded: how many of the best variants get the
    extra seeds at their chosen rate (None: all).
    Every run is seeded with its seed before its model is built. Names, learning rates and existing
    run directories are all checked before the first run trains (those of the extra seeds before
    the first extra seed). notes: facts recorded in `setup` (the corpus name, say). progress:
    train's progress bar and one line per run. A KeyboardInterrupt saves the run in training (see
    `train`) and propagates; call again to resume.
    """
    sweep_dir = pathlib.Path(sweep_dir)
    bad = [name for name in variants if not _NAME.fullmatch(name)]
    if bad:
        raise ConfigError(f"variant names {bad} cannot be folder names; use letters, digits, '.', '_', '+' and '-'")
    if learning_rates is not None and lr_by_variant is not None:
        raise ConfigError("pass learning_rates (a grid for every variant) or lr_by_variant (one rate each), not both")
    if seeds < 1:
        raise ConfigError(f"seeds={seeds}; use 1 or more (the first is train_config.seed)")
    if learning_rates is not None and not learning_rates:
        raise ConfigError("learning_rates is empty; give one rate or more, or None for lr_by_variant")
    rates = ({name: [float(r) for r in learning_rates] for name in variants} if learning_rates is not None
             else _learning_rates(variants, lr_by_variant))
    setup = {"train": train_config.to_dict(), "data": data.describe() if hasattr(data, "describe") else None,
             "protocol": {"learning_rates": None if learning_rates is None else [float(r) for r in learning_rates],
                          "seeds": seeds, "seeded": seeded},
             **(notes or {})}
    first = [(name, lr, train_config.seed) for name in variants for lr in rates[name]]
    runs: list[VariantResult] = []
    _run_all(first, variants, train_config, data, sweep_dir, setup, runs, progress)

    if seeds > 1:
        result = SweepResult(runs, setup, str(sweep_dir))
        chosen = result.ranking()[:seeded] if seeded is not None else result.ranking()
        extra = [(name, result.chosen_lr(name), train_config.seed + offset)
                 for name in variants if name in chosen for offset in range(1, seeds)]
        _run_all(extra, variants, train_config, data, sweep_dir, setup, runs, progress)
    return SweepResult(runs, setup, str(sweep_dir))


def run_folder(sweep_dir: str | os.PathLike, name: str, lr: float, seed: int) -> pathlib.Path:
    """The run directory of variant `name` at `lr` and `seed`: sweep_dir/<name>/lr<lr:g>_seed<seed>."""
    return pathlib.Path(sweep_dir, name, f"lr{lr:g}_seed{seed}")


def seeded_data(data, offset: int):
    """`data` with its shuffle seed moved by `offset` (the run's seed minus the sweep's first seed):
    `data` itself at 0 or when it has no `seed`; `data.replace(seed=...)` where it has one; else a
    shallow copy with the new seed (`LMData`: the same tokens, another order of training windows)."""
    if offset == 0 or getattr(data, "seed", None) is None:
        return data
    if hasattr(data, "replace"):
        return data.replace(seed=data.seed + offset)
    moved = copy.copy(data)
    moved.seed = data.seed + offset
    return moved


def _run_all(todo: Sequence[tuple[str, float, int]], variants: Mapping[str, ModelConfig], train_config: TrainConfig,
             data, sweep_dir: pathlib.Path, setup: dict, runs: list[VariantResult], progress: bool) -> None:
    """Train (or read back) every (name, lr, seed) of `todo` into `runs`, rewriting sweep.json after each."""
    plans = [(name, lr, seed, train_config.replace(lr=lr, seed=seed), seeded_data(data, seed - train_config.seed),
              run_folder(sweep_dir, name, lr, seed)) for name, lr, seed in todo]
    for name, _, _, config, run_data, folder in plans:
        grid.check_run_dir(folder, variants[name], config, run_data, argument="sweep_dir")
    for i, (name, lr, seed, config, run_data, folder) in enumerate(plans, start=1):
        row = _read_finished(name, variants[name], lr, seed, folder)
        if row is None:
            row = _train_variant(name, variants[name], config, run_data, folder, progress)
        runs.append(row)
        SweepResult(runs, setup, str(sweep_dir)).to_json(sweep_dir / SWEEP_FILE)
        if progress:
            loss = "diverged" if row.status != "ok" else f"val loss {row.final_val_loss:.4f}"
            print(f"[{i}/{len(plans)}] {name} {row.layout} ({row.attention_ratio:.0%} attention, lr {lr:.1e}, "
                  f"seed {seed}): {'read back' if row.reused else 'trained'}, {loss}", flush=True)


def _learning_rates(variants: Mapping[str, ModelConfig], rule) -> dict[str, list[float]]:
    """{name: the rates it trains at} from `run_sweep`'s lr_by_variant."""
    if rule is None:
        rule = seed_learning_rate
    if isinstance(rule, Mapping):
        missing = [name for name in variants if name not in rule]
        if missing:
            raise ConfigError(f"lr_by_variant has no learning rate for {missing}; add them or pass a function "
                              f"of the config such as seed_learning_rate")
        rates = {name: [float(r) for r in rule[name]] if isinstance(rule[name], Sequence) else [float(rule[name])]
                 for name in variants}
        empty = [name for name, values in rates.items() if not values]
        if empty:
            raise ConfigError(f"lr_by_variant gives {empty} no rate; give each variant one rate or more")
        return rates
    return {name: [float(rule(config))] for name, config in variants.items()}


def _plain(config) -> dict:
    """A dataclass as config.json stores it (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _row(name: str, config: ModelConfig, lr: float, seed: int, run_dir: pathlib.Path, note: dict, reused: bool,
         metrics: dict | None = None, history: Sequence[dict] = ()) -> VariantResult:
    metrics = metrics or {}
    curve = [{key: record[key] for key in ("step", "tokens", "train_loss", "val_loss")}
             for record in history if "val_loss" in record]
    return VariantResult(
        name=name, attn_layers=config.attn_layers, layout=layout(config), attention_ratio=config.attention_ratio,
        lr=lr, params=count_params(config), status=note.get("status", "ok"), seed=seed,
        final_val_loss=metrics.get("final_val_loss"), best_val_loss=metrics.get("best_val_loss"),
        tokens=metrics.get("tokens"), tokens_per_second=metrics.get("tokens_per_second"),
        train_seconds=metrics.get("train_seconds"), wall_seconds=note.get("wall_seconds"),
        peak_memory_mib=note.get("peak_memory_mib"), run_dir=str(run_dir), reused=reused, error=note.get("error"),
        curve=curve)


def _read_finished(name: str, config: ModelConfig, lr: float, seed: int,
                   run_dir: pathlib.Path) -> VariantResult | None:
    """The row of a run that finished (metrics.json) or diverged (variant.json says so), else None."""
    note = load_json(run_dir / VARIANT_FILE) if (run_dir / VARIANT_FILE).exists() else {}
    if note.get("status") == "diverged":
        return _row(name, config, lr, seed, run_dir, note, reused=True)
    if not (run_dir / "metrics.json").exists():
        return None
    history = load_json(run_dir / "training_results.json")["results"]["history"]
    return _row(name, config, lr, seed, run_dir, note, reused=True, metrics=load_json(run_dir / "metrics.json"),
                history=history)


def _train_variant(name: str, config: ModelConfig, train_config: TrainConfig, data, run_dir: pathlib.Path,
                   progress: bool) -> VariantResult:
    device = pick_device(train_config.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(train_config.seed)
    model = build_model(config)
    started = time.perf_counter()
    try:
        result = train(model, train_config, data, run_dir, resume="auto", progress=progress)
    except TrainingDiverged as err:
        note = {"status": "diverged", "error": str(err)}
        write_json(run_dir / VARIANT_FILE, note)
        return _row(name, config, train_config.lr, train_config.seed, run_dir, note, reused=False)
    note = {"status": "ok", "wall_seconds": time.perf_counter() - started,
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    write_json(run_dir / VARIANT_FILE, note)
    return _row(name, config, train_config.lr, train_config.seed, run_dir, note, reused=False, metrics=result.metrics,
                history=result.history)


# ----------------------------------------------------------------------------- a time budget


@dataclass
class BudgetPlan:
    """`train_config` with steps (and warmup, eval and save intervals, in proportion) scaled so the
    sweep fits the budget. Per run the estimate is steps x `step_seconds[name]` +
    (evaluations + 1) x `run_overhead_seconds[name]`, measured on a pure GDN and a pure transformer
    model and interpolated by attention share; variant `name` counts `runs[name]` runs (its rates,
    plus the extra seeds where it is among the `seeded` most expensive variants: which variants
    will be best is not known before they train)."""

    train_config: TrainConfig
    requested_steps: int
    max_seconds: float
    calibration_seconds: float
    estimated_seconds: float
    step_seconds: dict[str, float]
    run_overhead_seconds: dict[str, float]
    runs: dict[str, int] = field(default_factory=dict)


def steps_within(seconds: float, step_seconds: Sequence[float], run_overhead_seconds: Sequence[float],
                 evaluations: int) -> int:
    """The most steps every variant can take in `seconds` in all: variant v costs
    steps * step_seconds[v] + (evaluations + 1) * run_overhead_seconds[v] (0 when nothing fits)."""
    fixed = (evaluations + 1) * sum(run_overhead_seconds)
    return max(0, math.floor((seconds - fixed) / sum(step_seconds)))


def _calibrate(config: ModelConfig, train_config: TrainConfig, data, timed_steps: int) -> tuple[float, float]:
    """(seconds per training step, seconds a run spends outside its steps) of `config`: a 2-step
    run compiles and autotunes the kernels, then a `timed_steps` run is measured."""
    def run(steps: int, folder: str) -> tuple[dict, float]:
        torch.manual_seed(train_config.seed)
        model = build_model(config)
        probe = train_config.replace(steps=steps, warmup_steps=0, eval_every=0, save_every=0, stop_at_val_acc=None)
        started = time.perf_counter()
        metrics = train(model, probe, data, pathlib.Path(tmp, folder), progress=False).metrics
        return metrics, time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="gdn_lab_calibrate_") as tmp:
        run(2, "warm")
        metrics, wall = run(timed_steps, "timed")
    return metrics["train_seconds"] / timed_steps, max(0.0, wall - metrics["train_seconds"])


def _scaled(value: int, factor: float, floor: int) -> int:
    return max(floor, round(value * factor)) if value else 0


def budget_train_config(variants: Mapping[str, ModelConfig], train_config: TrainConfig, data, max_seconds: float,
                        sweep_dir: str | os.PathLike | None = None, min_steps: int = 20, timed_steps: int = 10,
                        spent_seconds: float = 0.0, learning_rates: Sequence[float] | None = None, seeds: int = 1,
                        seeded: int | None = None) -> BudgetPlan:
    """`train_config` with fewer steps (never more) so that the whole sweep, this calibration
    included, takes about `max_seconds` less `spent_seconds` (time a caller already used, such as
    loading the data); every run keeps the same token budget. `learning_rates`, `seeds` and
    `seeded` are those the sweep will get (`run_sweep`): every rate of the grid is a run, and the
    extra seeds are counted for the `seeded` variants that cost most per step.

    The calibration trains a pure GDN and a pure transformer twin of the first variant for 2 +
    `timed_steps` steps each (the attention-free one alone when no variant has attention).
    With `sweep_dir`, the plan is kept in `sweep_dir/budget.json` and reused by a later call with
    the same request, so a resumed sweep keeps the steps it started with. Raises ConfigError
    when fewer than `min_steps` steps fit.
    """
    request = {"train": _plain(train_config), "max_seconds": max_seconds, "variants": sorted(variants),
               "min_steps": min_steps, "learning_rates": None if learning_rates is None else list(learning_rates),
               "seeds": seeds, "seeded": seeded}
    plan_path = pathlib.Path(sweep_dir, BUDGET_FILE) if sweep_dir is not None else None
    if plan_path is not None and plan_path.exists():
        saved = load_json(plan_path)
        if saved["request"] == request:
            return BudgetPlan(**{**saved["plan"], "train_config": TrainConfig(**saved["plan"]["train_config"])})

    started = time.perf_counter()
    first = next(iter(variants.values()))
    kinds = {"gdn": first.replace(attn_layers=(), swa_layers=())}
    if any(config.attention_ratio for config in variants.values()):  # sliding windows timed as full attention
        kinds["transformer"] = first.replace(attn_layers="transformer", swa_layers=())
    measured = {kind: _calibrate(config, train_config, data, timed_steps) for kind, config in kinds.items()}
    calibration_seconds = time.perf_counter() - started
    gdn_step, gdn_overhead = measured["gdn"]
    attn_step, attn_overhead = measured.get("transformer", measured["gdn"])
    step_seconds = {name: gdn_step + c.attention_ratio * (attn_step - gdn_step) for name, c in variants.items()}
    overhead = {name: gdn_overhead + c.attention_ratio * (attn_overhead - gdn_overhead) for name, c in variants.items()}

    costly = sorted(variants, key=step_seconds.__getitem__, reverse=True)[:seeded]
    runs = {name: (len(learning_rates) if learning_rates else 1) + (seeds - 1) * (name in costly) for name in variants}
    every_step = [step_seconds[name] for name in variants for _ in range(runs[name])]
    every_overhead = [overhead[name] for name in variants for _ in range(runs[name])]
    evaluations = train_config.steps // train_config.eval_every if train_config.eval_every else 0
    remaining = max_seconds - spent_seconds - calibration_seconds
    steps = min(train_config.steps, steps_within(remaining, every_step, every_overhead, evaluations))
    if steps < min_steps:
        needed = min_steps * sum(every_step) + (evaluations + 1) * sum(every_overhead)
        raise ConfigError(f"max_seconds={max_seconds:g} leaves {remaining:.0f} s after {spent_seconds:.0f} s spent "
                          f"and a {calibration_seconds:.0f} s calibration, but {min_steps} steps of {len(every_step)} "
                          f"runs need ~{needed:.0f} s: raise max_seconds, or train fewer rates, seeds or variants")
    factor = steps / train_config.steps
    planned = train_config.replace(
        steps=steps, warmup_steps=min(steps - 1, _scaled(train_config.warmup_steps, factor, 1)),
        eval_every=_scaled(train_config.eval_every, factor, 1), save_every=_scaled(train_config.save_every, factor, 1))
    estimated = sum(runs[n] * (steps * step_seconds[n] + (evaluations + 1) * overhead[n]) for n in variants)
    plan = BudgetPlan(planned, train_config.steps, max_seconds, calibration_seconds, estimated, step_seconds, overhead,
                      runs)
    if plan_path is not None:
        write_json(plan_path, {"request": request, "plan": plan})
    return plan


# ----------------------------------------------------------------------------- reading the result


def compare_with_seed(result: SweepResult, seed_val_loss: Mapping[str, float] = SEED_EXP10["val_loss"]) -> dict:
    """The run's order of the seed's variants (by name: 'sparse', 'gdn', 'transformer') next to the seed's.

    Returns {"seed_order", "run_order"} (best first, by mean loss over seeds, over the variants both
    have and that finished), "pairs": for each pair in the seed's order {"better", "worse",
    "seed_gap", "run_gap", "agrees", "tie", "verdict"} (gaps: loss of the worse minus loss of the
    better, the run's from means; `agrees` when the run's means order them the same way; `tie`
    when `SweepResult.compare` calls the gap a tie; verdict 'agrees', 'tie' or 'disagrees'),
    "agreeing_pairs" (agree and no tie), "tied_pairs", "same_order" and "missing" (seed variants the
    run lacks or whose runs all diverged). Loss values are not comparable across data and
    tokenizers; orders are.
    """
    summaries = result.summaries()
    finished = {name: s["mean"] for name, s in summaries.items() if s["mean"] is not None}
    common = [name for name in seed_val_loss if name in finished]
    seed_order = sorted(common, key=seed_val_loss.__getitem__)
    run_order = sorted(common, key=finished.__getitem__)
    pairs = []
    for a, b in itertools.combinations(seed_order, 2):
        agrees, tie = finished[a] < finished[b], result.compare(a, b) == "tie"
        pairs.append({"better": a, "worse": b, "seed_gap": seed_val_loss[b] - seed_val_loss[a],
                      "run_gap": finished[b] - finished[a], "agrees": agrees, "tie": tie,
                      "verdict": "tie" if tie else "agrees" if agrees else "disagrees"})
    return {"seed_order": seed_order, "run_order": run_order, "pairs": pairs,
            "agreeing_pairs": sum(p["verdict"] == "agrees" for p in pairs),
            "tied_pairs": sum(p["tie"] for p in pairs), "same_order": seed_order == run_order,
            "missing": [name for name in seed_val_loss if name not in finished]}
