"""Layers on the CPU: the GDN layer against an independent computation with FLA's naive
recurrence, state_dicts shared with fla.layers.GatedDeltaNet, decoding with a state, left
padding, one gate formula on both backends (`gates()` against FLA's in-kernel gate; an edited
`gates()` reaching the fla path's kernels, run here through pure-torch stand-ins of FLA's entry
points), the attention layer's cache, RoPE and short conv, sliding-window attention (banded
softmax, ring-buffer decoding, padding, window >= T is plain attention) and `from_config`."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import gdn_lab.layers
from gdn_lab import ops
from gdn_lab.config import ConfigError, ModelConfig
from gdn_lab.env import BackendError
from gdn_lab.layers import MIXERS, Attention, GatedDeltaNet, SlidingWindowAttention, l2_normalize, rotary

FP32_ATOL = 2e-5
SIZES = dict(hidden_size=32, num_heads=2, head_dim=8)


def gdn(seed: int = 0, **overrides) -> GatedDeltaNet:
    torch.manual_seed(seed)
    return GatedDeltaNet(**{**SIZES, "backend": "torch", **overrides})


def attention(seed: int = 0, conv_size: int = 0, **overrides) -> Attention:
    """A 32-wide attention layer, 4 heads over 2 KV heads; with `conv_size`, its short convs get
    random weights (the identity init would hide a conv window carried wrongly)."""
    torch.manual_seed(seed)
    layer = Attention(32, 4, **{"num_kv_heads": 2, "conv_size": conv_size, **overrides})
    if conv_size:
        with torch.no_grad():
            for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d):
                conv.weight.normal_(0, 0.5)
    return layer


def sliding(window: int = 4, seed: int = 0, conv_size: int = 0, **overrides) -> SlidingWindowAttention:
    """`attention`'s layer with a window of `window` tokens (same weights for the same seed)."""
    torch.manual_seed(seed)
    layer = SlidingWindowAttention(32, 4, **{"num_kv_heads": 2, "conv_size": conv_size, "window": window,
                                             **overrides})
    if conv_size:
        with torch.no_grad():
            for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d):
                conv.weight.normal_(0, 0.5)
    return layer


def inputs(batch: int = 2, steps: int = 11, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, steps, width, generator=torch.Generator().manual_seed(seed))


