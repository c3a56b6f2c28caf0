"""The causal LM on the CPU: decoding with a cache (GDN, attention, hybrid, attention with a
short conv, sliding-window attention), left padding, the per-layer mixers, the loss, FLA's init
and the decay-init range, tied embeddings, export to and import from FLA's GatedDeltaNetForCausalLM,
presets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn_lab.config import PRESETS, ConfigError, ModelConfig, TrainConfig
from gdn_lab.generate import generate
from gdn_lab.layers import MIXERS, GDNState, KVState, SlidingWindowAttention, WindowKVState
from gdn_lab.memory import bytes_per_token, saved_for_backward
from gdn_lab.models import CausalLM, build_model, count_params, from_fla, preset_table, to_fla
from gdn_lab.train import make_optimizer

TINY = dict(vocab_size=50, hidden_size=32, num_layers=3, num_heads=2, head_dim=8, attn_num_heads=4,
            attn_num_kv_heads=2, backend="torch")
ATOL = 3e-5


def model_with(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**TINY, **overrides})).eval()


def token_ids(batch: int, steps: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, steps), generator=torch.Generator().manual_seed(seed))


def attention_convs(model: CausalLM) -> list[torch.nn.Conv1d]:
    """The q/k/v short convs of every attention layer (full or sliding-window) that has them."""
    return [getattr(block.attn, f"{name}_conv1d") for block in model.model.layers
            if block.mixer in ("attn", "swa") and block.attn.conv_size for name in "qkv"]


def randomise_attention_convs(model: CausalLM) -> CausalLM:
    """Random attention conv weights: the identity init would hide a conv window carried wrongly."""
    with torch.no_grad():
        for conv in attention_convs(model):
            conv.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(conv.weight.shape[0]))
    return model


@torch.no_grad()
@pytest.mark.parametrize("attn_layers", [(), (1,), "transformer"], ids=["gdn", "hybrid", "transformer"])
@pytest.mark.parametrize("max_len", [None, 16])
def test_decoding_with_cache_equals_full_forward(attn_layers, max_len):
    model = model_with(attn_layers=attn_layers)
    ids = token_ids(2, 12)
    full = model(ids)
    cache = model.new_cache(2, max_len=max_len)
    kinds = {type(state) for state in cache.states}
    assert kinds == ({GDNState} if attn_layers == () else {KVState} if attn_layers == "transformer"
                     else {GDNState, KVState})
    pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert cache.seen_tokens == 12
    logits = torch.cat(pieces, 1)
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, 50)
    torch.testing.assert_close(logits, full, atol=ATOL, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("attn_layers", [(1,), "transformer"], ids=["hybrid", "transformer"])
@pytest.mark.parametrize("max_len", [None, 16])
def test_attention_short_conv_decodes_like_full_forward(attn_layers, max_len):
    model = randomise_attention_convs(model_with(attn_layers=attn_layers, attn_conv_size=4))
    ids = token_ids(2, 12)
    full = model(ids)
    cache = model.new_cache(2, max_len=max_len)
    windows = [state.conv for state in cache.states if isinstance(state, KVState)]
    assert all(window.shape == (2, 32 + 2 * 16, 3) for window in windows)
    pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=1e-4)
    assert all(state.conv is window for state, window in
               zip([s for s in cache.states if isinstance(s, KVState)], windows))   # written in place


@torch.no_grad()
@pytest.mark.parametrize("max_len", [None, 16])
@pytest.mark.parametrize("attn_conv_size", [0, 3], ids=["plain", "attn-conv"])
def test_sliding_window_hybrid_decodes_like_full_forward(attn_conv_size, max_len):
    """GDN, sliding-window and full attention in one model (window 3 < the 5-token prefill): the cache
    holds a fixed ring per window layer, and decoding equals the full forward."""
    model = randomise_attention_convs(model_with(num_layers=4, swa_layers=(0, 2), attn_layers=(3,), swa_window=3,
                                                 attn_conv_size=attn_conv_size))
    assert model.config.mixers == ("swa", "gdn", "swa", "attn")
    assert [type(block.attn) for block in model.model.layers] == [MIXERS[m] for m in model.config.mixers]
    ids = token_ids(2, 12)
    full = model(ids)
    cache = model.new_cache(2, max_len=max_len)
    assert [type(state) for state in cache.states] == [WindowKVState, GDNState, WindowKVState, KVState]
    pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=1e-4)
    assert all(cache.states[i].k.shape[2] == 3 for i in (0, 2))


def test_mixers_come_from_attn_and_swa_layers():
    """Pattern names place either mixer; a layer named by both is a one-line error."""
    config = ModelConfig(**{**TINY, "num_layers": 4, "swa_layers": "alternating", "attn_layers": (2,)})
    assert config.swa_layers == (1, 3) and config.mixers == ("gdn", "swa", "attn", "swa")
    assert (config.num_gdn_layers, config.num_attn_layers, config.num_swa_layers) == (1, 1, 2)
    assert config.attention_ratio == 0.75
    assert ModelConfig(**TINY).mixers == ("gdn",) * 3 and ModelConfig(**TINY).swa_layers == ()
    model = CausalLM(config)
    assert isinstance(model.model.layers[1].attn, SlidingWindowAttention)
    assert model.model.layers[1].attn.window == config.swa_window == 256


@torch.no_grad()
@pytest.mark.parametrize("attn_conv_size", [0, 3], ids=["plain", "attn-conv"])
@pytest.mark.parametrize("full_width_mask", [False, True], ids=["step-mask", "hf-style-mask"])
@pytest.mark.parametrize("layers", [dict(attn_layers=(0, 2)), dict(swa_layers=(0, 2), swa_window=3)],
                         ids=["attn", "swa"])
def test_left_padded_hybrid_batch_decodes_like_each_prompt_alone(layers, full_width_mask, attn_conv_size):
    model = model_with(**layers, attn_conv_size=attn_conv_size)
    if attn_conv_size:
        randomise_attention_convs(model)
    prompts = [token_ids(1, n, seed=n)[0] for n in (6, 2, 4)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    steps = token_ids(3, 3, seed=7)

    cache = model.new_cache(3, max_len=T + 3)
    batch_logits = [model(ids, cache=cache, attention_mask=mask)]
    for t in range(3):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        step_mask = mask if full_width_mask else None
        batch_logits.append(model(steps[:, t:t + 1], cache=cache, attention_mask=step_mask))
    assert torch.isfinite(batch_logits[0]).all()

    for i, p in enumerate(prompts):
        alone = model.new_cache(1)
        expected = [model(p[None], cache=alone)] + [model(steps[i:i + 1, t:t + 1], cache=alone) for t in range(3)]
        torch.testing.assert_close(batch_logits[0][i, T - len(p):], expected[0][0], atol=ATOL, rtol=1e-4)
        for t in range(3):
            torch.testing.assert_close(batch_logits[t + 1][i], expected[t + 1][0], atol=ATOL, rtol=1e-4)


def test_cache_overflow_and_bad_mask_are_one_line_errors():
    model = model_with(attn_layers=(1,))
    cache = model.new_cache(1, max_len=4)
    with torch.no_grad():
        model(token_ids(1, 3), cache=cache)
        with pytest.raises(ValueError, match="max_len=4") as err:
            model(token_ids(1, 2), cache=cache)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="attention_mask"):
            model(token_ids(1, 2), attention_mask=torch.ones(1, 5))


def test_loss_is_masked_mean_cross_entropy():
    model = model_with(attn_layers=(2,))
    ids, targets = token_ids(2, 9), token_ids(2, 9, seed=2)
    loss_mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) > 0.4
    logits = model(ids)
    expected = F.cross_entropy(logits[loss_mask], targets[loss_mask])
    torch.testing.assert_close(model(ids, targets=targets, loss_mask=loss_mask), expected, atol=1e-5, rtol=1e-5)
    everything = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1))
    loss = model(ids, targets=targets)
    torch.testing.assert_close(loss, everything, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.model.layers[0].attn.A_log.grad is not None


def test_attention_conv_starts_as_the_identity_and_gets_gradients():
    """At init an attention conv is the identity (surviving _init_weights' N(0, 0.02) of every
    conv), so the model computes what the conv-less one with the same other weights computes."""
    with_conv, plain = model_with(attn_layers=(1,), attn_conv_size=4), model_with(attn_layers=(1,))
    for conv in attention_convs(with_conv):
        assert torch.equal(conv.weight[..., -1], torch.ones_like(conv.weight[..., -1]))
        assert not conv.weight[..., :-1].any()
    missing, unexpected = with_conv.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"model.layers.1.attn.{name}_conv1d.weight" for name in "kqv"] and not unexpected
    ids = token_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(with_conv(ids), plain(ids), atol=1e-6, rtol=1e-6)
    with_conv(ids, targets=token_ids(2, 9, seed=2)).backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
               for conv in attention_convs(with_conv))


@pytest.mark.parametrize("dt_range", [{}, dict(dt_min=1e-4, dt_max=1e-3)], ids=["fla-default", "slow"])
def test_decay_init_lies_in_the_configured_range(dt_range):
    model = model_with(num_layers=4, attn_layers=(1,), num_heads=16, **dt_range)
    dt_min, dt_max = model.config.dt_min, model.config.dt_max
    assert (dt_min, dt_max) == (dt_range.get("dt_min", 1e-3), dt_range.get("dt_max", 0.1))
    gdn_layers = [block.attn for block in model.model.layers if block.mixer == "gdn"]
    assert len(gdn_layers) == 3
    for layer in gdn_layers:
        dt = F.softplus(layer.dt_bias)
        assert dt.min() >= dt_min * 0.999 and dt.max() <= dt_max * 1.001


def test_tied_embeddings_share_one_tensor_and_train():
    model = model_with(attn_layers=(1,), tie_embeddings=True).train()
    assert model.lm_head.weight is model.model.embeddings.weight
    assert model.num_params() == count_params(model.config) == count_params(
        model.config.replace(tie_embeddings=False)) - TINY["vocab_size"] * TINY["hidden_size"]
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    before = model.lm_head.weight.detach().clone()
    loss = model(token_ids(2, 9), targets=token_ids(2, 9, seed=2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.lm_head.weight, before)
    assert model.lm_head.weight is model.model.embeddings.weight


@pytest.mark.parametrize("part", ["core", "mixer"])
def test_recomputed_gdn_mixers_give_the_same_gradients_and_keep_less(part):
    """`recompute_gdn`: bit-equal loss and gradients on the CPU; what a GDN mixer keeps for the backward,
    per token, is its input ('mixer'), or its input and its projections' outputs ('core': o_proj keeps
    its own input); attention and decoding are untouched."""
    ids, targets = token_ids(2, 256), token_ids(2, 256, seed=2)
    runs = {}
    for recompute in ("", part):
        model = model_with(attn_layers=(1,), recompute_gdn=recompute).train()
        loss = model(ids, targets=targets)
        loss.backward()
        small = saved_for_backward(model, lambda m=model: m(ids[:, :128], targets=targets[:, :128]), tokens=256)
        large = saved_for_backward(model, lambda m=model: m(ids, targets=targets), tokens=512)
        runs[recompute] = (loss.detach(), [p.grad for p in model.parameters()], bytes_per_token(small, large),
                           model.eval())
    (loss, grads, kept, plain), (loss_r, grads_r, kept_r, recomputed) = runs[""], runs[part]
    assert torch.equal(loss, loss_r) and all(torch.equal(a, b) for a, b in zip(grads, grads_r, strict=True))
    d, H = TINY["hidden_size"], TINY["num_heads"]
    key_dim, value_dim = H * TINY["head_dim"], 2 * H * TINY["head_dim"]  # expand_v 2
    projections = 2 * key_dim + value_dim + 2 * H + value_dim  # q, k, v, a, b, gate
    expected = ({"": d * 4} if part == "mixer" else {"": (d + projections) * 4, ".o_proj": value_dim * 4})
    for layer in (0, 2):  # the GDN layers
        name = f"model.layers.{layer}.attn"
        mixer = {k.removeprefix(name): v for k, v in kept_r.items() if k == name or k.startswith(name + ".")}
        assert {k: v for k, v in mixer.items() if v} == expected
        assert sum(v for k, v in kept.items() if k == name or k.startswith(name + ".")) > 8 * sum(mixer.values())
    assert kept_r["model.layers.1.attn"] == kept["model.layers.1.attn"]  # attention is not recomputed
    prompts = ids[:, :5]
    assert generate(plain, prompts, 6, temperature=0) == generate(recomputed, prompts, 6, temperature=0)


def test_init_follows_fla():
    model = model_with(hidden_size=128, num_heads=4, head_dim=32, num_layers=2)
    block = model.model.layers[0]
    for weight in (block.attn.q_proj.weight, block.mlp.down_proj.weight, model.model.embeddings.weight,
                   model.lm_head.weight, block.attn.q_conv1d.weight):
        assert abs(weight.std().item() - 0.02) < 0.004
    A = block.attn.A_log.exp()
    assert 0 < A.min() and A.max() < 16
    assert torch.equal(block.attn_norm.weight, torch.ones(128)) and torch.equal(block.attn.o_norm.weight,
                                                                                 torch.ones(64))


def test_names_mirror_fla_and_backend_switch():
    model = model_with(attn_layers=(1,), tie_embeddings=True)
    names = set(model.state_dict())
    assert {"model.embeddings.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.attn_norm.weight",
            "model.layers.0.attn.A_log", "model.layers.1.attn.k_proj.weight", "model.layers.2.mlp.gate_proj.weight",
            "model.layers.2.mlp_norm.weight"} <= names
    assert model.lm_head.weight is model.model.embeddings.weight
    assert model.num_params() == count_params(model.config)
    model.set_backend("fla")
    assert {m.backend for m in model.modules() if hasattr(m, "kernel_backend")} == {"fla"}
    model.set_backend("auto")
    assert model.model.layers[0].attn.kernel_backend(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("overrides", [
    {}, dict(attn_layers="alternating", use_gate=False), dict(use_decay=False, use_short_conv=False, expand_v=1.5),
    dict(tie_embeddings=True, intermediate_size=100), dict(attn_layers="alternating", attn_conv_size=4),
    dict(attn_layers=(0,), attn_conv_size=2, attn_num_kv_heads=None),
    dict(swa_layers=(0,), attn_layers=(2,), attn_conv_size=3), dict(swa_layers="transformer", swa_window=2),
    dict(fixed_beta=0.5), dict(fixed_beta=0.5, use_decay=False),
])
def test_count_params_matches_the_model(overrides):
    config = ModelConfig(**{**TINY, **overrides})
    assert count_params(config) == CausalLM(config).num_params()


def test_build_model_from_preset_name():
    model = build_model("tiny", vocab_size=300)
    assert model.config.vocab_size == 300 and model.config.hidden_size == PRESETS["tiny"].model.hidden_size
    assert model.lm_head.weight.shape == (300, model.config.hidden_size)
    with pytest.raises(ConfigError, match="unknown preset"):
        build_model("huge")


def test_preset_table_lists_the_seed_presets():
    table = preset_table()
    for name in ("tiny", "small", "medium", "large", "rtx4090", "xlarge", "h100", "fla-small"):
        assert f"| {name} |" in table
    assert "| small | 128 x 4 | 4 x 64 (64) |" in table and "seed exp6 small (~2M)" in table
    assert len(preset_table(["tiny", "small"]).splitlines()) == 4


@pytest.mark.parametrize("bad, message", [
    (dict(attn_layers=(7,)), "out of range"),
    (dict(expand_v=1.3), "expand_v"),
    (dict(attn_layers=(0,), attn_num_heads=5), "divisible"),
    (dict(backend="cuda"), "backend"),
    (dict(attn_layers="3/12"), "num_layers=3"),
    (dict(attn_layers=(0,), attn_conv_size=1), "attn_conv_size"),
    (dict(dt_min=0.1, dt_max=0.01), "dt_min"),
    (dict(dt_min=0.0), "dt_min"),
    (dict(swa_layers=(3,)), "swa_layers \\[3\\] out of range"),
    (dict(attn_layers=(1,), swa_layers="alternating"), "both name layers \\[1\\]"),
    (dict(swa_layers=(0,), swa_window=0), "swa_window=0"),
    (dict(swa_layers=(0,), attn_num_heads=5), "divisible"),
    (dict(fixed_beta=1.5), "fixed_beta=1.5"),
    (dict(fixed_beta=0.0), "fixed_beta"),
])
def test_model_config_errors_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig(**{**TINY, **bad})
    assert "\n" not in str(err.value)


def test_to_fla_and_from_fla_round_trip(tmp_path):
    pytest.importorskip("fla.models")
    from fla.models import GatedDeltaNetForCausalLM

    model = model_with(allow_neg_eigval=True, conv_size=3, hidden_ratio=2, attn_num_kv_heads=None)  # attn: defaults
    ids = token_ids(2, 7)
    with torch.no_grad():
        logits = model(ids)
    fla_model = to_fla(model)
    assert isinstance(fla_model, GatedDeltaNetForCausalLM)
    assert fla_model.config.num_hidden_layers == 3 and fla_model.config.allow_neg_eigval
    assert fla_model.model.layers[0].attn.o_norm.eps == model.model.layers[0].attn.o_norm.eps == 1e-6
    theirs = fla_model.state_dict()
    assert set(theirs) == set(model.state_dict())
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())

    fla_model.save_pretrained(tmp_path)
    back = from_fla(tmp_path, backend="torch")
    assert back.config == model.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids), logits, atol=0, rtol=0)
    assert from_fla(GatedDeltaNetForCausalLM.from_pretrained(tmp_path), backend="torch").config == model.config


def test_to_fla_refuses_models_fla_cannot_hold():
    pytest.importorskip("fla.models")
    with pytest.raises(ConfigError, match="attention layers"):
        to_fla(model_with(attn_layers=(1,)))
    with pytest.raises(ConfigError, match="use_decay"):
        to_fla(model_with(use_decay=False))
    with pytest.raises(ConfigError, match="attn_conv_size=4") as err:
        to_fla(model_with(attn_layers=(1,), attn_conv_size=4))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="sliding-window attention layers \\(1,\\)") as err:
        to_fla(model_with(swa_layers=(1,)))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="fixed_beta=0.5"):
        to_fla(model_with(fixed_beta=0.5))


def _described(value):
    """A kernel argument as the comparison below sees it: a tensor by shape and dtype, the rest by value."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, dict):
        return {key: _described(item) for key, item in value.items()}
    return value


