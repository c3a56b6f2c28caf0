"""The causal language model: embeddings, a stack of pre-norm blocks ('gdn', 'attn' or 'swa' mixers
per layer, from `ModelConfig.mixers`; classes in `gdn_lab.layers.MIXERS`), a final RMSNorm and the LM head.

Module names mirror FLA's `GatedDeltaNetForCausalLM` (model.embeddings, model.layers[i]
with attn_norm / attn / mlp_norm / mlp, model.norm, lm_head), so a pure-GDN model's state_dict
is FLA's: `to_fla` and `from_fla` move models both ways, and the FLA model saves and loads with
Hugging Face's `save_pretrained` / `from_pretrained`.

    >>> model = build_model("tiny", vocab_size=256)
    >>> cache = model.new_cache(batch_size=1)
    >>> logits = model(torch.tensor([[72, 105]]), cache=cache)  # prefill; the cache is updated in place
    >>> logits = model(torch.tensor([[33]]), cache=cache)       # then one token at a time
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .layers import Attention, Block, GatedDeltaNet, GDNState, KernelBackend, KVState, RMSNorm, WindowKVState

IGNORE_INDEX = -100


@dataclass
class Cache:
    """Decoding state of a CausalLM: one state per layer (GDNState, KVState of full attention,
    WindowKVState of sliding-window attention), and the token count.

    `max_len` (when given) is the size of the full attention layers' preallocated KV buffers (a
    sliding window's ring buffer has its window's size whatever `max_len`).
    """

    states: list[GDNState | KVState | WindowKVState]
    seen_tokens: int = 0
    max_len: int | None = None

    @property
    def has_attention(self) -> bool:
        """Whether any layer keeps a KVState (a full attention layer: its cache grows with the context)."""
        return any(isinstance(state, KVState) for state in self.states)

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> GDNState | KVState | WindowKVState:
        return self.states[layer_idx]


class Backbone(nn.Module):
    """Embeddings -> blocks -> final norm (FLA's GatedDeltaNetModel, without its HF plumbing)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class CausalLM(KernelBackend, nn.Module):
    """A causal LM over `config.mixers`; see the module docstring. `model.config` is the ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self._init_backend(config.backend)
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embeddings.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """FLA's `_init_weights`: N(0, initializer_range) for linear, conv and embedding weights,
        zero biases, FLA's A_log / dt_bias init for GDN layers, ones for norms. An attention
        layer's short convs (sliding-window attention's too) go back to the identity (`apply`
        visits a module after its children)."""
        std = self.config.initializer_range
        if isinstance(module, GatedDeltaNet) and module.use_decay:
            module.reset_decay_parameters()
        elif isinstance(module, Attention) and module.conv_size:
            module.reset_conv_parameters()
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.RMSNorm, RMSNorm)):
            module.reset_parameters()

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.lm_head.weight.device

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Cache:
        """An empty Cache for `batch_size` sequences. `max_len` preallocates the attention KV
        buffers (fixed shapes for CUDA graphs); without it they grow by concatenation."""
        states = [block.empty_state(batch_size, max_len=max_len, device=device, dtype=dtype)
                  for block in self.model.layers]
        return Cache(states, max_len=max_len)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] fp32, or with `targets` the loss.

        cache: consumed and updated in place (`new_cache`). attention_mask [B, T] (1 = token,
        0 = left padding; [B, cache.seen_tokens + T] is accepted too and its last T columns
        used). targets [B, T]: the next token at each position (already shifted); returns the
        mean cross-entropy over `loss_mask` [B, T] bool positions (all when None) as an fp32
        scalar. On the fla backend the loss runs FLA's fused cross-entropy on the logits in the
        model's dtype; on torch, `F.cross_entropy`.
        """
        T = input_ids.shape[1]
        mask = self._step_mask(attention_mask, T, cache)
        if (cache is not None and cache.has_attention and cache.max_len is not None
                and cache.seen_tokens + T > cache.max_len):
            raise ValueError(f"the cache holds max_len={cache.max_len} tokens; {cache.seen_tokens} seen + {T} new "
                             f"do not fit: make the cache with a larger max_len")
        x = self.model.embeddings(input_ids)
        for i, block in enumerate(self.model.layers):
            x, _ = block(x, None if cache is None else cache.states[i], mask)
        if cache is not None:
            cache.seen_tokens += T
        fla = self.kernel_backend(x.device) == "fla"
        if fla:
            from fla.modules.norm.layernorm import rms_norm

            h = rms_norm(x, self.model.norm.weight, None, eps=self.model.norm.eps)
        else:
            h = self.model.norm(x)
        logits = self.lm_head(h)
        if targets is None:
            return logits.float()
        if loss_mask is not None:
            targets = targets.masked_fill(~loss_mask.to(torch.bool), IGNORE_INDEX)
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        if fla:
            from fla.modules.fused_cross_entropy import FusedCrossEntropyLoss

            return FusedCrossEntropyLoss(ignore_index=IGNORE_INDEX, inplace_backward=True)(logits, targets)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).float()

    @staticmethod
    def _step_mask(attention_mask: torch.Tensor | None, T: int, cache: Cache | None) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        seen = 0 if cache is None else cache.seen_tokens
        if attention_mask.shape[1] not in (T, seen + T):
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; pass [B, {T}] for the new tokens "
                             f"or [B, {seen + T}] for the cached ones too")
        return attention_mask[:, -T:].to(torch.bool)