def from_scratch(layer: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """The layer's math written out independently: nn.Conv1d's own forward (padded, truncated to
    causal), F.normalize, FLA's naive recurrence and a hand-written gated RMSNorm."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    B, T, _ = x.shape
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim

    def branch(proj, conv, dim):
        h = proj(x)
        if layer.use_short_conv:
            h = conv(h.transpose(1, 2))[..., :T].transpose(1, 2)
        return F.silu(h).reshape(B, T, H, dim)

    q = F.normalize(branch(layer.q_proj, getattr(layer, "q_conv1d", None), K), dim=-1)
    k = F.normalize(branch(layer.k_proj, getattr(layer, "k_conv1d", None), K), dim=-1)
    v = branch(layer.v_proj, getattr(layer, "v_conv1d", None), V)
    if layer.fixed_beta is not None:
        beta = torch.full((B, T, H), layer.fixed_beta)
    else:
        beta = layer.b_proj(x).sigmoid() * (2 if layer.allow_neg_eigval else 1)
    g = (-layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias) if layer.use_decay
         else torch.zeros(B, T, H))
    o, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=K ** -0.5)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    if layer.use_gate:
        o = o * F.silu(layer.g_proj(x).reshape(B, T, H, V))
    return layer.o_proj(o.reshape(B, T, H * V))


@pytest.mark.parametrize("overrides", [
    {},
    {"use_gate": False, "allow_neg_eigval": True, "expand_v": 1.5},
    {"conv_bias": True, "conv_size": 3},
    {"use_decay": False},
    {"use_short_conv": False},
    {"fixed_beta": 0.3},
    {"fixed_beta": 1.5, "allow_neg_eigval": True, "use_decay": False},
], ids=["default", "no-gate-neg-eig", "conv-bias", "deltanet", "no-conv", "fixed-beta", "fixed-beta-deltanet"])
def test_torch_forward_matches_from_scratch_naive_recurrence(overrides):
    pytest.importorskip("fla.ops.gated_delta_rule.naive")
    layer = gdn(**overrides)
    with torch.no_grad():
        layer.o_norm.weight.uniform_(0.5, 1.5)  # not the identity, so the norm weight is exercised
        if overrides.get("conv_bias"):
            for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d):
                conv.bias.normal_()
    x = inputs()
    y, state = layer(x)
    assert state is None
    expected = from_scratch(layer, x)
    torch.testing.assert_close(y, expected, atol=FP32_ATOL, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"use_gate": False, "conv_bias": True}, {"expand_v": 1.0}])
def test_state_dict_moves_both_ways_with_fla_layer(overrides):
    fla_layers = pytest.importorskip("fla.layers")
    ours = gdn(**overrides)
    torch.manual_seed(5)
    theirs = fla_layers.GatedDeltaNet(**SIZES, **overrides)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.q_conv1d.weight.shape == (16, 1, 4)

    theirs.load_state_dict(ours.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name
    torch.manual_seed(6)
    fresh = fla_layers.GatedDeltaNet(**SIZES, **overrides)
    ours.load_state_dict(fresh.state_dict())
    for name, value in ours.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_decay_init_follows_fla():
    layer = gdn(num_heads=64)
    A = layer.A_log.exp()
    dt = F.softplus(layer.dt_bias)
    assert A.min() > 0 and A.max() < 16 and A.std() > 3           # U(0, 16)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001   # log-uniform in [1e-3, 0.1]
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay


def test_decay_init_range_is_configurable():
    dt = F.softplus(gdn(num_heads=64, dt_min=1e-4, dt_max=1e-3).dt_bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 1e-3 * 1.001 and dt.max() / dt.min() > 5
    for dt_min, dt_max in [(0.1, 0.01), (0.0, 0.1)]:
        with pytest.raises(ConfigError, match="dt_min"):
            gdn(dt_min=dt_min, dt_max=dt_max)


def test_deltanet_ablation_has_no_decay_parameters():
    layer = gdn(use_decay=False)
    names = {name for name, _ in layer.named_parameters()}
    assert not names & {"a_proj.weight", "A_log", "dt_bias"}
    features = layer.features(inputs())
    assert torch.equal(features.g, torch.zeros_like(features.g))
    assert ((features.beta > 0) & (features.beta < 1)).all()


def test_features_shapes_and_normalisation():
    layer = gdn(expand_v=2.0)
    f = layer.features(inputs(steps=5))
    assert f.q.shape == f.k.shape == (2, 5, 2, 8) and f.v.shape == (2, 5, 2, 16)
    assert f.g.shape == f.beta.shape == (2, 5, 2) and f.g.dtype == torch.float32
    assert (f.g < 0).all()
    torch.testing.assert_close(f.k.norm(dim=-1), torch.ones(2, 5, 2), atol=1e-4, rtol=0)
    assert f.conv_state.shape == (2, 2 * 16 + 32, 3)


@pytest.mark.parametrize("recompute", ["", "core", "mixer"])
def test_an_edited_finish_is_the_output_and_gradients_match_without_recompute(recompute):
    """`finish` is an output hook both backends call (an edited one replaces the gated norm and o_proj), under
    every `recompute_gdn`, whose gradients equal the plain layer's."""
    x = inputs(steps=70).requires_grad_()  # two chunks
    plain, layer = gdn(), gdn(recompute_gdn=recompute)
    y_plain = plain(x)[0]
    layer.finish = types.MethodType(lambda self, o, gate: 2 * GatedDeltaNet.finish(self, o, gate), layer)
    y = layer(x)[0]
    assert torch.allclose(y, 2 * y_plain, atol=FP32_ATOL)
    del layer.finish  # the class's own again
    (grad_plain,) = torch.autograd.grad(plain(x)[0].square().sum(), x)
    (grad,) = torch.autograd.grad(layer(x)[0].square().sum(), x)
    assert torch.equal(grad, grad_plain)


def test_empty_state_shapes():
    layer = gdn(expand_v=1.5)
    state = layer.empty_state(3)
    assert state.conv.shape == (3, 16 + 16 + 24, 3) and state.conv.dtype == torch.float32
    assert state.recurrent.shape == (3, 2, 8, 12) and state.recurrent.dtype == torch.float32
    assert gdn(use_short_conv=False).empty_state(1).conv.shape == (1, 64, 0)


@torch.no_grad()
def test_gdn_decoding_with_state_equals_full_forward_and_updates_buffers_in_place():
    layer = gdn()
    x = inputs(steps=12)
    full, _ = layer(x)
    state = layer.empty_state(2)
    conv_buffer, recurrent_buffer = state.conv.data_ptr(), state.recurrent.data_ptr()
    pieces = []
    for start, stop in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:  # prefill, a chunk, then tokens
        y, returned = layer(x[:, start:stop], state)
        assert returned is state
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=FP32_ATOL, rtol=1e-4)
    assert state.conv.data_ptr() == conv_buffer and state.recurrent.data_ptr() == recurrent_buffer