def test_fla_backend_calls_fla_kernels_as_fla_model_does(monkeypatch):
    """The fla backend calls FLA's kernel entry points as GatedDeltaNetForCausalLM (fuse_norm,
    fuse_swiglu, fuse_cross_entropy) does: same functions, order, flags and argument shapes, with one
    planned difference: FLA's model runs one short conv over q, k and v concatenated, gdn_lab one per
    projection (same weights, activation and channels; contiguous outputs for the GDN kernel). The
    kernels need CUDA, so each entry point becomes a shape-true stand-in that records its arguments,
    bound to the real signature with its defaults."""
    pytest.importorskip("fla.models")
    import importlib
    import inspect

    from torch import nn

    import gdn_lab.layers

    calls = []

    def recording(name, real, stand_in):
        signature = inspect.signature(real)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append((name, _described(dict(bound.arguments))))
            return stand_in(bound.arguments)
        return call

    real_loss = importlib.import_module("fla.modules.fused_cross_entropy").FusedCrossEntropyLoss

    class RecordedLoss(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            bound = inspect.signature(real_loss).bind(*args, **kwargs)
            bound.apply_defaults()
            self.ignore_index = bound.arguments["ignore_index"]
            calls.append(("FusedCrossEntropyLoss", dict(bound.arguments)))

        def forward(self, logits, target):
            calls.append(("FusedCrossEntropyLoss.forward", _described({"logits": logits, "target": target})))
            return F.cross_entropy(logits, target, ignore_index=self.ignore_index)

    stand_ins = {  # name: (where gdn_lab looks it up, where FLA's model does, stand-in on the bound arguments)
        "rms_norm": ("fla.modules.norm.layernorm", "fla.modules.norm.layernorm",
                     lambda a: (a["x"], a["x"] + a["residual"]) if a["prenorm"] else a["x"]),
        "rms_norm_gated": ("fla.modules.norm.fused_norm_gate", "fla.modules.norm.fused_norm_gate", lambda a: a["x"]),
        "swiglu_linear": ("fla.modules.activations", "fla.modules.mlp",
                          lambda a: F.linear(a["x"] * a["y"], a["weight"], a["bias"])),
        "causal_conv1d": ("fla.modules.convolution", "fla.layers.gated_deltanet", lambda a: (a["x"], None)),
        "chunk_gated_delta_rule": ("fla.ops.gated_delta_rule", "fla.layers.gated_deltanet", lambda a: (a["v"], None)),
    }
    for name, (ours_home, fla_home, stand_in) in stand_ins.items():
        recorded = recording(name, getattr(importlib.import_module(ours_home), name), stand_in)
        for home in {ours_home, fla_home}:
            monkeypatch.setattr(importlib.import_module(home), name, recorded)
    for home in ("fla.modules.fused_cross_entropy", "fla.models.modeling_utils"):
        monkeypatch.setattr(importlib.import_module(home), "FusedCrossEntropyLoss", RecordedLoss)
    monkeypatch.setattr(gdn_lab.layers, "resolve_backend", lambda backend, device: "fla")
    monkeypatch.setattr(gdn_lab.layers, "check_training_backend", lambda backend, device: None)

    model = model_with(backend="fla")
    ids = token_ids(2, 80)
    model(ids, targets=ids)
    ours, calls[:] = list(calls), []
    to_fla(model)(input_ids=ids, labels=ids)
    per_layer = ["rms_norm", *["causal_conv1d"] * 3, "chunk_gated_delta_rule", "rms_norm_gated", "rms_norm",
                 "swiglu_linear"]
    assert [name for name, _ in ours] == per_layer * TINY["num_layers"] + [
        "rms_norm", "FusedCrossEntropyLoss", "FusedCrossEntropyLoss.forward"]
    our_convs = [args for name, args in ours if name == "causal_conv1d"]
    fla_convs = [args for name, args in calls if name == "causal_conv1d"]
    assert len(our_convs) == 3 * len(fla_convs) == 3 * TINY["num_layers"]
    for layer, fla_conv in enumerate(fla_convs):
        q, k, v = our_convs[3 * layer:3 * layer + 3]
        (B, T, channels), dtype = fla_conv["x"]
        assert [conv["x"] for conv in (q, k, v)] == [((B, T, q["x"][0][2]), dtype), ((B, T, q["x"][0][2]), dtype),
                                                     ((B, T, channels - 2 * q["x"][0][2]), dtype)]
        assert sum(conv["weight"][0][0] for conv in (q, k, v)) == fla_conv["weight"][0][0]
        for conv in (q, k, v):
            assert {key: value for key, value in conv.items() if key not in ("x", "weight")} == {
                key: value for key, value in fla_conv.items() if key not in ("x", "weight")}
    ours = [call for call in ours if call[0] != "causal_conv1d"]
    calls = [call for call in calls if call[0] != "causal_conv1d"]
    assert len(ours) == len(calls)
    for (name, args), (fla_name, fla_args) in zip(ours, calls, strict=True):
        assert name == fla_name
        assert args == fla_args, {key: (args.get(key), fla_args.get(key))
                                  for key in args.keys() | fla_args.keys() if args.get(key) != fla_args.get(key)}
