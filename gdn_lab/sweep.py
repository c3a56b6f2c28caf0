"""Sweeps: several model variants through the one training loop, collected into one table.

    base = ModelConfig(vocab_size=data.vocab_size, hidden_size=384, num_layers=12, num_heads=6, head_dim=64,
                       attn_num_heads=6)
    variants = hybrid_variants(base)          # the seed's hybrid study, by pattern name
    sweep = run_sweep(variants, TrainConfig(steps=400, batch_size=16, seq_len=1024), data, "runs/hybrids")
    print(sweep.table())

Every variant trains with `gdn_lab.train.train` on the same data and token budget: the same
steps, batch and sequence length, so the same batches in the same order. Only the learning rate
follows a rule per variant (`seed_learning_rate` by default: the seed's 1e-3 for pure GDN, 2e-3
for anything with attention). Each variant gets its own run directory `sweep_dir/<name>`.

Resumable: a variant whose run finished (its metrics.json exists) is read back, not retrained;
an interrupted one resumes from its newest checkpoint (`resume='auto'`). So a Colab disconnect
costs at most the variant in progress, and of that only the steps since its last checkpoint.
Settings that differ from those a run directory was made with stop the sweep before anything
trains (one-line ConfigError). A variant whose loss diverges is recorded with status 'diverged'
and the sweep goes on.

Files: `sweep_dir/sweep.json` (the SweepResult, rewritten after every variant),
`sweep_dir/<name>/` (train's run directory, plus `variant.json`: status, peak memory, wall time),
`sweep_dir/budget.json` (the plan of `budget_train_config`, when one was made).
"""
from __future__ import annotations

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

from .config import ConfigError, ModelConfig, TrainConfig
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
SWEEP_FILE, VARIANT_FILE, BUDGET_FILE = "sweep.json", "variant.json", "budget.json"
# Settings that do not change what a run computes: a run made with other values is still this run.
_RUN_INDEPENDENT = {"model": {"backend"}, "train": {"device", "log_every", "save_every"}}
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def variant_name(pattern: str) -> str:
    """A run-directory name for a hybrid pattern: 'ratio:25' -> 'ratio25', '3/12' -> '3of12', 'sparse' -> 'sparse'."""
    return pattern.replace("ratio:", "ratio").replace("/", "of")


def hybrid_variants(base: ModelConfig,
                    patterns: Sequence[str] | Mapping[str, str | Sequence[int]] = SEED_PATTERNS
                    ) -> dict[str, ModelConfig]:
    """`base` with its attention layers set by each pattern: {name: ModelConfig}.

    `patterns`: pattern names (see `gdn_lab.config.hybrid_layers`; each variant is named by
    `variant_name`), or {name: pattern or layer indices}. The default is the seed's study; at 12
    layers it gives gdn (), transformer (0..11), sparse (5, 11), alternating (1, 3, ..., 11),
    late (8, 9, 10, 11), ratio8 (11,), ratio25 (3, 7, 11), ratio42 (1, 4, 6, 9, 11): the k/12
    layers are spaced evenly, ending at the last layer (the seed does not say where they go).
    """
    named = dict(patterns) if isinstance(patterns, Mapping) else {variant_name(p): p for p in patterns}
    return {name: base.replace(attn_layers=layers if isinstance(layers, str) else tuple(layers))
            for name, layers in named.items()}


def seed_learning_rate(config: ModelConfig, gdn_lr: float = 1e-3, attention_lr: float = 2e-3) -> float:
    """The seed's rule: `gdn_lr` (1e-3) for a pure Gated DeltaNet model, `attention_lr` (2e-3) for
    hybrids and the transformer."""
    return attention_lr if config.num_attn_layers else gdn_lr


def layout(config: ModelConfig) -> str:
    """One letter per layer, first layer first: 'G' Gated DeltaNet, 'A' attention ('GGGGGAGGGGGA': sparse at 12)."""
    return "".join("A" if mixer == "attn" else "G" for mixer in config.mixers)