def test_gradients_flow_through_the_state():
    layer = gdn()
    x = inputs(steps=10).requires_grad_()
    full, _ = layer(x)
    full.square().sum().backward()
    expected_x, expected_A = x.grad.clone(), layer.A_log.grad.clone()
    x.grad, layer.A_log.grad = None, None

    state = layer.empty_state(2)
    first, _ = layer(x[:, :6], state)
    second, _ = layer(x[:, 6:], state)
    torch.cat([first, second], 1).square().sum().backward()
    torch.testing.assert_close(x.grad, expected_x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.A_log.grad, expected_A, atol=1e-4, rtol=1e-4)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, D] prompts -> x [B, T, D] left-padded with noise (padding must not matter), mask [B, T]."""
    T = max(p.shape[0] for p in prompts)
    x = torch.randn(len(prompts), T, prompts[0].shape[-1], generator=torch.Generator().manual_seed(9)) * 3
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        x[i, T - p.shape[0]:] = p
        mask[i, T - p.shape[0]:] = True
    return x, mask


@torch.no_grad()
@pytest.mark.parametrize("make_layer", [
    lambda: gdn(),
    lambda: gdn(allow_neg_eigval=True, use_gate=False),
    lambda: Attention(32, 4, num_kv_heads=2),
    lambda: attention(conv_size=4),
    lambda: sliding(window=3, conv_size=3),
    lambda: sliding(window=1),
], ids=["gdn", "gdn-neg-eig", "attention", "attention-conv", "swa-conv", "swa-window-1"])
@pytest.mark.parametrize("max_len", [None, 16])
def test_left_padded_batch_decodes_like_each_prompt_alone(make_layer, max_len):
    torch.manual_seed(0)
    layer = make_layer()
    prompts = [inputs(1, n, seed=10 + n)[0] for n in (7, 3, 1)]
    continuation = inputs(3, 3, seed=20)

    def new_state(batch):
        if isinstance(layer, Attention):
            return layer.empty_state(batch, max_len=max_len)
        return layer.empty_state(batch)

    x, mask = left_pad(prompts)
    state = new_state(3)
    y_prefill, _ = layer(x, state, mask)
    assert torch.isfinite(y_prefill).all()
    y_steps = [layer(continuation[:, t:t + 1], state)[0] for t in range(3)]

    for i, prompt in enumerate(prompts):
        alone = new_state(1)
        y_alone, _ = layer(prompt[None], alone)
        n = prompt.shape[0]
        torch.testing.assert_close(y_prefill[i, -n:], y_alone[0], atol=FP32_ATOL, rtol=1e-4)
        for t in range(3):
            y_t, _ = layer(continuation[i:i + 1, t:t + 1], alone)
            torch.testing.assert_close(y_steps[t][i], y_t[0], atol=FP32_ATOL, rtol=1e-4)


@pytest.mark.parametrize("make_layer", [gdn, lambda: attention(conv_size=3), lambda: sliding(window=3, conv_size=3)],
                         ids=["gdn", "attention-conv", "swa-conv"])
def test_mask_without_state_matches_unpadded_forward(make_layer):
    layer = make_layer()
    prompts = [inputs(1, 6, seed=3)[0], inputs(1, 2, seed=4)[0]]
    x, mask = left_pad(prompts)
    y, _ = layer(x, mask=mask)
    for i, prompt in enumerate(prompts):
        alone, _ = layer(prompt[None])
        torch.testing.assert_close(y[i, -prompt.shape[0]:], alone[0], atol=FP32_ATOL, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("conv_size", [0, 4], ids=["plain", "conv"])
@pytest.mark.parametrize("max_len", [None, 20])
def test_attention_decoding_with_cache_equals_full_forward(max_len, conv_size):
    layer = attention(conv_size=conv_size, rope_theta=500.0)
    x = inputs(steps=13)
    full, _ = layer(x)
    state = layer.empty_state(2, max_len=max_len)
    conv_buffer = state.conv.data_ptr()
    pieces = [layer(x[:, :6], state)[0], layer(x[:, 6:9], state)[0]]
    pieces += [layer(x[:, t:t + 1], state)[0] for t in range(9, 13)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=FP32_ATOL, rtol=1e-4)
    assert int(state.length) == 13 and state.position.tolist() == [13, 13]
    assert state.k.shape[2] == (max_len or 13)
    assert state.conv.shape == (2, 32 + 2 * 16, max(conv_size - 1, 0)) and state.conv.data_ptr() == conv_buffer


def test_attention_short_conv_matches_conv1d_then_attention():
    """q, k, v = nn.Conv1d's own forward (padded, truncated to causal) on the projections, then
    RoPE and an explicit causal softmax over grouped KV heads."""
    layer = attention(conv_size=3)
    assert {name: tuple(p.shape) for name, p in layer.named_parameters() if "conv" in name} == {
        "q_conv1d.weight": (32, 1, 3), "k_conv1d.weight": (16, 1, 3), "v_conv1d.weight": (16, 1, 3)}
    x = inputs(steps=9)
    B, T, H, d = 2, 9, 4, 8

    def branch(proj, conv):
        return conv(proj(x).transpose(1, 2))[..., :T].transpose(1, 2).reshape(B, T, -1, d)

    positions = torch.arange(T)
    q = rotary(branch(layer.q_proj, layer.q_conv1d), positions, layer.inv_freq).transpose(1, 2)
    k = rotary(branch(layer.k_proj, layer.k_conv1d), positions, layer.inv_freq).transpose(1, 2)
    v = branch(layer.v_proj, layer.v_conv1d).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / d ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    expected = layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * d))
    torch.testing.assert_close(layer(x)[0], expected, atol=FP32_ATOL, rtol=1e-4)


def test_attention_short_conv_starts_as_the_identity():
    torch.manual_seed(0)
    layer = Attention(32, 4, num_kv_heads=2, conv_size=4)
    for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d):
        assert torch.equal(conv.weight[..., -1], torch.ones_like(conv.weight[..., -1]))
        assert not conv.weight[..., :-1].any() and conv.bias is None
    plain = Attention(32, 4, num_kv_heads=2)
    missing, unexpected = layer.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["k_conv1d.weight", "q_conv1d.weight", "v_conv1d.weight"] and not unexpected
    x = inputs()
    torch.testing.assert_close(layer(x)[0], plain(x)[0], atol=1e-6, rtol=1e-6)
    assert plain.empty_state(2).conv.shape == (2, 64, 0)
    with pytest.raises(ConfigError, match="conv_size=1") as err:
        Attention(32, 4, conv_size=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make_layer", [lambda: attention(conv_size=4), lambda: sliding(window=3, conv_size=4)],
                         ids=["attention", "swa"])
def test_attention_conv_gradients_flow_through_the_state(make_layer):
    layer = make_layer()
    x = inputs(steps=10)
    full, _ = layer(x)
    full.square().sum().backward()
    convs = (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)
    expected = [conv.weight.grad.clone() for conv in convs]
    assert all(grad.abs().sum() > 0 for grad in expected)
    layer.zero_grad()

    state = layer.empty_state(2)
    first, _ = layer(x[:, :6], state)
    second, _ = layer(x[:, 6:], state)
    torch.cat([first, second], 1).square().sum().backward()
    for conv, grad in zip(convs, expected):
        torch.testing.assert_close(conv.weight.grad, grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("conv_size", [0, 3], ids=["plain", "conv"])
def test_sliding_window_matches_banded_explicit_softmax(window, conv_size):
    """Query t sees keys t - window < i <= t: an explicit softmax over that band of positions, with
    nn.Conv1d's own forward for the short conv, and RoPE over grouped KV heads."""
    layer = sliding(window=window, conv_size=conv_size)
    x = inputs(steps=11)
    B, T, H, d = 2, 11, 4, 8

    def branch(proj, conv):
        h = proj(x)
        if conv is not None:
            h = conv(h.transpose(1, 2))[..., :T].transpose(1, 2)
        return h.reshape(B, T, -1, d)

    convs = [getattr(layer, f"{name}_conv1d", None) for name in "qkv"]
    positions = torch.arange(T)
    q = rotary(branch(layer.q_proj, convs[0]), positions, layer.inv_freq).transpose(1, 2)
    k = rotary(branch(layer.k_proj, convs[1]), positions, layer.inv_freq).transpose(1, 2)
    v = branch(layer.v_proj, convs[2]).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    t, i = positions[:, None], positions[None, :]
    band = (i <= t) & (i > t - window)
    scores = ((q @ k.transpose(-1, -2)) / d ** 0.5).masked_fill(~band, float("-inf"))
    expected = layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * d))
    torch.testing.assert_close(layer(x)[0], expected, atol=FP32_ATOL, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("conv_size", [0, 4], ids=["plain", "conv"])
def test_sliding_window_decoding_equals_full_forward_on_a_fixed_ring(conv_size):
    """Prefill longer than the window, a chunk, then tokens: the ring keeps `window` slots, written
    in place (fixed addresses: a CUDA graph replays on them), and decoding equals the full forward."""
    layer = sliding(window=4, conv_size=conv_size, rope_theta=500.0)
    x = inputs(steps=15)
    full, _ = layer(x)
    state = layer.empty_state(2, max_len=99)   # max_len does not size a ring
    buffers = [state.k.data_ptr(), state.v.data_ptr(), state.key_position.data_ptr(), state.valid.data_ptr()]
    pieces = [layer(x[:, :6], state)[0], layer(x[:, 6:9], state)[0]]
    for t in range(9, 15):
        pieces.append(layer(x[:, t:t + 1], state)[0])
        assert state.k.shape == (2, 2, 4, 8)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=FP32_ATOL, rtol=1e-4)
    assert int(state.length) == 15 and state.position.tolist() == [15, 15]
    assert sorted(state.key_position[0].tolist()) == [11, 12, 13, 14] and state.valid.all()
    assert [state.k.data_ptr(), state.v.data_ptr(), state.key_position.data_ptr(), state.valid.data_ptr()] == buffers


