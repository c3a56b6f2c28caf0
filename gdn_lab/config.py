"""Configuration: `ModelConfig`, `TrainConfig`, named presets and hybrid layer patterns.

Flat dataclasses of plain literals, so a notebook's `parameters` cell and papermill can set
every field. Both validate on construction and raise `ConfigError` with one line that says
what to change.

    >>> cfg = ModelConfig(hidden_size=768, num_layers=12, num_heads=12, head_dim=64,
    ...                   attn_layers="sparse")
    >>> cfg.attn_layers, cfg.attention_ratio
    ((5, 11), 0.1666...)
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("auto", "fla", "torch")
HYBRID_PATTERNS = ("gdn", "transformer", "sparse", "alternating", "late")
# The mixers other than Gated DeltaNet and the ModelConfig field that places each (indices or a pattern
# name, as `hybrid_layers` reads it); every other layer is 'gdn'. Their classes: `gdn_lab.layers.MIXERS`.
MIXER_LAYER_FIELDS = {"attn": "attn_layers", "swa": "swa_layers"}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


def parse_literal(text: str) -> Any:
    """A value typed as text (command line, widget box): a Python literal when it is one, else the
    bare string. '400' -> 400, '(5, 11)' -> (5, 11), 'None' -> None, 'sparse' -> 'sparse'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_gdn_settings(head_dim: int, expand_v: float, use_short_conv: bool, conv_size: int, dt_min: float,
                       dt_max: float, fixed_beta: float | None, allow_neg_eigval: bool) -> None:
    """ConfigError (one line) for Gated DeltaNet settings that cannot build a layer; the one rule that
    `ModelConfig` (before anything is built) and `layers.GatedDeltaNet` (built on its own) both apply."""
    v = head_dim * expand_v
    _require(math.isclose(v, round(v)), f"head_dim * expand_v = {head_dim} * {expand_v} = {v} is not an integer; "
                                        f"pick expand_v so the value head dim is whole")
    _require(conv_size >= 2 or not use_short_conv, f"conv_size={conv_size}; use >= 2 or use_short_conv=False")
    _require(0 < dt_min <= dt_max, f"dt_min={dt_min}, dt_max={dt_max}; use 0 < dt_min <= dt_max (FLA: 1e-3, 0.1)")
    top = 2 if allow_neg_eigval else 1
    _require(fixed_beta is None or 0 < fixed_beta <= top,
             f"fixed_beta={fixed_beta}; use a value in (0, {top}] (beta's range"
             f"{' with allow_neg_eigval' if allow_neg_eigval else ''}) or None to learn beta")


RECOMPUTE_GDN = ("", "core", "mixer")  # ModelConfig.recompute_gdn: nothing, the core, the whole mixer


def check_recompute_gdn(value: str) -> None:
    """ConfigError (one line) unless `value` is one of RECOMPUTE_GDN."""
    _require(value in RECOMPUTE_GDN, f"recompute_gdn={value!r}; use '' (keep every activation), 'core' (recompute "
                                     f"conv, recurrence and gated norm) or 'mixer' (recompute the whole GDN mixer)")