@dataclass
class VariantResult:
    """One row of a sweep. Losses are mean cross-entropy per token (nats) on the validation batches;
    `tokens_per_second` counts training steps only (train_seconds, no evaluation); `wall_seconds`
    is the wall clock of the train call that finished the variant (evaluations and checkpoint
    writes included; after a resume only the resumed part); `peak_memory_mib` is
    `torch.cuda.max_memory_allocated` over that call (None on the CPU). `curve` holds one record
    per evaluation: step, tokens, train_loss (of that step), val_loss."""

    name: str
    attn_layers: tuple[int, ...]
    layout: str
    attention_ratio: float
    lr: float
    params: int
    status: str
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
    """The rows of a sweep (`variants`, in the order they were given) and its `setup`: the shared
    train config (before each variant's learning rate), the data description and any notes."""

    variants: list[VariantResult]
    setup: dict
    sweep_dir: str | None = None

    def __getitem__(self, name: str) -> VariantResult:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"no variant {name!r} in this sweep; it has {self.names}")

    @property
    def names(self) -> list[str]:
        """The variant names, in the order they were given."""
        return [v.name for v in self.variants]

    def ranking(self) -> list[str]:
        """Names of the variants that finished, best (lowest final validation loss) first."""
        return [v.name for v in sorted((v for v in self.variants if v.status == "ok"), key=lambda v: v.final_val_loss)]

    def table(self) -> str:
        """The rows as aligned text: rank, layout, attention share, lr, size, losses, speed, memory."""

        def fmt(value, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        ranks = {name: i + 1 for i, name in enumerate(self.ranking())}
        width = max([len("layout")] + [len(v.layout) for v in self.variants])
        header = (f"{'rank':>4}  {'variant':<12} {'layout':<{width}} {'attn':>5} {'lr':>8} {'params':>8} "
                  f"{'val loss':>9} {'best':>8} {'tokens':>11} {'tokens/s':>10} {'peak MiB':>9} {'wall s':>7}  status")
        lines = [header]
        for v in self.variants:
            lines.append(
                f"{fmt(ranks.get(v.name), 'd'):>4}  {v.name:<12} {v.layout:<{width}} {v.attention_ratio:>5.0%} "
                f"{v.lr:>8.1e} {v.params / 1e6:>7.2f}M {fmt(v.final_val_loss, '.4f'):>9} "
                f"{fmt(v.best_val_loss, '.4f'):>8} {fmt(v.tokens, ',d'):>11} "
                f"{fmt(v.tokens_per_second, ',.0f'):>10} {fmt(v.peak_memory_mib, ',.0f'):>9} "
                f"{fmt(v.wall_seconds, '.1f'):>7}  {v.status}{' (reused)' if v.reused else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data (variants as dicts, plus the ranking) for JSON; `from_dict` reads it back."""
        return {"variants": [dataclasses.asdict(v) for v in self.variants], "ranking": self.ranking(),
                "setup": self.setup, "sweep_dir": self.sweep_dir}

    def to_json(self, path: str | os.PathLike) -> pathlib.Path:
        """Write `to_dict()` with `gdn_lab.results.save_results` (environment, config and seed stamped)."""
        return save_results(path, self.to_dict(), config=self.setup, seed=self.setup.get("train", {}).get("seed"))

    @classmethod
    def from_dict(cls, payload: dict) -> SweepResult:
        """From `to_dict()`, or from a whole `save_results` file holding one (its "results" entry)."""
        if "results" in payload and "variants" not in payload:
            payload = payload["results"]
        variants = [VariantResult(**{**v, "attn_layers": tuple(v["attn_layers"])}) for v in payload["variants"]]
        return cls(variants, payload.get("setup", {}), payload.get("sweep_dir"))

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


# ----------------------------------------------------------------------------- running


def run_sweep(variants: Mapping[str, ModelConfig], train_config: TrainConfig, data, sweep_dir: str | os.PathLike,
              lr_by_variant: Mapping[str, float] | Callable[[ModelConfig], float] | None = None,
              progress: bool = True, notes: dict | None = None) -> SweepResult:
    """Train every variant with `gdn_lab.train.train` on `data` under `train_config`, each in
    `sweep_dir/<name>`, and return their rows; finished variants are read back, not retrained.

    lr_by_variant: None (`seed_learning_rate`), a function of the ModelConfig, or {name: lr}.
    Every variant is seeded with `train_config.seed` before its model is built. Names, learning
    rates and existing run directories are all checked before the first variant trains.
    notes: facts recorded in `setup` (the corpus name, say). progress: train's progress bar and
    one line per variant. A KeyboardInterrupt saves the variant in training (see `train`) and
    propagates; call again to resume.
    """
    sweep_dir = pathlib.Path(sweep_dir)
    bad = [name for name in variants if not _NAME.fullmatch(name)]
    if bad:
        raise ConfigError(f"variant names {bad} cannot be folder names; use letters, digits, '.', '_' and '-'")
    rates = _learning_rates(variants, lr_by_variant)
    configs = {name: train_config.replace(lr=rates[name]) for name in variants}
    for name, config in variants.items():
        _check_same_run(sweep_dir / name, config, configs[name], data)
    setup = {"train": train_config.to_dict(), "data": data.describe() if hasattr(data, "describe") else None,
             **(notes or {})}

    rows: list[VariantResult] = []
    for i, (name, config) in enumerate(variants.items(), start=1):
        run_dir = sweep_dir / name
        row = _read_finished(name, config, rates[name], run_dir)
        if row is None:
            row = _train_variant(name, config, configs[name], data, run_dir, progress)
        rows.append(row)
        result = SweepResult(rows, setup, str(sweep_dir))
        result.to_json(sweep_dir / SWEEP_FILE)
        if progress:
            loss = "diverged" if row.status != "ok" else f"val loss {row.final_val_loss:.4f}"
            print(f"[{i}/{len(variants)}] {name} {row.layout} ({row.attention_ratio:.0%} attention, lr {row.lr:.1e}): "
                  f"{'read back' if row.reused else 'trained'}, {loss}", flush=True)
    return SweepResult(rows, setup, str(sweep_dir))


def _learning_rates(variants: Mapping[str, ModelConfig], rule) -> dict[str, float]:
    if rule is None:
        rule = seed_learning_rate
    if isinstance(rule, Mapping):
        missing = [name for name in variants if name not in rule]
        if missing:
            raise ConfigError(f"lr_by_variant has no learning rate for {missing}; add them or pass a function "
                              f"of the config such as seed_learning_rate")
        return {name: float(rule[name]) for name in variants}
    return {name: float(rule(config)) for name, config in variants.items()}


def _plain(config) -> dict:
    """A dataclass as config.json stores it (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check_same_run(run_dir: pathlib.Path, config: ModelConfig, train_config: TrainConfig, data) -> None:
    """ConfigError when `run_dir` holds a run made with other model, training or data settings."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    saved = load_json(saved_path)
    wanted = {"model": _plain(config), "train": _plain(train_config),
              "data": data.describe() if hasattr(data, "describe") else None}
    for section, values in wanted.items():
        old = saved.get(section)
        if values is None or old is None:
            continue
        for key in sorted(set(values) | set(old)):
            if key not in _RUN_INDEPENDENT.get(section, ()) and values.get(key) != old.get(key):
                raise ConfigError(f"{run_dir} holds a run with {section} {key}={old.get(key)!r}, not "
                                  f"{values.get(key)!r}; pass another sweep_dir or delete {run_dir}")


def _row(name: str, config: ModelConfig, lr: float, run_dir: pathlib.Path, note: dict, reused: bool,
         metrics: dict | None = None, history: Sequence[dict] = ()) -> VariantResult:
    metrics = metrics or {}
    curve = [{key: record[key] for key in ("step", "tokens", "train_loss", "val_loss")}
             for record in history if "val_loss" in record]
    return VariantResult(
        name=name, attn_layers=config.attn_layers, layout=layout(config), attention_ratio=config.attention_ratio,
        lr=lr, params=count_params(config), status=note.get("status", "ok"),
        final_val_loss=metrics.get("final_val_loss"), best_val_loss=metrics.get("best_val_loss"),
        tokens=metrics.get("tokens"), tokens_per_second=metrics.get("tokens_per_second"),
        train_seconds=metrics.get("train_seconds"), wall_seconds=note.get("wall_seconds"),
        peak_memory_mib=note.get("peak_memory_mib"), run_dir=str(run_dir), reused=reused, error=note.get("error"),
        curve=curve)


def _read_finished(name: str, config: ModelConfig, lr: float, run_dir: pathlib.Path) -> VariantResult | None:
    """The row of a run that finished (metrics.json) or diverged (variant.json says so), else None."""
    note = load_json(run_dir / VARIANT_FILE) if (run_dir / VARIANT_FILE).exists() else {}
    if note.get("status") == "diverged":
        return _row(name, config, lr, run_dir, note, reused=True)
    if not (run_dir / "metrics.json").exists():
        return None
    history = load_json(run_dir / "training_results.json")["results"]["history"]
    return _row(name, config, lr, run_dir, note, reused=True, metrics=load_json(run_dir / "metrics.json"),
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
        return _row(name, config, train_config.lr, run_dir, note, reused=False)
    note = {"status": "ok", "wall_seconds": time.perf_counter() - started,
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    write_json(run_dir / VARIANT_FILE, note)
    return _row(name, config, train_config.lr, run_dir, note, reused=False, metrics=result.metrics,
                history=result.history)


# ----------------------------------------------------------------------------- a time budget


@dataclass
class BudgetPlan:
    """`train_config` with steps (and warmup, eval and save intervals, in proportion) scaled so the
    sweep fits the budget. Per variant the estimate is steps x `step_seconds[name]` +
    (evaluations + 1) x `run_overhead_seconds[name]`, measured on a pure GDN and a pure transformer
    model and interpolated by attention share."""

    train_config: TrainConfig
    requested_steps: int
    max_seconds: float
    calibration_seconds: float
    estimated_seconds: float
    step_seconds: dict[str, float]
    run_overhead_seconds: dict[str, float]


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
        probe = train_config.replace(steps=steps, warmup_steps=0, eval_every=0, save_every=0)
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
                        spent_seconds: float = 0.0) -> BudgetPlan:
    """`train_config` with fewer steps (never more) so that the whole sweep, this calibration
    included, takes about `max_seconds` less `spent_seconds` (time a caller already used, such as
    loading the data); every variant keeps the same token budget.

    The calibration trains a pure GDN and a pure transformer twin of the first variant for 2 +
    `timed_steps` steps each (the attention-free one alone when no variant has attention).
    With `sweep_dir`, the plan is kept in `sweep_dir/budget.json` and reused by a later call with
    the same request, so a resumed sweep keeps the steps it started with. Raises ConfigError
    when fewer than `min_steps` steps fit.
    """
    request = {"train": _plain(train_config), "max_seconds": max_seconds, "variants": sorted(variants),
               "min_steps": min_steps}
    plan_path = pathlib.Path(sweep_dir, BUDGET_FILE) if sweep_dir is not None else None
    if plan_path is not None and plan_path.exists():
        saved = load_json(plan_path)
        if saved["request"] == request:
            return BudgetPlan(**{**saved["plan"], "train_config": TrainConfig(**saved["plan"]["train_config"])})

    started = time.perf_counter()
    first = next(iter(variants.values()))
    kinds = {"gdn": first.replace(attn_layers=())}
    if any(config.num_attn_layers for config in variants.values()):
        kinds["transformer"] = first.replace(attn_layers="transformer")
    measured = {kind: _calibrate(config, train_config, data, timed_steps) for kind, config in kinds.items()}
    calibration_seconds = time.perf_counter() - started
    gdn_step, gdn_overhead = measured["gdn"]
    attn_step, attn_overhead = measured.get("transformer", measured["gdn"])
    step_seconds = {name: gdn_step + c.attention_ratio * (attn_step - gdn_step) for name, c in variants.items()}
    overhead = {name: gdn_overhead + c.attention_ratio * (attn_overhead - gdn_overhead) for name, c in variants.items()}

    evaluations = train_config.steps // train_config.eval_every if train_config.eval_every else 0
    remaining = max_seconds - spent_seconds - calibration_seconds
    steps = min(train_config.steps, steps_within(remaining, list(step_seconds.values()), list(overhead.values()),
                                                 evaluations))
    if steps < min_steps:
        needed = min_steps * sum(step_seconds.values()) + (evaluations + 1) * sum(overhead.values())
        raise ConfigError(f"max_seconds={max_seconds:g} leaves {remaining:.0f} s after {spent_seconds:.0f} s spent "
                          f"and a {calibration_seconds:.0f} s calibration, but {min_steps} steps of {len(variants)} "
                          f"variants need ~{needed:.0f} s: raise max_seconds, or train fewer or smaller variants")
    factor = steps / train_config.steps
    planned = train_config.replace(
        steps=steps, warmup_steps=min(steps - 1, _scaled(train_config.warmup_steps, factor, 1)),
        eval_every=_scaled(train_config.eval_every, factor, 1), save_every=_scaled(train_config.save_every, factor, 1))
    estimated = sum(steps * step_seconds[n] + (evaluations + 1) * overhead[n] for n in variants)
    plan = BudgetPlan(planned, train_config.steps, max_seconds, calibration_seconds, estimated, step_seconds, overhead)
    if plan_path is not None:
        write_json(plan_path, {"request": request, "plan": plan})
    return plan


# ----------------------------------------------------------------------------- reading the result


def compare_with_seed(result: SweepResult, seed_val_loss: Mapping[str, float] = SEED_EXP10["val_loss"]) -> dict:
    """The run's order of the seed's variants (by name: 'sparse', 'gdn', 'transformer') next to the seed's.

    Returns {"seed_order", "run_order"} (best first, over the variants both have and that
    finished), "pairs": for each pair in the seed's order {"better", "worse", "seed_gap",
    "run_gap", "agrees"} (gaps: loss of the worse minus loss of the better; `agrees` when the run
    ranks them the same way), "agreeing_pairs", "same_order" and "missing" (seed variants the run
    lacks or that diverged). Loss values are not comparable across data and tokenizers; orders are.
    """
    finished = {v.name: v.final_val_loss for v in result.variants if v.status == "ok"}
    common = [name for name in seed_val_loss if name in finished]
    seed_order = sorted(common, key=seed_val_loss.__getitem__)
    run_order = sorted(common, key=finished.__getitem__)
    pairs = [{"better": a, "worse": b, "seed_gap": seed_val_loss[b] - seed_val_loss[a],
              "run_gap": finished[b] - finished[a], "agrees": finished[a] < finished[b]}
             for a, b in itertools.combinations(seed_order, 2)]
    return {"seed_order": seed_order, "run_order": run_order, "pairs": pairs,
            "agreeing_pairs": sum(p["agrees"] for p in pairs), "same_order": seed_order == run_order,
            "missing": [name for name in seed_val_loss if name not in finished]}


def sweep_figures(result: SweepResult) -> dict:
    """Plotly figures of a sweep (variants that finished): {"val_loss": validation loss against
    training tokens, one line per variant; "placement": final loss against attention share beside
    the layer layout of every variant, best first; "throughput": training tokens/s and peak GPU
    memory (training seconds on the CPU) per variant}."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .viz import line_plot

    ranked = [result[name] for name in result.ranking()]
    curves = line_plot({v.name: ([r["tokens"] for r in v.curve], [r["val_loss"] for r in v.curve]) for v in ranked},
                       "training tokens", "validation loss", title="Validation loss at equal tokens")

    placement = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.15,
                              subplot_titles=("final validation loss vs attention share",
                                              "layer layout, best first (dark: attention)"))
    placement.add_trace(go.Scatter(
        x=[100 * v.attention_ratio for v in ranked], y=[v.final_val_loss for v in ranked], mode="markers+text",
        text=[v.name for v in ranked], textposition="top center", customdata=[v.layout for v in ranked],
        hovertemplate="%{text} %{customdata}<br>%{x:.0f}% attention<br>val loss %{y:.4f}<extra></extra>",
        showlegend=False), row=1, col=1)
    depth = max((len(v.layout) for v in ranked), default=0)
    placement.add_trace(go.Heatmap(
        z=[[1.0 if c == "A" else 0.0 for c in v.layout] + [None] * (depth - len(v.layout)) for v in ranked],
        x=list(range(depth)), y=[f"{v.name} ({v.final_val_loss:.3f})" for v in ranked],
        colorscale=[[0.0, "#dbe7f3"], [1.0, "#1f3b73"]], zmin=0, zmax=1, showscale=False, xgap=2, ygap=2,
        hovertemplate="%{y}<br>layer %{x}<extra></extra>"), row=1, col=2)
    placement.update_xaxes(title_text="attention layers (%)", row=1, col=1)
    placement.update_yaxes(title_text="final validation loss", row=1, col=1)
    placement.update_xaxes(title_text="layer", dtick=1, row=1, col=2)
    placement.update_yaxes(autorange="reversed", row=1, col=2)
    placement.update_layout(title="Where attention goes and what it buys", height=420 + 12 * len(ranked))

    on_gpu = any(v.peak_memory_mib is not None for v in ranked)
    second = ("peak GPU memory (MiB)", "peak_memory_mib") if on_gpu else ("training seconds", "train_seconds")
    throughput = make_subplots(rows=1, cols=2, subplot_titles=("training tokens/s", second[0]))
    names = [v.name for v in ranked]
    throughput.add_trace(go.Bar(x=names, y=[v.tokens_per_second for v in ranked], showlegend=False), row=1, col=1)
    throughput.add_trace(go.Bar(x=names, y=[getattr(v, second[1]) for v in ranked], showlegend=False), row=1, col=2)
    throughput.update_layout(title="Throughput and memory per variant (best loss first)")
    return {"val_loss": curves, "placement": placement, "throughput": throughput}