def build_model(config: ModelConfig | str, vocab_size: int | None = None,
                device: torch.device | str | None = None) -> CausalLM:
    """A freshly initialised CausalLM from a ModelConfig or a preset name (see `preset_table`);
    `vocab_size` overrides the config's (set it from the tokenizer)."""
    if isinstance(config, str):
        config = get_preset(config).model
    if vocab_size is not None:
        config = config.replace(vocab_size=vocab_size)
    model = CausalLM(config)
    return model.to(device) if device is not None else model


def _fla_config(config: ModelConfig):
    """FLA's GatedDeltaNetConfig for a pure-GDN ModelConfig (one-line ConfigError otherwise).
    dt_min / dt_max only shape the init and FLA's config has no such fields: not exported."""
    from fla.models import GatedDeltaNetConfig

    if config.attn_conv_size:
        raise ConfigError(f"to_fla: attn_conv_size={config.attn_conv_size} has no FLA twin (FLA's attention has "
                          f"no short conv); export a model with attn_conv_size=0")
    if config.num_attn_layers:
        raise ConfigError(f"to_fla exports pure-GDN models; this one has attention layers {config.attn_layers}")
    if config.num_swa_layers:
        raise ConfigError(f"to_fla exports pure-GDN models; this one has sliding-window attention layers "
                          f"{config.swa_layers}")
    if not config.use_decay:
        raise ConfigError("to_fla: FLA's GatedDeltaNet always has the decay gate; use_decay=False has no FLA twin")
    if config.fixed_beta is not None:
        raise ConfigError(f"to_fla: FLA's GatedDeltaNet always learns beta (b_proj); fixed_beta={config.fixed_beta} "
                          f"has no FLA twin")
    return GatedDeltaNetConfig(
        hidden_size=config.hidden_size, expand_v=config.expand_v, use_gate=config.use_gate,
        use_short_conv=config.use_short_conv, allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size,
        head_dim=config.head_dim, num_heads=config.num_heads, max_position_embeddings=config.max_position_embeddings,
        hidden_ratio=config.hidden_ratio, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.initializer_range, vocab_size=config.vocab_size)


def to_fla(model: CausalLM):
    """The same pure-GDN model as FLA's `GatedDeltaNetForCausalLM` (same weights, dtype, device).
    Save it with `.save_pretrained(path)`; FLA's forward needs a CUDA GPU."""
    from fla.models import GatedDeltaNetForCausalLM

    fla_model = GatedDeltaNetForCausalLM(_fla_config(model.config))
    fla_model.load_state_dict(model.state_dict())
    weight = model.lm_head.weight
    return fla_model.to(device=weight.device, dtype=weight.dtype)