@torch.no_grad()
@pytest.mark.parametrize("conv_size", [0, 3], ids=["plain", "conv"])
def test_window_at_least_the_sequence_is_plain_attention(conv_size):
    """A window >= T computes what Attention does with the same weights: the very same call without a
    state (equal bit for bit), and the same numbers through the ring when decoding."""
    swa, plain = sliding(window=12, conv_size=conv_size), attention(conv_size=conv_size)
    plain.load_state_dict(swa.state_dict())
    x = inputs(steps=12)
    assert torch.equal(swa(x)[0], plain(x)[0])
    ring, cache = swa.empty_state(2), plain.empty_state(2)
    for start, stop in [(0, 5), (5, 6), (6, 12)]:
        torch.testing.assert_close(swa(x[:, start:stop], ring)[0], plain(x[:, start:stop], cache)[0],
                                   atol=FP32_ATOL, rtol=1e-4)
    with pytest.raises(ConfigError, match="window=0") as err:
        sliding(window=0)
    assert "\n" not in str(err.value)


def test_from_config_takes_the_config_fields():
    """Each mixer of `MIXERS` builds from a ModelConfig: constructor arguments named like a field take
    it, attention's renamed ones (attn_num_heads, attn_conv_size, swa_window) theirs."""
    config = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, head_dim=8, expand_v=1.5, conv_size=3,
                         use_gate=False, allow_neg_eigval=True, dt_min=1e-2, dt_max=0.2, fixed_beta=1.5,
                         norm_eps=1e-4, backend="torch", attn_num_heads=4, attn_num_kv_heads=2, rope_theta=500.0,
                         attn_conv_size=3, swa_window=5, attn_layers=(1,), swa_layers=(2,))
    assert MIXERS.keys() >= set(config.mixers) == {"gdn", "attn", "swa"}
    layer = GatedDeltaNet.from_config(config, layer_idx=0)
    assert (layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.conv_size) == (2, 8, 12, 3)
    assert (layer.use_gate, layer.allow_neg_eigval, layer.dt_min, layer.dt_max) == (False, True, 1e-2, 0.2)
    assert (layer.fixed_beta, layer.o_norm.eps, layer.backend, layer.layer_idx) == (1.5, 1e-4, "torch", 0)
    for cls in (Attention, SlidingWindowAttention):
        attn = cls.from_config(config, layer_idx=2)
        assert (attn.num_heads, attn.num_kv_heads, attn.conv_size, attn.layer_idx) == (4, 2, 3, 2)
        torch.testing.assert_close(attn.inv_freq, Attention(32, 4, rope_theta=500.0).inv_freq)
    assert SlidingWindowAttention.from_config(config).window == 5


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    layer = Attention(32, 4, num_kv_heads=1)
    x = inputs(steps=7)
    y, _ = layer(x)
    B, T, H, d = 2, 7, 4, 8
    positions = torch.arange(T)
    q = rotary(layer.q_proj(x).reshape(B, T, H, d), positions, layer.inv_freq).transpose(1, 2)
    k = rotary(layer.k_proj(x).reshape(B, T, 1, d), positions, layer.inv_freq).transpose(1, 2)
    v = layer.v_proj(x).reshape(B, T, 1, d).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / d ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    expected = layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * d))
    torch.testing.assert_close(y, expected, atol=FP32_ATOL, rtol=1e-4)


