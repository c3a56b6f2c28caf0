"""Inside the recurrence: per-layer, per-head gates, states and implicit attention of a GDN model.

FLA's layer computes its gates inside the kernels and keeps no per-step states, so the probe
recomputes them from the layer's own parameters: `layer.features(x)` (q, k, v, g, beta exactly
as the layer prepares them), the fp32 recurrence `gdn_lab.ops.recurrent_gated_delta_rule`, and
`layer.finish(o, f.gate)`. It then checks that the recomputed output equals what the layer's real
forward returned (captured with a forward hook), and raises `ProbeMismatch` when it does not:
a probe never silently describes a different model.

    probe = capture(model, input_ids, state_steps=[0, 15, 31])
    p = probe[0]                       # LayerProbe of layer 0
    p.alpha, p.beta                    # [B, T, H]
    p.states                           # [B, 3, H, K, V]: S_t after steps 0, 15, 31
    p.state_norm                       # [B, T, H]: ||S_t||_F at every step
    A = implicit_attention(p, head=0)  # [T, T]: o_t = sum_i A[t, i] v_i

Shapes: B batch, T time, H heads, K key head dim, V value head dim, D hidden size. Everything a
probe holds is fp32 on the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import ops
from .config import ConfigError

FP32_TOLERANCE = 1e-4
"""Relative RMSE allowed between the probe's output and the torch backend's fp32 forward. With the fla
backend in fp32 the probe allows FLA's own output tolerance, `ops.FLA_OUTPUT_TOL` (relative RMSE as
`ops.relative_rmse` measures it)."""
HALF_TOLERANCE = 1e-2
"""Relative RMSE allowed for a 16-bit GDN layer. FLA's chunk kernel alone is that far from the fp32
recurrence at FLA's own 5e-3 (4.5e-3 on a bf16 layer, 256 wide, 300 tokens, H100), and the per-head
RMSNorm after it magnifies relative error where o is small: the kernel fed the probe's own features
lands 6.8e-3 from the layer's real forward, the probe's recurrence 7.1e-3."""


class ProbeMismatch(RuntimeError):
    """The probe's recomputed output differs from the layer's real forward beyond the tolerance."""


class ProbeMemoryError(ConfigError):
    """Keeping the requested states would take more memory than `max_state_bytes` allows."""


@dataclass
class LayerProbe:
    """What one Gated DeltaNet layer computed on the probed input (fp32, CPU).

    q, k [B, T, H, K] after the short conv, SiLU and L2 norm (q not yet scaled); v [B, T, H, V];
    g [B, T, H] log decay (alpha = exp(g)); beta [B, T, H] write strength; core_output
    [B, T, H, V] the recurrence's o_t = S_t^T (scale q_t); output [B, T, D] the layer's real
    output; state_norm [B, T, H] ||S_t||_F after every step; states [B, S, H, K, V] or None:
    S_t after each step in `state_steps`; output_error the relative RMSE between the layer's
    output and the probe's recomputation of it, checked to be <= tolerance.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    core_output: torch.Tensor
    output: torch.Tensor
    state_norm: torch.Tensor
    states: torch.Tensor | None
    state_steps: tuple[int, ...]
    scale: float
    allow_neg_eigval: bool
    output_error: float
    tolerance: float

    @property
    def alpha(self) -> torch.Tensor:
        """Decay alpha_t = exp(g_t) [B, T, H]."""
        return self.g.exp()

    def state_at(self, t: int) -> torch.Tensor:
        """S_t [B, H, K, V] for a kept step t (negative t counts from the end)."""
        T = self.q.shape[1]
        t = t % T if -T <= t < T else t
        if t not in self.state_steps:
            raise KeyError(f"S_{t} was not kept; capture with state_steps including {t} (kept: {self.state_steps})")
        return self.states[:, self.state_steps.index(t)]


@dataclass
class Probe:
    """Per-layer probes of one forward pass: `probe[i]` is the LayerProbe of GDN layer i."""

    input_ids: torch.Tensor
    layers: dict[int, LayerProbe]
    mixers: tuple[str, ...]

    def __getitem__(self, layer: int) -> LayerProbe:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not probed; probed GDN layers: {sorted(self.layers)}")
        return self.layers[layer]

    @property
    def max_output_error(self) -> float:
        """The largest relative RMSE between a probed layer's output and its recomputation."""
        return max(p.output_error for p in self.layers.values())


def resolve_state_steps(state_steps: str | Sequence[int] | None, T: int) -> tuple[int, ...]:
    """None -> (), "all" -> 0..T-1, a list -> its sorted distinct steps (negative counts from the end)."""
    if state_steps is None:
        return ()
    if isinstance(state_steps, str):
        if state_steps != "all":
            raise ConfigError(f"state_steps={state_steps!r}; use None, 'all' or a list of time steps")
        return tuple(range(T))
    bad = [t for t in state_steps if not -T <= int(t) < T]
    if bad:
        raise ConfigError(f"state_steps {bad} are outside [-{T}, {T}) for an input of {T} tokens")
    return tuple(sorted({int(t) % T for t in state_steps}))