def _model_config_from_fla(fla_config, backend: str) -> ModelConfig:
    """The ModelConfig of FLA's GatedDeltaNetConfig (dt_min / dt_max at their defaults: FLA's
    config has none); ConfigError for FLA options gdn_lab does not implement."""
    supported = {  # FLA config field -> the values gdn_lab implements
        "attn": (None,), "num_v_heads": (None, fla_config.num_heads), "hidden_act": ("swish",),
        "attnres_block_size": (None,), "output_gate_activation": ("swish", "silu"),
    }
    for name, allowed in supported.items():
        value = getattr(fla_config, name)
        if value not in allowed:
            raise ConfigError(f"from_fla: {name}={value!r} is not supported by gdn_lab; "
                              f"use {' or '.join(map(repr, allowed))}")
    return ModelConfig(
        vocab_size=fla_config.vocab_size, hidden_size=fla_config.hidden_size, num_layers=fla_config.num_hidden_layers,
        num_heads=fla_config.num_heads, head_dim=fla_config.head_dim, expand_v=fla_config.expand_v,
        use_gate=fla_config.use_gate, use_short_conv=fla_config.use_short_conv, conv_size=fla_config.conv_size,
        allow_neg_eigval=fla_config.allow_neg_eigval, max_position_embeddings=fla_config.max_position_embeddings,
        hidden_ratio=fla_config.hidden_ratio or 4, intermediate_size=fla_config.intermediate_size,
        norm_eps=fla_config.norm_eps, tie_embeddings=fla_config.tie_word_embeddings,
        initializer_range=fla_config.initializer_range, backend=backend)


def from_fla(fla_model, backend: str = "auto") -> CausalLM:
    """A CausalLM with the weights of FLA's `GatedDeltaNetForCausalLM`, or of a directory that
    model was saved to with `save_pretrained` (same dtype and device as the FLA model)."""
    if isinstance(fla_model, (str, os.PathLike)):
        from fla.models import GatedDeltaNetForCausalLM

        fla_model = GatedDeltaNetForCausalLM.from_pretrained(fla_model)
    model = CausalLM(_model_config_from_fla(fla_model.config, backend))
    model.load_state_dict(fla_model.state_dict())
    weight = fla_model.lm_head.weight
    return model.to(device=weight.device, dtype=weight.dtype)


def embedding_params(config: ModelConfig) -> int:
    """Parameters of the token embedding and the output head (one matrix when tied)."""
    return config.vocab_size * config.hidden_size * (1 if config.tie_embeddings else 2)


def count_params(config: ModelConfig) -> int:
    """Parameters of `CausalLM(config)`, counted from the config alone (no weights allocated)."""
    D, hidden_mlp = config.hidden_size, config.mlp_intermediate_size
    value_dim = config.num_heads * config.head_v_dim
    qkv_dim = 2 * config.num_heads * config.head_dim + value_dim
    gdn = (D * qkv_dim                                                      # q, k, v projections
           + D * config.num_heads * (config.fixed_beta is None)               # b_proj
           + (D * config.num_heads + 2 * config.num_heads) * config.use_decay  # a_proj, A_log, dt_bias
           + qkv_dim * config.conv_size * config.use_short_conv              # q/k/v_conv1d
           + D * value_dim * config.use_gate                                # g_proj
           + config.head_v_dim + value_dim * D)                             # o_norm, o_proj
    attn_head_dim = D // config.attn_num_heads
    kv_dim = (config.attn_num_kv_heads or config.attn_num_heads) * attn_head_dim
    attn = 2 * D * D + 2 * D * kv_dim + (D + 2 * kv_dim) * config.attn_conv_size   # q/k/v/o, q/k/v_conv1d
    per_block = 2 * D + 3 * D * hidden_mlp                                  # norms, MLP
    per_mixer = {"gdn": gdn, "attn": attn, "swa": attn}                     # a window adds no parameters
    mixers = sum(per_mixer[name] for name in config.mixers)
    return embedding_params(config) + D + config.num_layers * per_block + mixers


def preset_table(names: list[str] | None = None) -> str:
    """A markdown table of presets: sizes and parameter counts at vocab 256 (bytes) and 32000."""
    rows = ["| preset | hidden x layers | heads x head_dim (v) | params @256 | params @32k | source |",
            "| --- | --- | --- | ---: | ---: | --- |"]
    for name in names or list(PRESETS):
        preset = get_preset(name)
        c = preset.model
        counts = [count_params(c.replace(vocab_size=v)) for v in (256, 32000)]
        rows.append(f"| {name} | {c.hidden_size} x {c.num_layers} | {c.num_heads} x {c.head_dim} ({c.head_v_dim}) | "
                    f"{counts[0] / 1e6:.2f}M | {counts[1] / 1e6:.1f}M | {preset.source} |")
    return "\n".join(rows)