def test_rotary_matches_fla_reference():
    rotary_ops = pytest.importorskip("fla.modules.rotary.ops")
    d, T = 16, 9
    x = torch.randn(2, T, 3, d)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(T).float(), inv_freq)
    expected = rotary_ops.rotary_embedding_ref(x, angles.cos(), angles.sin())
    torch.testing.assert_close(rotary(x, torch.arange(T), inv_freq), expected, atol=1e-6, rtol=1e-6)


def test_backend_choice_on_cpu():
    layer = gdn()
    layer.set_backend("auto")
    assert layer.kernel_backend(torch.device("cpu")) == "torch"
    layer.set_backend("fla")
    with pytest.raises(BackendError) as err:
        layer(inputs())
    assert "\n" not in str(err.value) and "backend='torch'" in str(err.value)
    with pytest.raises(ConfigError):
        gdn(backend="triton")
    with pytest.raises(ConfigError, match="expand_v"):
        gdn(expand_v=1.3)


# One gate formula on both backends. The fla backend's fast path hands FLA's kernels the raw gate
# inputs and lets them apply FLA's formula; that formula must be `gates()`. FLA 0.6.0's in-kernel
# formulas: g = naive_gdn_gate(x W_a, A_log, dt_bias) = -exp(A_log) softplus(x W_a + dt_bias)
# (fla/ops/gated_delta_rule/gate.py), and beta = scale * sigmoid(x W_b) with scale 2 when
# allow_neg_eigval (fla/ops/common/gate.py, fused_beta_sigmoid_fwd_kernel, which chunk.py calls
# with scale=2.0 if allow_neg_eigval else 1.0; fused_recurrent.py's kernel: APPLY_BETA_SIGMOID,
# ALLOW_NEG_EIGVAL). FLA's beta has no torch reference, hence its transcription below.