def recurrence_with_states(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state_steps: Sequence[int] = (), scale: float | None = None,
                           window_bytes: int = 64 * 2**20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fp32 recurrence with ||S_t||_F at every step and S_t at the chosen steps only.

    Runs `ops.recurrent_gated_delta_rule` over windows of time, carrying the state between
    windows (the numbers are those of one pass), and keeps all of one window's states at a time
    (at most `window_bytes`), so the norms cost no memory that grows with T.

    Args: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state_steps sorted distinct t.
    Returns (o [B, T, H, V], norms [B, T, H], states [B, len(state_steps), H, K, V] or None), fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    window = max(1, min(T, window_bytes // (B * H * K * V * 4)))
    wanted = list(state_steps)
    state, outputs, norms, kept = None, [], [], []
    for start in range(0, T, window):
        span = slice(start, start + window)
        o, state, states = ops.recurrent_gated_delta_rule(q[:, span], k[:, span], v[:, span], g[:, span],
                                                          beta[:, span], initial_state=state, scale=scale,
                                                          state_steps="all")
        outputs.append(o.float())
        norms.append(torch.linalg.matrix_norm(states))                       # [B, W, H]
        local = [t - start for t in wanted if start <= t < start + window]
        if local:
            kept.append(states[:, local])
    states = torch.cat(kept, dim=1) if kept else None
    return torch.cat(outputs, dim=1), torch.cat(norms, dim=1), states


def _blocks(model) -> list:
    """The residual blocks of a gdn_lab CausalLM: `model.model.layers`."""
    return list(model.model.layers)


def _check_layers(model, layers: Sequence[int] | None, kinds: tuple[str, ...]) -> list[int]:
    """The layers (default: all) whose mixer is one of `kinds`; ConfigError naming those when another is asked for."""
    mixers = tuple(block.mixer for block in _blocks(model))
    matching = [i for i, m in enumerate(mixers) if m in kinds]
    if layers is None:
        return matching
    wrong = [i for i in layers if not 0 <= i < len(mixers) or mixers[i] not in kinds]
    if wrong:
        names = " or ".join(map(repr, kinds))
        raise ConfigError(f"layers {wrong} are not {names} layers of this model; its {names} layers are {matching}")
    return sorted(set(layers))


class _InputOutputRecorder:
    """Forward hooks that keep the input x and output y of some modules during one forward."""

    def __init__(self, modules: dict[int, torch.nn.Module]):
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._hook(i), with_kwargs=True) for i, module in modules.items()]

    def _hook(self, index: int):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            self.inputs[index], self.outputs[index] = x.detach(), output[0].detach()
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.3g} MiB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tolerance(layer, x: torch.Tensor) -> float:
    if x.dtype != torch.float32:
        return HALF_TOLERANCE
    return FP32_TOLERANCE if layer.kernel_backend(x.device) == "torch" else ops.FLA_OUTPUT_TOL


def _check_output(what: str, recomputed: torch.Tensor, real: torch.Tensor, tolerance: float, detail: str) -> float:
    """The relative RMSE of `recomputed` against `real`; ProbeMismatch (one line) above `tolerance`."""
    error = ops.relative_rmse(recomputed, real)
    if not error <= tolerance:
        raise ProbeMismatch(f"{what} (relative RMSE {error:.2e} > tolerance {tolerance:.0e}; {detail})")
    return error


