"""Layers: the token mixers (Gated DeltaNet, softmax attention, sliding-window attention), the
SwiGLU MLP and the pre-norm block.

Mixers. `MIXERS` maps each name `ModelConfig.mixers` uses ('gdn', 'attn', 'swa') to its class;
every class builds itself from the config (`from_config`, see `FromConfig`) and makes its empty
decoding state (`empty_state`), so `Block` knows no mixer by name and a new mixer is one class
and one entry here (plus the config field that places it: `config.MIXER_LAYER_FIELDS`).

`GatedDeltaNet` carries exactly the parameters of `fla.layers.GatedDeltaNet` (FLA 0.6.0), so a
state_dict moves between the two. It runs on one of two backends:

- "torch": `features()` (projections, short conv, gates; pure torch) -> `gdn_lab.ops` -> `finish()`.
  Runs everywhere; the readable path.
- "fla": FLA's Triton kernels (fused causal conv, chunk / fused-recurrent gated delta rule with
  the gates, L2 norm and sigmoid computed inside the kernel, fused gated RMSNorm), the same
  kernels FLA's own layer calls. CUDA only. A layer whose `gates()` is edited (a subclass, or
  `layer.gates = ...`: see `GatedDeltaNet.gates`) hands the kernels its computed g and beta
  instead, so one gate formula runs on both backends.
- "auto": "fla" on a CUDA device where FLA imports, else "torch"; resolved per device on the
  first forward and cached.

Decoding state. `forward(x, state)` consumes a state object and updates it in place: under
`torch.no_grad()` the state's tensors are overwritten (fixed buffers, so a CUDA graph can
capture a decode step); with autograd on, the state's fields are rebound to new tensors so a
backward through several calls works. Either way the same object comes back.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import (
    BACKENDS,
    ConfigError,
    ModelConfig,
    check_attention_conv_size,
    check_gdn_settings,
    check_recompute_gdn,
)
from .env import BackendError, check_training_backend, resolve_backend
from .stacked import stacked_linear

L2NORM_EPS = 1e-6  # FLA's l2norm epsilon (fla.modules.l2norm), used for q and k


class FromConfig:
    """`cls.from_config(config, layer_idx)`: the module a `ModelConfig` describes.

    Every constructor argument named like a ModelConfig field takes that field's value, and
    `CONFIG_FIELDS` maps the arguments whose field has another name (attention's `num_heads` is
    `attn_num_heads`). A new option is therefore a config field and a constructor argument of the
    same name, nothing copied by hand. Arguments with no field keep their defaults.
    """

    CONFIG_FIELDS: dict[str, str] = {}

    @classmethod
    def config_arguments(cls, config: ModelConfig) -> dict:
        """The constructor's keyword arguments taken from `config` (layer_idx aside)."""
        fields = {item.name for item in dataclasses.fields(config)}
        arguments = {}
        for name in inspect.signature(cls).parameters:
            source = cls.CONFIG_FIELDS.get(name, name)
            if source in fields and name != "layer_idx":
                arguments[name] = getattr(config, source)
        return arguments

    @classmethod
    def from_config(cls, config: ModelConfig, layer_idx: int | None = None):
        return cls(**cls.config_arguments(config), layer_idx=layer_idx)


class KernelBackend:
    """Mixin for modules that can run FLA kernels: `backend` is 'auto', 'fla' or 'torch'."""

    backend: str

    def _init_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r}; use one of {BACKENDS}")
        self.backend = backend
        self._resolved_backends: dict[str, str] = {}

    def set_backend(self, backend: str):
        """Switch this module and every sub-module that has a backend; returns self."""
        for module in self.modules():
            if isinstance(module, KernelBackend):
                module._init_backend(backend)
        return self

    def kernel_backend(self, device: torch.device) -> str:
        """'fla' or 'torch' on `device` ('auto' resolved once per device)."""
        key = str(device)
        if key not in self._resolved_backends:
            self._resolved_backends[key] = resolve_backend(self.backend, device)
        return self._resolved_backends[key]