GATE_VARIANTS = [{}, {"allow_neg_eigval": True}, {"use_decay": False}, {"fixed_beta": 0.4},
                 {"fixed_beta": 0.4, "use_decay": False}]
GATE_IDS = ["default", "neg-eig", "deltanet", "fixed-beta", "fixed-beta-deltanet"]


def fla_in_kernel_gates(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, beta) as FLA's GDN kernels compute them from the arguments `fla_gate_arguments` gives."""
    g, beta = args["g"].float(), args["beta"].float()
    if args.get("use_gate_in_kernel"):
        g = -args["A_log"].float().exp() * F.softplus(g + args["dt_bias"].float())
    if args.get("use_beta_sigmoid_in_kernel"):
        beta = beta.sigmoid() * (2.0 if args.get("allow_neg_eigval") else 1.0)
    return g, beta


@pytest.mark.parametrize("overrides", GATE_VARIANTS, ids=GATE_IDS)
def test_gates_equal_what_the_fla_kernels_compute(overrides):
    """What FLA's kernels compute from the fla backend's gate arguments is `gates()`. FLA's own gate
    variants take the fast path (raw inputs, FLA's formula in the kernel); a gate variant of gdn_lab's
    (add it to GATE_VARIANTS) must turn that off through `custom_gates`, or this fails."""
    layer = gdn(**overrides)
    p = layer.project(inputs())
    args = layer.fla_gate_arguments(p)
    assert bool(args.get("use_beta_sigmoid_in_kernel")) != layer.custom_gates
    assert bool(args.get("use_gate_in_kernel")) == (layer.use_decay and not layer.custom_gates)
    g, beta = layer.gates(p)
    kernel_g, kernel_beta = fla_in_kernel_gates(args)
    hint = "the fla backend's kernels would compute other gates than gates(): see GatedDeltaNet.custom_gates"
    torch.testing.assert_close(kernel_g, g, atol=0, rtol=1e-6, msg=lambda m: f"g: {hint}\n{m}")
    torch.testing.assert_close(kernel_beta, beta, atol=0, rtol=1e-6, msg=lambda m: f"beta: {hint}\n{m}")