@torch.no_grad()
def capture(model, input_ids: torch.Tensor, layers: Sequence[int] | None = None,
            state_steps: str | Sequence[int] | None = None, max_state_bytes: int = 256 * 2**20,
            tolerance: float | None = None) -> Probe:
    """Run `model` on `input_ids` [B, T] and probe its Gated DeltaNet layers.

    For each GDN layer in `layers` (default: all): q, k, v, g, beta from `layer.features`, the
    fp32 recurrence, ||S_t||_F at every step, S_t at `state_steps` (None: none; "all"; or a list
    of steps), and the layer's real output. The recomputed output must match the real one within
    `tolerance` (relative RMSE; default FP32_TOLERANCE on the fp32 torch backend, ops.FLA_OUTPUT_TOL
    with the fla backend in fp32, HALF_TOLERANCE for a 16-bit model), else ProbeMismatch. Keeping more than
    `max_state_bytes` of states raises ProbeMemoryError before any work is done.
    Works on either backend and any device; the Probe holds fp32 CPU tensors.
    """
    blocks = _blocks(model)
    layers = _check_layers(model, layers, ("gdn",))
    if not layers:
        raise ConfigError("this model has no Gated DeltaNet layers to probe (all layers are attention)")
    B, T = input_ids.shape
    steps = resolve_state_steps(state_steps, T)
    per_step = sum(B * blocks[i].attn.num_heads * blocks[i].attn.head_k_dim * blocks[i].attn.head_v_dim * 4
                   for i in layers)
    if steps and len(steps) * per_step > max_state_bytes:
        fit = max(1, max_state_bytes // per_step)
        raise ProbeMemoryError(f"keeping S_t at {len(steps)} steps of {len(layers)} layers needs "
                               f"{_megabytes(len(steps) * per_step)} > max_state_bytes = "
                               f"{_megabytes(max_state_bytes)}; pass at most {fit} steps, e.g. "
                               f"state_steps=list(range(0, {T}, {-(-T // fit)})), or fewer layers=[...], "
                               f"or raise max_state_bytes")
    with _InputOutputRecorder({i: blocks[i].attn for i in layers}) as recorder:
        model(input_ids)
    probes = {}
    for i in layers:
        layer, x, real = blocks[i].attn, recorder.inputs[i], recorder.outputs[i]
        f = layer.features(x)
        q, k, v, g, beta = (t.float() for t in (f.q, f.k, f.v, f.g, f.beta))
        o, norms, states = recurrence_with_states(q, k, v, g, beta, steps)
        recomputed = layer.finish(o.to(x.dtype), f.gate)
        layer_tolerance = _tolerance(layer, x) if tolerance is None else tolerance
        error = _check_output(f"GDN layer {i}: the probe's recomputed output differs from the layer's forward",
                              recomputed, real, layer_tolerance,
                              f"backend {layer.kernel_backend(x.device)}, {_dtype_name(x.dtype)}")
        probes[i] = LayerProbe(
            layer=i, q=q.cpu(), k=k.cpu(), v=v.cpu(), g=g.cpu(), beta=beta.cpu(), core_output=o.cpu(),
            output=real.float().cpu(), state_norm=norms.cpu(), states=None if states is None else states.cpu(),
            state_steps=steps, scale=layer.head_k_dim ** -0.5, allow_neg_eigval=layer.allow_neg_eigval,
            output_error=error, tolerance=layer_tolerance)
    return Probe(input_ids=input_ids.detach().cpu(), layers=probes, mixers=tuple(block.mixer for block in blocks))


@torch.no_grad()
def softmax_attention_map(model, input_ids: torch.Tensor, layer: int, head: int, batch_index: int = 0,
                          tolerance: float | None = None) -> torch.Tensor:
    """The attention probabilities [T, T] (rows: query t, columns: key i) of one softmax head, of a
    full ('attn') or sliding-window ('swa') attention layer.

    Recomputes q, k with the layer's projections, its short conv where it has one and RoPE
    (`Attention.heads`), applies the causal softmax of
    q k^T / sqrt(head_dim) (keys t - window < i <= t on a sliding-window layer), and checks that
    these probabilities times v, through o_proj, give the layer's real output (relative RMSE
    within `tolerance`: FP32_TOLERANCE for an fp32 model, ops.FLA_OUTPUT_TOL otherwise), else
    ProbeMismatch. fp32 CPU result.
    """
    _check_layers(model, [layer], ("attn", "swa"))
    attn = _blocks(model)[layer].attn
    if not 0 <= head < attn.num_heads:
        raise ConfigError(f"head={head}; layer {layer} has heads 0..{attn.num_heads - 1}")
    with _InputOutputRecorder({layer: attn}) as recorder:
        model(input_ids)
    x, real = recorder.inputs[layer], recorder.outputs[layer]
    B, T, _ = x.shape
    H, Hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    with torch.no_grad():  # the projections, the short conv where the layer has one, and RoPE
        q, k, v, _ = (t.float() for t in attn.heads(x, None, None))
    k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))                    # grouped KV heads
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    window = getattr(attn, "window", None)  # SlidingWindowAttention's
    if window is not None:
        causal = causal.triu(1 - window)    # key i visible to query t when t - window < i
    probabilities = ((q @ k.transpose(-1, -2)) * d ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    recomputed = attn.o_proj((probabilities @ v).transpose(1, 2).reshape(B, T, -1).to(x.dtype))
    default = FP32_TOLERANCE if x.dtype == torch.float32 else ops.FLA_OUTPUT_TOL
    _check_output(f"attention layer {layer}: the probe's recomputed output differs from the layer's forward",
                  recomputed, real, default if tolerance is None else tolerance,
                  _dtype_name(x.dtype))
    return probabilities[batch_index, head].cpu()


def implicit_attention(features, head: int, batch_index: int = 0, scale: float | None = None,
                       check: bool = True) -> torch.Tensor:
    """The token-to-token weights A [T, T] of one GDN head: o_t = sum_i A[t, i] v_i.

    `features`: anything with q, k [B, T, H, K], g, beta [B, T, H] (a LayerProbe, or the
    GDNFeatures of `layer.features`). Starting from S_0 = 0, unrolling
    S_t = P_t S_{t-1} + beta_t k_t v_t^T with P_t = alpha_t (I - beta_t k_t k_t^T) gives
        S_t = sum_{i<=t} P_t P_{t-1} ... P_{i+1} beta_i k_i v_i^T,
    and the transitions P do not depend on v, so o_t = S_t^T (scale q_t) is linear in the v's:
        A[t, i] = scale q_t^T P_t ... P_{i+1} beta_i k_i   (i <= t; 0 above the diagonal).
    All entries at once, with the WY form of `ops.chunk_gated_delta_rule` run as one chunk:
    gamma_t = g_1 + ... + g_t, D[t, i] = exp(gamma_t - gamma_i) for i <= t (else 0), and
    L[t, i] = beta_t D[t, i] k_t . k_i for i < t (else 0),
        A = scale (Q K^T * D) (I + L)^{-1} diag(beta).
    Computed in fp64 (cumulative log-decays grow with T; the solve is a T x T system) and
    returned in fp32; O(T^2 K + T^3): under half a second at T = 512 on one CPU core.
    Entries can be negative (the delta rule erases what a key held before writing). With
    `check` and a LayerProbe, A v must reproduce the head's recurrent output within
    FP32_TOLERANCE (relative RMSE), else ProbeMismatch.
    """
    q = features.q[batch_index, :, head].double()                                 # [T, K]
    k = features.k[batch_index, :, head].double()
    g = features.g[batch_index, :, head].double()                                 # [T]
    beta = features.beta[batch_index, :, head].double()
    T, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    gamma = g.cumsum(0)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    decay = (gamma[:, None] - gamma[None, :]).masked_fill(~causal, float("-inf")).exp()  # D
    L = beta[:, None] * (k @ k.T) * decay                      # the solver reads the strict lower triangle only
    weights = torch.linalg.solve_triangular(L, torch.diag(beta), upper=False, unitriangular=True)
    A = (scale * ((q @ k.T) * decay) @ weights).float()
    if check and isinstance(features, LayerProbe):
        v, o = features.v[batch_index, :, head].float(), features.core_output[batch_index, :, head]
        _check_output(f"implicit attention of layer {features.layer} head {head}: A v differs from the recurrence's "
                      f"output", A @ v, o, FP32_TOLERANCE, f"T = {T}, fp32")
    return A


def attention_hit_rate(A: torch.Tensor, query_positions: Sequence[int], key_positions: Sequence[int],
                       value_norms: torch.Tensor | None = None) -> float:
    """Fraction of query rows t whose largest term sits on the expected key position.

    A [T, T] (implicit or softmax attention); query_positions[j] is a row and key_positions[j]
    the column it should draw on (for MQAR: a query and the value of its key-value pair). With
    value_norms [T] (||v_i||), a row is ranked by |A[t, i]| ||v_i||, the size of token i's term
    A[t, i] v_i in o_t (the norm-based reading of attention of Kobayashi et al., 2020), rather
    than by the weight A[t, i] alone.
    """
    if len(query_positions) != len(key_positions) or not query_positions:
        raise ValueError(f"pass one expected key position per query (got {len(query_positions)} queries and "
                         f"{len(key_positions)} keys)")
    rows = A[list(query_positions)]
    if value_norms is not None:
        rows = rows.abs() * value_norms.to(rows)
    top = rows.argmax(-1)
    return (top == torch.as_tensor(list(key_positions), device=A.device)).float().mean().item()


def effective_span(g: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Memory span per head from the decay alone: the n with exp(n * mean(g)) = threshold.

    Over n steps a write is multiplied by alpha_{t-n+1} ... alpha_t = exp(g_{t-n+1} + ... + g_t),
    whose log is n * mean(g) on average; the span is where that reaches log(threshold):
    n = log(threshold) / mean(g). For a constant alpha it is the n with alpha^n = threshold
    (alpha = 0.5, threshold 0.1: 3.32 steps); a head that never decays (g = 0) has span inf.
    This ignores the delta rule's erasures, which only shorten what a head remembers.

    Args: g [..., T, H] log decay (<= 0). Returns [H] float (steps), averaged over every other axis.
    """
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold={threshold}; use a fraction in (0, 1), e.g. 0.1")
    mean_log_decay = g.float().reshape(-1, g.shape[-1]).mean(0)
    span = math.log(threshold) / mean_log_decay
    return torch.where(mean_log_decay < 0, span, torch.full_like(span, math.inf))