def _assign(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """New contents for a state field: written into `buffer` without autograd, else a new tensor."""
    if torch.is_grad_enabled():
        return value
    return buffer.copy_(value)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, C] through a causal depthwise conv of width W: weight [C, 1, W], bias [C] or None,
    starting from `history` [B, C, W - 1] (the inputs before x; zeros when None). Returns (y [B, T, C],
    the last W - 1 inputs [B, C, W - 1]: the next call's history). No activation."""
    channels, width = x.shape[-1], weight.shape[-1]
    history = history.to(x.dtype) if history is not None else x.new_zeros(x.shape[0], channels, width - 1)
    window = torch.cat([history, x.transpose(1, 2)], dim=-1)                     # [B, C, W - 1 + T]
    return F.conv1d(window, weight, bias, groups=channels).transpose(1, 2), window[..., -(width - 1):]


def l2_normalize(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32, returned in x's dtype (as FLA's l2norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, optionally gated: `norm(x) * weight * SiLU(gate)` (fp32 inside).

    The output norm of a GDN head (`o_norm`): FLA's FusedRMSNormGated with `use_gate=True`,
    its RMSNorm without. The parameter is `weight` [dim] either way.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim], gate [..., dim] or None -> [..., dim] in x's dtype."""
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if gate is not None:
            y = y * F.silu(gate.float())
        return y.to(x.dtype)


@dataclass
class GDNFeatures:
    """What the recurrence consumes, as `GatedDeltaNet.features` prepares it.

    q, k [B, T, H, K] (after conv, SiLU, L2 norm; not yet scaled), v [B, T, H, V],
    g [B, T, H] fp32 log-decay (alpha = exp(g); zeros without decay), beta [B, T, H] fp32,
    conv_state [B, 2*key_dim + value_dim, conv_size - 1]: the conv inputs to carry on (None
    without a short conv), gate [B, T, H, V]: x W_g, the output gate before SiLU (None
    without use_gate); `finish` takes it.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    conv_state: torch.Tensor | None
    gate: torch.Tensor | None = None


@dataclass
class GDNProjections:
    """The six input projections of x (`GatedDeltaNet.project`).

    q, k [B, T, key_dim], v [B, T, value_dim] (x W_q, x W_k, x W_v; zero at masked steps),
    a [B, T, H] (x W_a; None without decay), b [B, T, H] (x W_b; None with a fixed beta),
    gate [B, T, H, V] (x W_g; None without use_gate). All in the matmul's dtype; no activation
    applied yet. From one matmul they are views into its output (`joint_qkv` holds q, k and v
    side by side); from `separate` GEMMs, q, k, v and gate are contiguous tensors of their own.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor | None
    b: torch.Tensor | None
    gate: torch.Tensor | None
    joint_qkv: torch.Tensor | None = None  # the one tensor q, k, v are views of, when they are

    @property
    def qkv(self) -> torch.Tensor:
        """[B, T, 2*key_dim + value_dim]: q, k and v side by side, the short conv's channels."""
        return self.joint_qkv if self.joint_qkv is not None else torch.cat([self.q, self.k, self.v], dim=-1)


@dataclass
class GDNState:
    """Decoding state of one GDN layer.

    conv [B, 2*key_dim + value_dim, conv_size - 1]: the last conv inputs (q, k, v channels in
    that order; width 0 without a short conv), in the layer's dtype. FLA's cache keeps a
    width-`conv_size` window per projection whose oldest column is never read.
    recurrent [B, H, K, V] fp32: S in gdn_lab's layout (FLA's layer cache holds its transpose).
    """

    conv: torch.Tensor
    recurrent: torch.Tensor

    def update(self, conv: torch.Tensor | None, recurrent: torch.Tensor) -> None:
        """Store the new conv window (None: keep the old) and S [B, H, K, V]: in place under no_grad, else rebound."""
        if conv is not None:
            self.conv = _assign(self.conv, conv)
        self.recurrent = _assign(self.recurrent, recurrent)


class GatedDeltaNet(FromConfig, KernelBackend, nn.Module):
    """Gated DeltaNet token mixer with `fla.layers.GatedDeltaNet`'s parameters (FLA 0.6.0).

    Per head (K = head_dim, V = head_dim * expand_v), for x [B, T, D]:
        q, k, v = SiLU(causal depthwise conv(x W_q, x W_k, x W_v)); q, k L2-normalised
        beta = sigmoid(x W_b)  (x2 with allow_neg_eigval; the constant fixed_beta when set)
        g = -exp(A_log) * softplus(x W_a + dt_bias)   (g = 0 with use_decay=False)
        o = gated delta rule(q, k, v, g, beta)        (gdn_lab.ops or FLA's kernels)
        y = o_proj(RMSNorm(o) * SiLU(x W_g))          (plain RMSNorm with use_gate=False)

    `use_decay=False` is the DeltaNet ablation: no a_proj, A_log or dt_bias. `fixed_beta` holds
    beta at that constant (the ablation of a learned write strength): no b_proj. `dt_min`, `dt_max`:
    the range of the decay init (`reset_decay_parameters`). Grouped value heads (FLA's
    num_v_heads > num_heads) are not supported: value heads = num_heads.

    A new gate formula goes in `gates` (override it; its docstring says how): both backends and the
    probes follow it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        expand_v: float = 2.0,
        use_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        use_decay: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        fixed_beta: float | None = None,
        recompute_gdn: str = "",
        norm_eps: float = 1e-5,
        backend: str = "auto",
        layer_idx: int | None = None,
    ):
        super().__init__()
        check_gdn_settings(head_dim, expand_v, use_short_conv, conv_size, dt_min, dt_max, fixed_beta, allow_neg_eigval)
        check_recompute_gdn(recompute_gdn)
        head_v_dim = head_dim * expand_v
        self._init_backend(backend)
        self.hidden_size, self.num_heads, self.expand_v = hidden_size, num_heads, expand_v
        self.head_k_dim, self.head_v_dim = head_dim, int(round(head_v_dim))
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        self.use_gate, self.use_short_conv, self.use_decay = use_gate, use_short_conv, use_decay
        self.allow_neg_eigval, self.conv_size, self.conv_bias = allow_neg_eigval, conv_size, conv_bias
        self.dt_min, self.dt_max, self.fixed_beta = dt_min, dt_max, fixed_beta
        self.recompute = recompute_gdn  # "", "core" or "mixer": what training passes recompute in the backward
        self.layer_idx = layer_idx
        self._training_backend_checked = False

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_decay:  # registered in FLA's order (a_proj, b_proj, A_log, dt_bias): same state_dict key order
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if fixed_beta is None:  # a fixed beta has nothing to learn: no b_proj
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if use_decay:
            self.A_log = nn.Parameter(torch.empty(num_heads))
            self.dt_bias = nn.Parameter(torch.empty(num_heads))
            self.reset_decay_parameters()
        if use_short_conv:
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (
                nn.Conv1d(dim, dim, conv_size, groups=dim, padding=conv_size - 1, bias=conv_bias)
                for dim in (self.key_dim, self.key_dim, self.value_dim))
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    @torch.no_grad()
    def reset_decay_parameters(self) -> None:
        """FLA's init: A ~ U(0, 16), A_log = log A; dt log-uniform in [dt_min, dt_max] (FLA: [1e-3, 0.1];
        floor min(1e-4, dt_min)), dt_bias = softplus^-1(dt). Both are excluded from weight decay
        (`_no_weight_decay`)."""
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0, 16).log())
        log_min, log_max = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand_like(self.dt_bias, dtype=torch.float32) * (log_max - log_min)
                       + log_min).clamp(min=min(1e-4, self.dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    @property
    def conv_dim(self) -> int:
        """Channels of the short conv: q, k and v side by side (2 * key_dim + value_dim)."""
        return 2 * self.key_dim + self.value_dim

    def empty_state(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, max_len: int | None = None) -> GDNState:
        """A zero state: conv [B, 2*key_dim + value_dim, conv_size - 1] in `dtype` (the layer's
        by default), recurrent [B, H, K, V] fp32, on `device` (the layer's by default). Its size
        does not depend on the context: `max_len` (the mixers' common signature) is not used."""
        weight = self.q_proj.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        width = self.conv_size - 1 if self.use_short_conv else 0
        return GDNState(
            conv=torch.zeros(batch_size, self.conv_dim, width, device=device, dtype=dtype),
            recurrent=torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim,
                                  device=device, dtype=torch.float32),
        )

    def _conv_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The three depthwise convs as one: weight [2*key_dim + value_dim, 1, W], bias or None."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs]) if self.conv_bias else None
        return weight, bias

    def project(self, x: torch.Tensor, mask: torch.Tensor | None = None, separate: bool = False) -> GDNProjections:
        """x [B, T, D] through q, k, v, a, b and g_proj as one matmul (`stacked_linear`; the two
        H-wide gate projections stop being GEMMs of their own), or with `separate` one GEMM per
        output (contiguous q, k, v, gate: what FLA's training kernels read without copying).
        mask [B, T] bool zeroes q, k, v at padded steps (padded steps feed zeros to the conv:
        left padding is exact)."""
        H = self.num_heads
        learned_beta = self.fixed_beta is None
        gate_inputs = ([self.a_proj] if self.use_decay else []) + ([self.b_proj] if learned_beta else [])
        qkv_linears = [self.q_proj, self.k_proj, self.v_proj]
        groups = [[linear] for linear in qkv_linears] if separate else [qkv_linears]
        if gate_inputs:
            groups.append(gate_inputs)
        if self.use_gate:
            groups.append([self.g_proj])
        outputs = list(stacked_linear(x, groups, separate=separate))
        gate = outputs.pop().unflatten(-1, (H, self.head_v_dim)) if self.use_gate else None
        ab = outputs.pop() if gate_inputs else None
        a = ab[..., :H] if self.use_decay else None
        b = ab[..., -H:] if learned_beta else None
        if mask is not None:  # outputs: [q, k, v] or [qkv]
            outputs = [z * mask[..., None].to(z.dtype) for z in outputs]
        joint = None if separate else outputs[0]
        q, k, v = outputs if separate else self._split_qkv(joint)
        return GDNProjections(q=q, k=k, v=v, a=a, b=b, gate=gate, joint_qkv=joint)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, 2*key_dim + value_dim] -> q, k [B, T, key_dim], v [B, T, value_dim] (views)."""
        return qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)

    def _split_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k [B, T, key_dim], v [B, T, value_dim] -> [B, T, H, K], [B, T, H, K], [B, T, H, V]."""
        B, T, H = q.shape[0], q.shape[1], self.num_heads
        return q.reshape(B, T, H, -1), k.reshape(B, T, H, -1), v.reshape(B, T, H, -1)

    def gates(self, p: GDNProjections) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, beta), both [B, T, H], from the projections `p`: log-decay
        g = -exp(A_log) softplus(x W_a + dt_bias) (zeros without decay; alpha = exp(g)) and write
        strength beta = sigmoid(x W_b) (x2 with allow_neg_eigval; `fixed_beta` everywhere when set).

        The hook for a new gate formula, on both backends. Override it in a subclass, or on one layer
        `layer.gates = types.MethodType(my_gates, layer)` with `my_gates(layer, p) -> (g, beta)`; the
        torch path, the probes and, once `gates` is not this method (`custom_gates`), the fla path
        all use it: the fla path then hands the computed g and beta to FLA's kernels. Left as it is,
        the fla path keeps FLA's fused in-kernel gate, the same formula (tests/test_layers.py checks
        this method against FLA's reference): edit the formula through the hook, not here. The
        caller casts to fp32 and zeroes padded steps; g must stay <= 0 for a decay in (0, 1].
        """
        if self.fixed_beta is not None:
            B, T = p.q.shape[:2]
            beta = torch.full((B, T, self.num_heads), self.fixed_beta, dtype=torch.float32, device=p.q.device)
        else:
            beta = torch.sigmoid(p.b.float())
            if self.allow_neg_eigval:
                beta = beta * 2
        if self.use_decay:
            g = -self.A_log.float().exp() * F.softplus(p.a.float() + self.dt_bias.float())
        else:
            g = torch.zeros_like(beta)
        return g, beta

    @property
    def custom_gates(self) -> bool:
        """True when `gates()` is not FLA's formula, so the fla backend passes the kernels its g and beta
        (not the raw inputs with FLA's in-kernel gate): `gates` is not `GatedDeltaNet.gates` (a
        subclass overrides it, or it was set on this layer). A gate variant switched on by a
        constructor flag adds its flag here (tests/test_layers.py, GATE_VARIANTS, checks it), as
        `fixed_beta` does: FLA's kernels have no constant-beta mode, so they get the computed beta."""
        return self._overridden("gates") or self.fixed_beta is not None

    def _overridden(self, name: str) -> bool:
        """True when method `name` is not GatedDeltaNet's own: a subclass's, or one set on this layer."""
        return getattr(getattr(self, name), "__func__", None) is not getattr(GatedDeltaNet, name)

    def _gates(self, p: GDNProjections, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`gates(p)` as fp32 [B, T, H], with g = beta = 0 at padded steps (mask [B, T] False)."""
        g, beta = (z.float() for z in self.gates(p))
        if mask is not None:
            g, beta = g * mask[..., None], beta * mask[..., None]
        return g, beta

    def fla_gate_arguments(self, p: GDNProjections, mask: torch.Tensor | None = None,
                           beta_dtype: torch.dtype | None = None) -> dict:
        """The gate arguments the fla backend hands FLA's GDN kernels (g, beta and flags), from `p`.

        `gates` as it is: FLA's fused gate, the same formula computed in the kernel from the raw
        inputs: g = x W_a [B, T, H] (use_gate_in_kernel, A_log, dt_bias; fp32 zeros without decay),
        beta = x W_b (use_beta_sigmoid_in_kernel, allow_neg_eigval). An edited `gates` (`custom_gates`),
        or a mask (padded steps need g = beta = 0 exactly): `gates()`' own g [B, T, H] fp32 and beta
        (in `beta_dtype`, the kernel's v dtype), no flags.
        """
        if mask is None and not self.custom_gates:
            args = dict(beta=p.b, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=self.allow_neg_eigval)
            if self.use_decay:
                return dict(args, g=p.a, use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias)
            return dict(args, g=p.b.new_zeros(p.b.shape, dtype=torch.float32))
        g, beta = self._gates(p, mask)
        return dict(g=g, beta=beta.to(beta_dtype or beta.dtype))

    def features(self, x: torch.Tensor, state: GDNState | None = None,
                 mask: torch.Tensor | None = None) -> GDNFeatures:
        """Everything before the recurrence, in pure torch: the torch backend's first half, and what
        the probes recompute (the fla backend runs FLA's fused conv and L2 norm in its place).

        x [B, T, D]; state supplies the conv inputs of earlier steps (read, not written);
        mask [B, T] bool, False at padded steps (conv input zeroed, g = beta = 0).
        """
        return self.features_from(self._forward_projections(x, state, mask), state, mask)

    def _forward_projections(self, x: torch.Tensor, state: GDNState | None,
                             mask: torch.Tensor | None) -> GDNProjections:
        """`project` in the layout the forward uses: separate GEMMs on the fla backend when training or
        prefilling without a state (contiguous inputs for FLA's kernels), one matmul otherwise; `features`
        uses it too, so that the probes recompute the forward's bf16 roundings."""
        return self.project(x, mask, separate=state is None and self.kernel_backend(x.device) == "fla")

    def features_from(self, p: GDNProjections, state: GDNState | None = None,
                      mask: torch.Tensor | None = None) -> GDNFeatures:
        """`features` from the projections `p`: short conv, SiLU, L2 norm of q and k, the gates."""
        qkv, conv_state = p.qkv, None
        if self.use_short_conv:
            weight, bias = self._conv_parameters()
            qkv, conv_state = causal_depthwise_conv(qkv, weight, bias, None if state is None else state.conv)
        q, k, v = self._split_heads(*self._split_qkv(F.silu(qkv)))
        g, beta = self._gates(p, mask)
        return GDNFeatures(l2_normalize(q), l2_normalize(k), v, g, beta, conv_state, p.gate)

    def gated_norm(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """o [B, T, H, V], gate [B, T, H, V] (x W_g; None without use_gate) -> [B, T, H, V]: RMSNorm per
        head, times SiLU(gate) (FLA's fused kernel on the fla backend)."""
        if self.kernel_backend(o.device) == "fla":
            from fla.modules.norm.fused_norm_gate import rms_norm_gated
            from fla.modules.norm.layernorm import rms_norm

            weight, eps = self.o_norm.weight, self.o_norm.eps
            return (rms_norm_gated(x=o, g=gate, weight=weight, bias=None, activation="swish", eps=eps)
                    if self.use_gate else rms_norm(o, weight, None, eps=eps))
        return self.o_norm(o, gate)

    def finish(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """o [B, T, H, V], gate [B, T, H, V] (x W_g; None without use_gate) -> y [B, T, D]:
        RMSNorm per head, times SiLU(gate), then o_proj."""
        B, T = o.shape[:2]
        return self.o_proj(self.gated_norm(o, gate).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, state: GDNState | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, GDNState | None]:
        """x [B, T, D] -> (y [B, T, D], state). With `state` (see `empty_state`), the layer starts
        from it and updates it in place; mask [B, T] bool marks real tokens (False = padding:
        the state is left untouched there, and y at those steps is finite but meaningless)."""
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
        if self._recomputing("mixer", state):
            return _checkpoint(self._mix, x, None, mask)
        return self._mix(x, state, mask)

    def _recomputing(self, part: str, state: GDNState | None) -> bool:
        """Whether this pass recomputes `part` ('mixer' or 'core') in the backward: `recompute_gdn` asks
        for it, and the pass trains (autograd records it, and no decoding state is carried)."""
        return self.recompute == part and state is None and torch.is_grad_enabled()

    def _mix(self, x: torch.Tensor, state: GDNState | None,
             mask: torch.Tensor | None) -> tuple[torch.Tensor, GDNState | None]:
        """`forward` on either backend: the projections, the core (`_core`: conv, recurrence, gated norm),
        o_proj."""
        fla = self.kernel_backend(x.device) == "fla"
        if fla:
            if self._overridden("features"):
                raise BackendError(f"{type(self).__name__}.features is customised, but the fla backend runs FLA's "
                                   f"fused conv and L2 norm instead of it: use backend='torch' "
                                   f"(model.set_backend('torch')), or put the change in gates(), project() or "
                                   f"finish(), which both backends call")
            if torch.is_grad_enabled() and not self._training_backend_checked:
                check_training_backend("fla", x.device)
                self._training_backend_checked = True
        p = self._forward_projections(x, state, mask)
        # `finish` is the output hook both backends call; left as it is, its gated norm joins the core
        # (recomputed with it under recompute_gdn='core') and its o_proj stays outside
        norm = not self._overridden("finish")
        if self._recomputing("core", state):
            # the projections' outputs are what the backward keeps; passed as tensors so checkpoint saves them
            names = [item.name for item in dataclasses.fields(p)]
            o, state = _checkpoint(lambda *values: self._core(GDNProjections(*values), None, mask, fla, norm),
                                   *(getattr(p, name) for name in names))
        else:
            o, state = self._core(p, state, mask, fla, norm)
        if not norm:
            return self.finish(o, p.gate), state
        B, T = x.shape[:2]
        return self.o_proj(o.reshape(B, T, -1)), state

    def _core(self, p: GDNProjections, state: GDNState | None, mask: torch.Tensor | None, fla: bool,
              norm: bool = True) -> tuple[torch.Tensor, GDNState | None]:
        """From the projections `p` to o [B, T, H, V]: short conv, recurrence (updating `state` when one
        is carried) and, with `norm`, the gated norm (RMSNorm times SiLU(gate))."""
        if fla:
            o, state = self._recurrence_fla(p, state, mask)
        else:
            f = self.features_from(p, state, mask)
            o, final_state = ops.gated_delta_rule(f.q, f.k, f.v, f.g, f.beta,
                                                  initial_state=None if state is None else state.recurrent)
            if state is not None:
                state.update(f.conv_state, final_state)
        return (self.gated_norm(o, p.gate) if norm else o), state

    def _recurrence_fla(self, p: GDNProjections, state: GDNState | None,
                        mask: torch.Tensor | None) -> tuple[torch.Tensor, GDNState | None]:
        """Conv and recurrence through FLA's kernels, called as `fla.layers.GatedDeltaNet` calls them:
        o [B, T, H, V] (before the gated norm) and the state, updated in place when one is carried."""
        from fla.modules.convolution import causal_conv1d
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        conv_state = None
        if self.use_short_conv and state is None:
            # training / prefill without a cache: one conv per projection on its contiguous input, each
            # writing a contiguous q, k or v (one conv over the three would leave strided q, k, v, which
            # FLA's GDN kernel copies)
            q, k, v = (causal_conv1d(x=z, weight=conv.weight.squeeze(1), bias=conv.bias, activation="silu")[0]
                       for z, conv in ((p.q, self.q_conv1d), (p.k, self.k_conv1d), (p.v, self.v_conv1d)))
            q, k, v = self._split_heads(q, k, v)
        elif self.use_short_conv:
            weight, bias = self._conv_parameters()
            window = F.pad(state.conv, (1, 0))   # FLA's conv cache is W wide
            qkv, final_window = causal_conv1d(x=p.qkv, weight=weight.squeeze(1), bias=bias, initial_state=window,
                                              output_final_state=True, activation="silu")
            conv_state = final_window[..., 1:]
            q, k, v = self._split_heads(*self._split_qkv(qkv))
        else:
            q, k, v = self._split_heads(F.silu(p.q), F.silu(p.k), F.silu(p.v))
        kernel = (fused_recurrent_gated_delta_rule if q.shape[1] <= 64 and not torch.is_grad_enabled()
                  else chunk_gated_delta_rule)
        # The state layout is a compile-time switch of the kernels. With no state in or out (training),
        # take FLA's own layer's [V, K] variants, so both run the same kernels; a carried state is [K, V].
        o, final_state = kernel(q=q, k=k, v=v, **self.fla_gate_arguments(p, mask, beta_dtype=v.dtype),
                                initial_state=None if state is None else state.recurrent,
                                output_final_state=state is not None, use_qk_l2norm_in_kernel=True,
                                state_v_first=state is None)
        if state is not None:
            state.update(conv_state, final_state)
        return o, state


def _checkpoint(function, *args):
    """`function(*args)` with its activations recomputed in the backward (`torch.utils.checkpoint`, the
    non-reentrant kind). No RNG runs inside a GDN layer, so no RNG state is saved and restored, which
    CUDA-graph capture would forbid."""
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


@dataclass
class KVState:
    """Decoding state of one attention layer.

    k, v [B, Hkv, Tmax, head_dim]; length [] long (slots filled, the same for every sequence);
    valid [B, Tmax] bool (False at padded slots); position [B] long (RoPE position of each
    sequence's next token: left padding does not count); conv [B, hidden + 2*Hkv*head_dim, W - 1]:
    the last inputs of the short conv (q, k, v channels in that order; width 0 without one).
    Without `max_len` the KV buffers grow by concatenation (Tmax == length); with it they are
    preallocated and written in place. The conv window is always written in place under no_grad.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor
    conv: torch.Tensor
    max_len: int | None = None


def rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half convention (FLA's and Llama's): x [B, T, H, d], positions [B, T] or [T]."""
    angles = positions[..., None].float() * inv_freq                       # [B, T, d/2]
    cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(FromConfig, nn.Module):
    """Llama-style causal softmax attention: RoPE, grouped KV heads, SDPA.

    Parameter names follow `fla.layers.Attention` (q_proj, k_proj, v_proj, o_proj, no biases),
    but the kernel is `F.scaled_dot_product_attention`, so no flash-attn is needed.
    `conv_size` >= 2 adds a causal depthwise conv of that width on q, k and v after their
    projections, before RoPE (q_conv1d, k_conv1d, v_conv1d, no bias, no activation; the
    "attention with short conv" of zoology's MQAR baselines), initialised to the identity;
    0 (the default) has none, and FLA's parameters. `from_config` takes attn_num_heads,
    attn_num_kv_heads, rope_theta and attn_conv_size.
    """

    CONFIG_FIELDS = {"num_heads": "attn_num_heads", "num_kv_heads": "attn_num_kv_heads", "conv_size": "attn_conv_size"}

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 rope_theta: float = 1e4, conv_size: int = 0, layer_idx: int | None = None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
            raise ConfigError(f"attention needs hidden_size % num_heads == 0, num_heads % num_kv_heads == 0 and "
                              f"an even head dim; got {hidden_size}, {num_heads}, {num_kv_heads}")
        check_attention_conv_size(conv_size, "attention conv_size")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.conv_size, self.layer_idx = conv_size, layer_idx
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=False)
        if conv_size:
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (
                nn.Conv1d(dim, dim, conv_size, groups=dim, padding=conv_size - 1, bias=False)
                for dim in (hidden_size, self.kv_dim, self.kv_dim))
            self.reset_conv_parameters()
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def empty_state(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> KVState:
        """An empty KV cache; with `max_len`, fixed buffers [B, Hkv, max_len, head_dim]; a zero conv
        window [B, conv_dim, conv_size - 1] (width 0 without a short conv)."""
        weight = self.k_proj.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        slots = max_len or 0
        shape = (batch_size, self.num_kv_heads, slots, self.head_dim)
        conv_width = self.conv_size - 1 if self.conv_size else 0
        return KVState(k=torch.zeros(shape, device=device, dtype=dtype),
                       v=torch.zeros(shape, device=device, dtype=dtype),
                       length=torch.zeros((), device=device, dtype=torch.long),
                       valid=torch.zeros(batch_size, slots, device=device, dtype=torch.bool),
                       position=torch.zeros(batch_size, device=device, dtype=torch.long),
                       conv=torch.zeros(batch_size, self.conv_dim, conv_width, device=device, dtype=dtype),
                       max_len=max_len)

    @property
    def conv_dim(self) -> int:
        """Channels of the short conv: q, k and v side by side (hidden_size + 2 * kv_dim)."""
        return self.hidden_size + 2 * self.kv_dim

    @torch.no_grad()
    def reset_conv_parameters(self) -> None:
        """Identity init of the short convs (last tap 1, earlier taps 0): a fresh layer computes what
        it would without them. `CausalLM._init_weights` calls it after its N(0, std) conv init."""
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.weight.zero_()
            conv.weight[..., -1] = 1

    def short_conv(self, qkv: torch.Tensor, state: KVState | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """qkv [B, T, conv_dim] (x W_q, x W_k, x W_v side by side) -> the causal depthwise conv of it,
        [B, T, conv_dim], no activation. The conv starts from `state.conv` [B, conv_dim, W - 1]
        (zeros without a state) and leaves the last W - 1 inputs there; mask [B, T] bool zeroes
        the inputs at padded steps, so left padding is exact."""
        if mask is not None:
            qkv = qkv * mask[..., None].to(qkv.dtype)
        weight = torch.cat([conv.weight for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d)])
        y, tail = causal_depthwise_conv(qkv, weight, history=None if state is None else state.conv)
        if state is not None:
            state.conv = _assign(state.conv, tail)
        return y

    @staticmethod
    def _append(state: KVState, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Write k, v [B, Hkv, T, hd] and valid [B, T] after the filled slots; returns the slot
        index of the first new token ([] long)."""
        T = k.shape[2]
        start = state.length.clone()
        if state.max_len is None:
            state.k = torch.cat([state.k, k.to(state.k.dtype)], dim=2)
            state.v = torch.cat([state.v, v.to(state.v.dtype)], dim=2)
            state.valid = torch.cat([state.valid, valid], 1)
        else:
            slots = start + torch.arange(T, device=k.device)
            if torch.is_grad_enabled():
                state.k = state.k.index_copy(2, slots, k.to(state.k.dtype))
                state.v = state.v.index_copy(2, slots, v.to(state.v.dtype))
            else:
                state.k.index_copy_(2, slots, k.to(state.k.dtype))
                state.v.index_copy_(2, slots, v.to(state.v.dtype))
            state.valid.index_copy_(1, slots, valid)
        state.length += T
        return start

    def project(self, x: torch.Tensor, state: KVState | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, d], k, v [B, T, Hkv, d]: the projections, through the short conv
        when the layer has one (`short_conv`: it reads and advances `state.conv`), before RoPE."""
        B, T, _ = x.shape
        if self.conv_size:
            (qkv,) = stacked_linear(x, [[self.q_proj, self.k_proj, self.v_proj]])
            q, k, v = self.short_conv(qkv, state, mask).split([self.hidden_size, self.kv_dim, self.kv_dim], dim=-1)
        else:
            q, k, v = stacked_linear(x, [[self.q_proj], [self.k_proj], [self.v_proj]])
        return (q.reshape(B, T, self.num_heads, self.head_dim), k.reshape(B, T, self.num_kv_heads, self.head_dim),
                v.reshape(B, T, self.num_kv_heads, self.head_dim))

    def heads(self, x: torch.Tensor, state: KVState | WindowKVState | None, mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`project` (updating the conv window in `state`), then RoPE at each token's position:
        q [B, H, T, hd], k, v [B, Hkv, T, hd] and the positions, [T] (no state, no mask) or [B, T]:
        they continue from `state.position`, and with a mask (bool, False = padding) count real
        tokens only (cumsum(mask) - 1)."""
        T = x.shape[1]
        q, k, v = self.project(x, state, mask)
        steps = torch.arange(T, device=x.device) if mask is None else (mask.long().cumsum(1) - 1).clamp(min=0)
        positions = steps if state is None else state.position[:, None] + steps
        q, k = rotary(q, positions, self.inv_freq), rotary(k, positions, self.inv_freq)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions

    def forward(self, x: torch.Tensor, state: KVState | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVState | None]:
        """x [B, T, D] -> (y [B, T, D], state). Positions continue from the state; with a mask
        [B, T] (False = padding) they count real tokens only (cumsum(mask) - 1), so a
        left-padded sequence sees the positions it would see alone. The state is updated in place."""
        B, T, _ = x.shape
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
        q, k, v, _ = self.heads(x, state, mask)
        gqa = self.num_kv_heads != self.num_heads
        if state is None and mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if state is None:
                key_valid, query_slots = mask, torch.arange(T, device=x.device)
            else:
                new_valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
                query_slots = self._append(state, k, v, new_valid) + torch.arange(T, device=x.device)
                k, v, key_valid = state.k, state.v, state.valid
                state.position += T if mask is None else mask.sum(1)
            key_slots = torch.arange(k.shape[2], device=x.device)
            causal = key_slots[None, :] <= query_slots[:, None]                          # [T, S]
            # a padded query may see no valid key: let every query see itself, so no row is empty
            allowed = (causal & key_valid[:, None, :]) | (key_slots[None, :] == query_slots[:, None])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state


@dataclass
class WindowKVState:
    """Decoding state of one sliding-window attention layer: a ring buffer of the last `window` tokens.

    k, v [B, Hkv, window, head_dim]; key_position [B, window] long (the RoPE position of the token
    in each slot); valid [B, window] bool (False at empty slots and padding); length [] long (tokens
    written: the next one goes to slot length % window, the same for every sequence); position [B]
    long (RoPE position of each sequence's next token); conv [B, hidden + 2*Hkv*head_dim, W - 1]:
    the short conv's last inputs (width 0 without one). Its size is fixed by the window, not the
    context, so memory stays constant and the buffers never move (a CUDA graph replays on them):
    a write lands in place under no_grad, and rebinds k and v to new tensors with autograd on.
    """

    k: torch.Tensor
    v: torch.Tensor
    key_position: torch.Tensor
    valid: torch.Tensor
    length: torch.Tensor
    position: torch.Tensor
    conv: torch.Tensor


class SlidingWindowAttention(Attention):
    """Causal softmax attention in which each query sees the last `window` tokens, itself included:
    key i is visible to query t when t - window < i <= t (in token positions, so left padding
    does not count). Everything else is `Attention`'s: parameters, RoPE, grouped KV heads, the
    optional short conv (`conv_size`), SDPA. `window` >= the sequence length is plain attention,
    the very same kernel call. Decoding keeps a ring buffer of the last `window` tokens
    (`WindowKVState`): constant memory however long the context. `from_config` adds swa_window to
    Attention's fields.
    """

    CONFIG_FIELDS = {**Attention.CONFIG_FIELDS, "window": "swa_window"}

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 rope_theta: float = 1e4, conv_size: int = 0, window: int = 256, layer_idx: int | None = None):
        super().__init__(hidden_size, num_heads, num_kv_heads, rope_theta=rope_theta, conv_size=conv_size,
                         layer_idx=layer_idx)
        if window < 1:
            raise ConfigError(f"sliding-window attention window={window}; use a window of >= 1 tokens")
        self.window = window

    def empty_state(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> WindowKVState:
        """An empty ring buffer of `window` slots ([B, Hkv, window, head_dim]) and a zero conv window;
        `max_len` does not change its size."""
        weight = self.k_proj.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        shape = (batch_size, self.num_kv_heads, self.window, self.head_dim)
        conv_width = self.conv_size - 1 if self.conv_size else 0
        return WindowKVState(k=torch.zeros(shape, device=device, dtype=dtype),
                             v=torch.zeros(shape, device=device, dtype=dtype),
                             key_position=torch.zeros(batch_size, self.window, device=device, dtype=torch.long),
                             valid=torch.zeros(batch_size, self.window, device=device, dtype=torch.bool),
                             length=torch.zeros((), device=device, dtype=torch.long),
                             position=torch.zeros(batch_size, device=device, dtype=torch.long),
                             conv=torch.zeros(batch_size, self.conv_dim, conv_width, device=device, dtype=dtype))

    def _remember(self, state: WindowKVState, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  valid: torch.Tensor) -> None:
        """Write the last min(T, window) of k, v [B, Hkv, T, hd], positions [B, T] and valid [B, T]
        into the ring at slots (length + ...) % window; length += T."""
        T = k.shape[2]
        n = min(T, self.window)
        slots = (state.length + (T - n) + torch.arange(n, device=k.device)) % self.window
        k, v = k[:, :, -n:].to(state.k.dtype), v[:, :, -n:].to(state.v.dtype)
        if torch.is_grad_enabled():
            state.k, state.v = state.k.index_copy(2, slots, k), state.v.index_copy(2, slots, v)
        else:
            state.k.index_copy_(2, slots, k)
            state.v.index_copy_(2, slots, v)
        state.key_position.index_copy_(1, slots, positions[:, -n:])
        state.valid.index_copy_(1, slots, valid[:, -n:])
        state.length += T

    def forward(self, x: torch.Tensor, state: WindowKVState | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, WindowKVState | None]:
        """x [B, T, D] -> (y [B, T, D], state), as `Attention.forward`, each query restricted to the
        last `window` positions. With a state, the queries see the ring's tokens and the new ones;
        the ring then keeps the last `window` of them (updated in place)."""
        B, T, _ = x.shape
        if state is None and mask is None and T <= self.window:
            return super().forward(x)
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
        q, k, v, positions = self.heads(x, state, mask)
        new_valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        if state is None:
            keys, values, key_positions, key_valid, held = k, v, positions, mask, 0
        else:  # the ring's slots first (all earlier than the new tokens, in any order), then the new tokens
            keys, values = torch.cat([state.k, k.to(state.k.dtype)], 2), torch.cat([state.v, v.to(state.v.dtype)], 2)
            key_positions = torch.cat([state.key_position, positions], 1)
            key_valid, held = torch.cat([state.valid, new_valid], 1), self.window
        new_index = torch.arange(held + T, device=x.device) - held                 # < 0: a ring slot
        query_index = torch.arange(T, device=x.device)
        causal = new_index[None, :] <= query_index[:, None]                         # [T, S]
        recent = positions[..., :, None] - key_positions[..., None, :] < self.window  # [T, S] or [B, T, S]
        allowed = causal & recent
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        # a padded query may see no valid key: let every query see itself, so no row is empty
        allowed = allowed | (new_index[None, :] == query_index[:, None])
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[..., None, :, :] if allowed.dim() == 3
                                           else allowed, enable_gqa=self.num_kv_heads != self.num_heads)
        if state is not None:
            self._remember(state, k, v, positions, new_valid)
            state.position += T if mask is None else mask.sum(1)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state


class MLP(KernelBackend, nn.Module):
    """SwiGLU feed-forward, FLA's GatedMLP: down_proj(SiLU(gate_proj x) * up_proj x), with gate_proj
    and up_proj as one matmul (`stacked_linear`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self._init_backend(backend)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        gate, up = stacked_linear(x, [[self.gate_proj], [self.up_proj]])
        if self.kernel_backend(x.device) == "fla":
            from fla.modules.activations import swiglu_linear

            return swiglu_linear(gate, up, self.down_proj.weight, None)
        return self.down_proj(F.silu(gate) * up)


MIXERS: dict[str, type[nn.Module]] = {"gdn": GatedDeltaNet, "attn": Attention, "swa": SlidingWindowAttention}
"""The token mixers by the names `ModelConfig.mixers` uses. Each class has `from_config(config, layer_idx)`
and `empty_state(batch_size, max_len=None, device=None, dtype=None)`, and its forward maps
(x [B, T, D], state, mask [B, T]) to (y [B, T, D], state)."""


class Block(KernelBackend, nn.Module):
    """Pre-norm residual block, named as FLA's GatedDeltaNetBlock (attn_norm, attn, mlp_norm, mlp):
    x + attn(attn_norm(x)), then + mlp(mlp_norm(.)). `attn` is the mixer `config.mixers[layer_idx]`
    names, built by its `MIXERS` class from the config. On the fla backend the norms run FLA's fused RMSNorm
    (residual add fused into mlp_norm) and the MLP FLA's fused SwiGLU; the parameters are the same."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self._init_backend(config.backend)
        self.layer_idx, self.mixer = layer_idx, config.mixers[layer_idx]
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = MIXERS[self.mixer].from_config(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.mlp_intermediate_size, backend=config.backend)

    def empty_state(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> GDNState | KVState | WindowKVState:
        """The mixer's empty decoding state (`max_len` only matters for full attention's KV buffers)."""
        return self.attn.empty_state(batch_size, max_len=max_len, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: GDNState | KVState | WindowKVState | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, GDNState | KVState | WindowKVState | None]:
        """x [B, T, D] -> (x [B, T, D], state updated in place); mask [B, T] bool (False = padding)."""
        if self.kernel_backend(x.device) == "fla":
            from fla.modules.norm.layernorm import rms_norm

            h, state = self.attn(rms_norm(x, self.attn_norm.weight, None, eps=self.attn_norm.eps), state, mask)
            h, residual = rms_norm(h, self.mlp_norm.weight, None, residual=x, eps=self.mlp_norm.eps, prenorm=True)
            return residual + self.mlp(h), state
        h, state = self.attn(self.attn_norm(x), state, mask)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), state