@pytest.mark.parametrize("overrides", [{}, {"dt_min": 1e-2, "dt_max": 0.5}])
def test_decay_gate_equals_fla_reference_gate(overrides):
    """`gates()`' g against FLA's own torch reference of its in-kernel gate, `naive_gdn_gate`."""
    gate = pytest.importorskip("fla.ops.gated_delta_rule.gate", reason="FLA imports only with triton installed")
    layer = gdn(**overrides)
    p = layer.project(3 * inputs())
    args = layer.fla_gate_arguments(p)
    g, _ = layer.gates(p)
    torch.testing.assert_close(g, gate.naive_gdn_gate(args["g"], args["A_log"], args["dt_bias"]), atol=0, rtol=1e-6)


@pytest.fixture
def fake_fla(monkeypatch) -> list[tuple[str, dict]]:
    """Pure-torch stand-ins for the FLA entry points `GatedDeltaNet._forward_fla` imports, put in
    sys.modules (neither FLA nor Triton is needed), and 'fla' as the backend wherever a module asks
    for it. The GDN kernels compute what FLA's do (in-kernel gates and L2 norm included) with
    gdn_lab.ops, and record their arguments in the returned list as (name, arguments)."""
    calls = []

    def causal_conv1d(x, weight, bias=None, initial_state=None, output_final_state=False, activation=None, **_):
        width, channels = weight.shape[-1], x.shape[-1]
        history = (initial_state[..., 1:] if initial_state is not None  # FLA's window is W wide, oldest unread
                   else x.new_zeros(x.shape[0], channels, width - 1))
        window = torch.cat([history, x.transpose(1, 2)], dim=-1)
        y = F.silu(F.conv1d(window, weight[:, None], bias, groups=channels)).transpose(1, 2)
        return y, (window[..., -width:] if output_final_state else None)

    def kernel(name):
        def run(q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
                **flags):
            args = dict(g=g, beta=beta, **flags)
            calls.append((name, args))
            g, beta = fla_in_kernel_gates(args)
            if use_qk_l2norm_in_kernel:
                q, k = l2_normalize(q), l2_normalize(k)
            o, final = ops.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state)
            return o, (final if output_final_state else None)
        return run

    def rms_norm(x, weight, bias=None, eps=1e-6, **_):
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)

    modules = {
        "fla.modules.convolution": dict(causal_conv1d=causal_conv1d),
        "fla.ops.gated_delta_rule": dict(chunk_gated_delta_rule=kernel("chunk"),
                                         fused_recurrent_gated_delta_rule=kernel("fused_recurrent")),
        "fla.modules.norm.fused_norm_gate": dict(
            rms_norm_gated=lambda x, g, weight, bias=None, activation="swish", eps=1e-6, **_:
            (rms_norm(x, weight, eps=eps).float() * F.silu(g.float())).to(x.dtype)),
        "fla.modules.norm.layernorm": dict(rms_norm=rms_norm),
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(gdn_lab.layers, "resolve_backend", lambda backend, device: "torch" if backend == "torch"
                        else "fla")
    monkeypatch.setattr(gdn_lab.layers, "check_training_backend", lambda backend, device: None)
    return calls


def edited_gates(layer: GatedDeltaNet, p) -> tuple[torch.Tensor, torch.Tensor]:
    """Another gate formula: the decay from a log-sigmoid, the write strength squared."""
    return 0.5 * F.logsigmoid(p.a.float()), torch.sigmoid(p.b.float()) ** 2


class EditedGatedDeltaNet(GatedDeltaNet):
    def gates(self, p):
        return edited_gates(self, p)


def layer_with_gates(hook: str, **overrides) -> GatedDeltaNet:
    """A torch-backend layer with GatedDeltaNet's gates ('default') or `edited_gates` through the
    documented hook: a subclass overriding `gates`, or `layer.gates = types.MethodType(...)`."""
    if hook == "subclass":
        torch.manual_seed(0)
        return EditedGatedDeltaNet(**{**SIZES, "backend": "torch", **overrides})
    layer = gdn(**overrides)
    if hook == "instance":
        layer.gates = types.MethodType(edited_gates, layer)
    return layer


@pytest.mark.parametrize("hook", ["default", "subclass", "instance"])
def test_fla_path_receives_the_gates_that_gates_computes(fake_fla, hook):
    """Training / prefill (chunk kernel): an edited `gates()` reaches the kernel as precomputed g and
    beta with FLA's in-kernel gate off; the default keeps FLA's fused gate. Either way the fla path
    computes what the torch path does."""
    layer = layer_with_gates(hook, allow_neg_eigval=True)
    assert layer.custom_gates == (hook != "default")
    x = inputs(steps=70)
    y_torch, _ = layer(x)
    y_fla, _ = layer.set_backend("fla")(x)
    [(name, args)] = fake_fla
    assert name == "chunk"
    p = layer.project(x, separate=True)  # the fla path's projection layout
    if hook == "default":
        assert args["use_gate_in_kernel"] and args["use_beta_sigmoid_in_kernel"] and torch.equal(args["g"], p.a)
    else:
        assert not args.get("use_gate_in_kernel") and not args.get("use_beta_sigmoid_in_kernel")
        g, beta = edited_gates(layer, p)
        assert torch.equal(args["g"], g) and torch.equal(args["beta"], beta)
    torch.testing.assert_close(y_fla, y_torch, atol=FP32_ATOL, rtol=1e-4)


@torch.no_grad()
def test_edited_gates_reach_the_fla_decode_kernel(fake_fla):
    """Decoding with a state (fused-recurrent kernel): the edited gates of every step reach it."""
    layer = layer_with_gates("instance")
    x = inputs(steps=9)

    def decode(layer):
        state = layer.empty_state(2)
        return torch.cat([layer(x[:, start:stop], state)[0] for start, stop in [(0, 6), (6, 7), (7, 8), (8, 9)]], 1)

    y_torch = decode(layer)
    y_fla = decode(layer.set_backend("fla"))
    assert [name for name, _ in fake_fla] == ["fused_recurrent"] * 4
    g, beta = edited_gates(layer, layer.project(x[:, 8:]))
    assert torch.equal(fake_fla[-1][1]["g"], g) and torch.equal(fake_fla[-1][1]["beta"], beta)
    torch.testing.assert_close(y_fla, y_torch, atol=FP32_ATOL, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{"fixed_beta": 0.25}, {"fixed_beta": 0.25, "use_decay": False}],
                         ids=["fixed-beta", "fixed-beta-deltanet"])