def check_attention_conv_size(conv_size: int, name: str = "attn_conv_size") -> None:
    """ConfigError (one line) unless the attention short conv is off (0) or at least 2 taps wide."""
    _require(conv_size == 0 or conv_size >= 2, f"{name}={conv_size}; use 0 (no conv) or a kernel width >= 2")


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` fits the type annotation `hint`: an int field takes integers (not bools),
    a float field any finite real number, a tuple field a tuple or list of its items, `X | None` None too."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple | list) and all(_fits(item, typing.get_args(hint)[0]) for item in value)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    names = {type(None): "None", bool: "True or False", int: "an integer", float: "a finite number",
             str: "a string"}
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {_describe(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return names.get(hint, str(hint))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field(cls: type, name: str, value: Any) -> None:
    """ConfigError (one line) unless `value` fits the annotation of dataclass `cls`'s field `name`:
    `check_field(ModelConfig, "num_heads", 2.5)` -> "num_heads=2.5: ModelConfig.num_heads takes an integer"."""
    hint = _field_types(cls)[name]
    _require(_fits(value, hint), f"{name}={value!r}: {cls.__name__}.{name} takes {_describe(hint)}")


def _check_fields(config: Any) -> None:
    for item in dataclasses.fields(config):
        check_field(type(config), item.name, getattr(config, item.name))


def evenly_spaced_layers(num_attn: int, num_layers: int) -> tuple[int, ...]:
    """`num_attn` layer indices spread evenly over `num_layers`, the last one at the top layer.

    The seed's k/12 hybrids do not say where their attention layers sit; gdn_lab spaces them
    evenly ending at the last layer: 2 of 12 -> (5, 11), 3 of 12 -> (3, 7, 11).
    """
    _require(0 <= num_attn <= num_layers,
             f"cannot place {num_attn} attention layers in a {num_layers}-layer model")
    if num_attn == 0:
        return ()
    stride = num_layers / num_attn
    return tuple(sorted({num_layers - 1 - int(round(i * stride)) for i in range(num_attn)}))


def hybrid_layers(pattern: str, num_layers: int) -> tuple[int, ...]:
    """Attention-layer indices for a named hybrid pattern.

    Patterns (the seed's exp7/exp10 study, generalised to any depth):
      gdn          no attention (0%)
      transformer  every layer attention (100%)
      sparse       middle and last layer: (5, 11) of 12 (17%)
      alternating  every other layer, ending at the top: (1, 3, ..., 11) of 12 (50%)
      late         the last third: (8, 9, 10, 11) of 12 (33%)
      ratio:P      round(P% of the layers), evenly spaced ending at the last: ratio:25 -> 3 of 12
      k/N          k attention layers when num_layers == N, evenly spaced: 1/12 (8%), 5/12 (42%)
    """
    n = num_layers
    if pattern == "gdn":
        return ()
    if pattern == "transformer":
        return tuple(range(n))
    if pattern == "sparse":
        return evenly_spaced_layers(min(2, n), n)
    if pattern == "alternating":
        return tuple(range(1, n, 2)) if n > 1 else (0,)
    if pattern == "late":
        return tuple(range(n - max(1, n // 3), n))
    if m := re.fullmatch(r"ratio:(\d+(?:\.\d+)?)", pattern):
        return evenly_spaced_layers(int(round(float(m.group(1)) / 100 * n)), n)
    if m := re.fullmatch(r"(\d+)/(\d+)", pattern):
        k, total = int(m.group(1)), int(m.group(2))
        _require(total == n, f"pattern {pattern!r} is for {total} layers but num_layers={n}; "
                             f"use '{k * n // total}/{n}' or 'ratio:{100 * k / total:.0f}'")
        return evenly_spaced_layers(k, n)
    raise ConfigError(f"unknown hybrid pattern {pattern!r}; use one of {HYBRID_PATTERNS}, "
                      f"'ratio:25' or 'k/N' such as '2/12'")


@dataclass
class ModelConfig:
    """A causal LM over a per-layer mixer list ('gdn', 'attn' or 'swa' per layer: `mixers`).

    GDN fields follow `fla.layers.GatedDeltaNet` (flash-linear-attention 0.6.0): per head the
    key dim is `head_dim` and the value dim `head_dim * expand_v`; the recurrent state of one
    layer is `num_heads x head_dim x head_dim*expand_v` per sequence.
    `attn_layers` takes indices or a pattern name (see `hybrid_layers`), resolved to indices;
    `swa_layers` the same for sliding-window attention (each query sees the last `swa_window`
    tokens, itself included); a layer in neither is Gated DeltaNet, a layer in both is an error.
    `use_decay=False` is the DeltaNet ablation (alpha_t = 1: no forgetting gate).
    `fixed_beta`: the write strength beta_t held at this constant instead of sigmoid(x W_b) (the
    "beta fixed, not learned" ablation; the layer then has no b_proj); None learns it.
    `dt_min`, `dt_max`: the decay init range: per head dt ~ log-uniform in [dt_min, dt_max],
    dt_bias = softplus^-1(dt) (FLA's [1e-3, 0.1] by default; [1e-4, 1e-3] starts with slower decay).
    `attn_conv_size` > 0 puts a causal depthwise conv of that width on the attention mixer's
    q, k and v (after the projections, before RoPE; identity at init), as zoology's MQAR
    baselines do; 0 is plain attention.
    `recompute_gdn`: what GDN mixers recompute in the backward instead of keeping it (activation
    checkpointing, `torch.utils.checkpoint`; the same gradients): "" nothing; "core" the short
    conv, the recurrence and the gated norm (the projections' outputs are kept: no matmul runs
    twice); "mixer" everything from the mixer's input (only it is kept; the projections run
    twice). Training passes only; decoding and evaluation are unchanged.
    """

    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    attn_layers: tuple[int, ...] | str = ()
    swa_layers: tuple[int, ...] | str = ()
    # Gated DeltaNet mixer
    num_heads: int = 4
    head_dim: int = 32
    expand_v: float = 2.0
    use_gate: bool = True
    use_short_conv: bool = True
    conv_size: int = 4
    allow_neg_eigval: bool = False
    use_decay: bool = True
    dt_min: float = 1e-3
    dt_max: float = 0.1
    fixed_beta: float | None = None
    recompute_gdn: str = ""
    # softmax attention mixers (SDPA + RoPE): full causal ('attn') and sliding-window ('swa')
    attn_num_heads: int = 4
    attn_num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    attn_conv_size: int = 0
    max_position_embeddings: int = 2048
    swa_window: int = 256
    # MLP (SwiGLU) and the rest
    hidden_ratio: int = 4
    intermediate_size: int | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    backend: str = "auto"

    def __post_init__(self):
        _check_fields(self)
        for name in MIXER_LAYER_FIELDS.values():
            layers = getattr(self, name)
            if isinstance(layers, str):
                layers = hybrid_layers(layers, self.num_layers)
            setattr(self, name, tuple(sorted(int(i) for i in layers)))
        _require(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _require(self.hidden_size > 0 and self.num_layers > 0,
                 f"hidden_size and num_layers must be positive, got {self.hidden_size}, {self.num_layers}")
        for name in MIXER_LAYER_FIELDS.values():
            layers = getattr(self, name)
            bad = [i for i in layers if not 0 <= i < self.num_layers]
            _require(not bad, f"{name} {bad} out of range for num_layers={self.num_layers}; "
                              f"use indices 0..{self.num_layers - 1}")
            _require(len(set(layers)) == len(layers), f"{name} has duplicates: {layers}")
        shared = sorted(set(self.attn_layers) & set(self.swa_layers))
        _require(not shared, f"attn_layers and swa_layers both name layers {shared}; a layer has one mixer: "
                             f"take them out of one of the two")
        _require(self.swa_window >= 1, f"swa_window={self.swa_window}; use a window of >= 1 tokens "
                                       f"(the query itself and swa_window - 1 before it)")
        _require(self.backend in BACKENDS, f"backend={self.backend!r}; use one of {BACKENDS}")
        for name in ("num_heads", "head_dim", "attn_num_heads", "max_position_embeddings", "hidden_ratio"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("attn_num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name} must be positive or None, got {value!r}")
        for name in ("expand_v", "rope_theta", "norm_eps"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        _require(self.initializer_range >= 0, f"initializer_range must be >= 0, got {self.initializer_range!r}")
        check_attention_conv_size(self.attn_conv_size)
        check_recompute_gdn(self.recompute_gdn)
        if self.num_gdn_layers:
            check_gdn_settings(self.head_dim, self.expand_v, self.use_short_conv, self.conv_size, self.dt_min,
                               self.dt_max, self.fixed_beta, self.allow_neg_eigval)
        if self.num_attn_layers or self.num_swa_layers:
            _require(self.hidden_size % self.attn_num_heads == 0,
                     f"hidden_size={self.hidden_size} is not divisible by attn_num_heads={self.attn_num_heads}; "
                     f"pick attn_num_heads from {[h for h in (1, 2, 4, 8, 12, 16) if self.hidden_size % h == 0]}")
            kv = self.attn_num_kv_heads or self.attn_num_heads
            _require(self.attn_num_heads % kv == 0,
                     f"attn_num_heads={self.attn_num_heads} is not divisible by attn_num_kv_heads={kv}")
            _require((self.hidden_size // self.attn_num_heads) % 2 == 0,
                     f"attention head dim {self.hidden_size // self.attn_num_heads} must be even for RoPE")

    @property
    def mixers(self) -> tuple[str, ...]:
        """Per-layer mixer names, e.g. ('gdn', 'swa', 'attn', 'gdn'): each `MIXER_LAYER_FIELDS` field's
        mixer at its layers, 'gdn' elsewhere."""
        names = ["gdn"] * self.num_layers
        for mixer, field_name in MIXER_LAYER_FIELDS.items():
            for i in getattr(self, field_name):
                names[i] = mixer
        return tuple(names)

    @property
    def num_attn_layers(self) -> int:
        """Full causal attention layers."""
        return len(self.attn_layers)

    @property
    def num_swa_layers(self) -> int:
        """Sliding-window attention layers."""
        return len(self.swa_layers)

    @property
    def num_gdn_layers(self) -> int:
        return self.num_layers - len(self.attn_layers) - len(self.swa_layers)

    @property
    def attention_ratio(self) -> float:
        """The share of softmax attention layers, full and sliding-window alike."""
        return (len(self.attn_layers) + len(self.swa_layers)) / self.num_layers

    @property
    def head_v_dim(self) -> int:
        return int(round(self.head_dim * self.expand_v))

    @property
    def mlp_intermediate_size(self) -> int:
        """FLA's GatedMLP rule: 2/3 * hidden * ratio rounded up to a multiple of 256."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        size = int(self.hidden_size * self.hidden_ratio * 2 / 3)
        return 256 * ((size + 255) // 256)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """The one training loop's settings.

    `batch_size` is the global batch in sequences per optimizer step: each of `world_size`
    processes runs `grad_accum` micro-batches of `batch_size / (grad_accum * world_size)`.
    `lr` peaks after `warmup_steps` and decays by cosine to `lr * min_lr_ratio` at `steps`.
    `stop_at_val_acc`: stop at the first evaluation (every `eval_every` steps) whose val_acc
    reaches it, ending the run there as if `steps` were done (None: always train `steps`).
    """

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    # replay each step from CUDA graphs (gdn_lab.cuda_graph; one CUDA process, grad_accum 1, bf16/fp32);
    # None: where that runs, False elsewhere
    cuda_graph: bool | None = None
    stop_at_val_acc: float | None = None

    def __post_init__(self):
        _check_fields(self)
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 <= self.warmup_steps < self.steps or self.steps == 1,
                 f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
                 f"beta1={self.beta1}, beta2={self.beta2}; AdamW's betas must be in [0, 1)")
        for name in ("eval_every", "save_every"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0 (0: never), got {getattr(self, name)}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(self.batch_size % self.grad_accum == 0,
                 f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"dtype={self.dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
        if self.stop_at_val_acc is not None:
            _require(0 < self.stop_at_val_acc <= 1, f"stop_at_val_acc must be in (0, 1] or None, "
                                                    f"got {self.stop_at_val_acc}")
            _require(self.eval_every > 0, f"stop_at_val_acc={self.stop_at_val_acc} is checked at evaluations, "
                                          f"but eval_every=0 never evaluates: set eval_every > 0")

    def micro_batch_size(self, world_size: int = 1) -> int:
        """Sequences per micro-step on one process; one-line error when it does not divide."""
        per_step = self.grad_accum * world_size
        _require(self.batch_size % per_step == 0,
                 f"batch_size={self.batch_size} is not divisible by grad_accum x world_size = "
                 f"{self.grad_accum} x {world_size}; pick a batch_size that is a multiple of {per_step}")
        return self.batch_size // per_step

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preset:
    """A named model size with the training defaults that came with it."""

    name: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = ""


def _gdn_lm(hidden: int, layers: int, heads: int = 4, head_dim: int = 64, expand_v: float = 1.0,
            **kw) -> ModelConfig:
    return ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, head_dim=head_dim,
                       expand_v=expand_v, attn_num_heads=max(1, hidden // 64), **kw)


# The seed trainer (blueberry exp6): 4 key heads, 4 value heads, head dims 64 (expand_v 1), conv 4.
# Sequence length 256 unless the seed said otherwise; vocab is set by the tokenizer at build time.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", _gdn_lm(64, 2, heads=2, head_dim=16, expand_v=2.0),
               TrainConfig(steps=60, batch_size=8, seq_len=64, warmup_steps=5, eval_every=20),
               "gdn_lab: CPU smoke runs"),
        Preset("small", _gdn_lm(128, 4), TrainConfig(steps=1000, batch_size=2),
               "seed exp6 small (~2M)"),
        Preset("medium", _gdn_lm(256, 8), TrainConfig(steps=2000, batch_size=4),
               "seed exp6 medium (~15M)"),
        Preset("large", _gdn_lm(512, 12), TrainConfig(steps=5000, batch_size=8),
               "seed exp6 large (~60M)"),
        Preset("rtx4090", _gdn_lm(768, 12), TrainConfig(steps=2000, batch_size=32),
               "seed exp6 rtx4090 (~100M)"),
        Preset("xlarge", _gdn_lm(1024, 16), TrainConfig(steps=10000, batch_size=4),
               "seed exp6 xlarge (~200M)"),
        Preset("h100", _gdn_lm(768, 12, heads=12, head_dim=64),
               TrainConfig(steps=1000, batch_size=48, seq_len=1024, lr=1e-3),
               "seed exp10 hybrid study: 768d x 12L x 12 heads, seq 1024, batch 48"),
        # FLA quick-reference model configs (GatedDeltaNetConfig defaults: expand_v 2).
        Preset("fla-tiny", _gdn_lm(256, 6, heads=4, head_dim=64, expand_v=2.0), source="FLA quick reference tiny"),
        Preset("fla-small", _gdn_lm(768, 12, heads=12, head_dim=64, expand_v=2.0),
               source="FLA quick reference small (~124M at GPT-2 vocab)"),
        Preset("fla-medium", _gdn_lm(1024, 24, heads=16, head_dim=64, expand_v=2.0),
               source="FLA quick reference medium (~350M)"),
        Preset("fla-large", _gdn_lm(1280, 36, heads=20, head_dim=64, expand_v=2.0),
               source="FLA quick reference large (~774M)"),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; one-line error listing the names otherwise."""
    _require(name in PRESETS, f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