def test_fixed_beta_reaches_the_fla_kernels(fake_fla, overrides):
    """fixed_beta: no b_proj, and the fla path hands the kernels the constant beta (FLA has no such mode),
    training and decoding, computing what the torch path does."""
    layer = gdn(**overrides)
    assert not hasattr(layer, "b_proj") and layer.custom_gates
    x = inputs(steps=9)
    y_torch, _ = layer(x)
    state = layer.empty_state(2)
    with torch.no_grad():
        decoded_torch = torch.cat([layer(x[:, :5], state)[0], layer(x[:, 5:], state)[0]], 1)
    layer.set_backend("fla")
    y_fla, _ = layer(x)
    state = layer.empty_state(2)
    with torch.no_grad():
        decoded_fla = torch.cat([layer(x[:, :5], state)[0], layer(x[:, 5:], state)[0]], 1)
    assert [name for name, _ in fake_fla] == ["chunk", "fused_recurrent", "fused_recurrent"]
    for _, args in fake_fla:
        assert not args.get("use_beta_sigmoid_in_kernel") and not args.get("use_gate_in_kernel")
        assert torch.equal(args["beta"], torch.full_like(args["beta"], 0.25))
    torch.testing.assert_close(y_fla, y_torch, atol=FP32_ATOL, rtol=1e-4)
    torch.testing.assert_close(decoded_fla, decoded_torch, atol=FP32_ATOL, rtol=1e-4)
    with pytest.raises(ConfigError, match="fixed_beta=1.5"):
        gdn(fixed_beta=1.5)


def test_fla_path_refuses_an_edited_features(fake_fla):
    """`features` is the torch path's; the fla path runs FLA's fused conv and L2 norm: one line, not silence."""
    class EditedFeatures(GatedDeltaNet):
        def features(self, x, state=None, mask=None):
            return super().features(x, state, mask)

    layer = EditedFeatures(**SIZES, backend="fla")
    with pytest.raises(BackendError, match="features is customised") as err:
        layer(inputs())
    assert "\n" not in str(err.value) and "backend='torch'" in str(err.value)
