"""The probe agrees with the model it probes: outputs, states, implicit attention, softmax maps.

Tolerances: the probe's output vs the layer's forward, relative RMSE <= 1e-4 (fp32, torch backend;
measured ~2e-7); states and norms vs a fresh recurrence: exact (the same ops in the same order);
implicit attention vs the recurrence's output and vs the explicit product of transitions: 1e-5
relative RMSE (fp32).
"""
import dataclasses
import math

import pytest
import torch

from gdn_lab import ops
from gdn_lab.config import ConfigError, ModelConfig
from gdn_lab.models import build_model
from gdn_lab.ops import FLA_OUTPUT_TOL, relative_rmse
from gdn_lab.probe import (
    FP32_TOLERANCE,
    HALF_TOLERANCE,
    ProbeMemoryError,
    ProbeMismatch,
    attention_hit_rate,
    capture,
    effective_span,
    implicit_attention,
    recurrence_with_states,
    resolve_state_steps,
    softmax_attention_map,
)

T = 40
STEPS = [0, 17, -1]


def tiny_model(**changes):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, hidden_size=32, num_layers=3, attn_layers=(1,), num_heads=2, head_dim=8,
                         attn_num_heads=4, attn_num_kv_heads=2, backend="torch").replace(**changes)
    return build_model(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 32, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def probe(model, input_ids):
    return capture(model, input_ids, state_steps=STEPS)


def test_probe_output_equals_the_layer_output(model, input_ids, probe):
    assert sorted(probe.layers) == [0, 2] and probe.mixers == ("gdn", "attn", "gdn")
    block = model.model.layers[2]
    with torch.no_grad():
        x = model.model.layers[1](model.model.layers[0](model.model.embeddings(input_ids))[0])[0]
        expected, _ = block.attn(block.attn_norm(x))
    p = probe[2]
    assert torch.allclose(p.output, expected, atol=1e-6)
    assert p.output_error <= FP32_TOLERANCE == p.tolerance
    assert probe.max_output_error <= FP32_TOLERANCE
    f = block.attn.features(block.attn_norm(x))
    assert torch.allclose(p.beta, f.beta) and torch.allclose(p.alpha, f.g.exp()) and torch.allclose(p.q, f.q)
    assert p.v.shape == (2, T, 2, 16) and p.state_norm.shape == (2, T, 2)


def test_a_probe_that_disagrees_with_the_layer_raises(input_ids):
    model = tiny_model()
    layer = model.model.layers[2].attn
    layer.register_forward_hook(lambda module, args, output: (output[0] * 1.001, output[1]))  # 0.1% off
    with pytest.raises(ProbeMismatch, match=r"GDN layer 2: .*relative RMSE 9.99e-04 > tolerance 1e-04"):
        capture(model, input_ids)


def test_states_at_t_equal_the_recurrence_run_to_t(probe):
    p = probe[0]
    assert p.state_steps == (0, 17, T - 1) and p.states.shape == (2, 3, 2, 8, 16)
    for t in (0, 17, T - 1):
        _, state_at_t, _ = ops.recurrent_gated_delta_rule(p.q[:, :t + 1], p.k[:, :t + 1], p.v[:, :t + 1],
                                                          p.g[:, :t + 1], p.beta[:, :t + 1])
        assert torch.equal(p.state_at(t), state_at_t)
        assert torch.allclose(p.state_norm[:, t], torch.linalg.matrix_norm(state_at_t))
    assert torch.equal(p.state_at(-1), p.state_at(T - 1))
    with pytest.raises(KeyError, match="state_steps including 5"):
        p.state_at(5)


def test_norms_need_no_stored_states_and_windows_change_nothing(probe):
    p = probe[2]
    o, _, every_state = ops.recurrent_gated_delta_rule(p.q, p.k, p.v, p.g, p.beta, state_steps="all")
    per_step_bytes = 2 * 2 * 8 * 16 * 4
    windowed, norms, kept = recurrence_with_states(p.q, p.k, p.v, p.g, p.beta, state_steps=[3, 17, 18, 39],
                                                   window_bytes=7 * per_step_bytes)      # windows of 7 steps
    assert torch.equal(windowed, o) and torch.equal(kept, every_state[:, [3, 17, 18, 39]])
    assert torch.allclose(norms, torch.linalg.matrix_norm(every_state))
    assert torch.equal(p.state_norm, norms) and torch.equal(p.core_output, o)


def test_state_steps_and_the_memory_guard(model, input_ids):
    assert resolve_state_steps(None, 5) == () and resolve_state_steps("all", 3) == (0, 1, 2)
    assert resolve_state_steps([4, -1, 0], 5) == (0, 4)
    with pytest.raises(ConfigError, match="outside"):
        resolve_state_steps([5], 5)
    everything = capture(model, input_ids, layers=[2], state_steps="all")
    assert everything[2].states.shape[1] == T
    with pytest.raises(ProbeMemoryError, match=r"pass at most 3 steps, e.g. state_steps=list\(range\(0, 40, 14\)\)"):
        capture(model, input_ids, state_steps="all", max_state_bytes=3 * 2 * (2 * 2 * 8 * 16 * 4))
    with pytest.raises(ConfigError, match=r"layers \[1\] are not 'gdn' layers .* \[0, 2\]"):
        capture(model, input_ids, layers=[1])


def _transition_products(p, b, h):
    """A[t, i] = scale q_t^T P_t ... P_{i+1} beta_i k_i, P_j = alpha_j (I - beta_j k_j k_j^T), explicitly."""
    q, k, g, beta = p.q[b, :, h], p.k[b, :, h], p.g[b, :, h], p.beta[b, :, h]
    K = q.shape[-1]
    A = torch.zeros(T, T)
    for i in range(T):
        carried = beta[i] * k[i]
        for t in range(i, T):
            if t > i:
                carried = g[t].exp() * (carried - beta[t] * k[t] * (k[t] @ carried))
            A[t, i] = K ** -0.5 * q[t] @ carried
    return A


def test_implicit_attention_reproduces_the_output_and_the_transition_products(probe):
    p = probe[0]
    for b in range(2):
        for h in range(2):
            A = implicit_attention(p, h, batch_index=b)
            assert torch.equal(A.triu(1), torch.zeros(T, T))
            assert relative_rmse(A @ p.v[b, :, h], p.core_output[b, :, h]) < 1e-5
    assert relative_rmse(implicit_attention(p, 1, batch_index=1), _transition_products(p, 1, 1)) < 1e-5
    tampered = dataclasses.replace(p, core_output=p.core_output * 1.001)
    with pytest.raises(ProbeMismatch, match="implicit attention of layer 0 head 1: A v differs"):
        implicit_attention(tampered, 1)


@pytest.mark.parametrize("changes", [{"allow_neg_eigval": True}, {"use_decay": False}])
def test_implicit_attention_with_negative_eigenvalues_and_without_decay(changes, input_ids):
    p = capture(tiny_model(**changes), input_ids)[0]
    if changes.get("allow_neg_eigval"):
        assert p.allow_neg_eigval and p.beta.max() > 1
    else:
        assert torch.equal(p.g, torch.zeros_like(p.g))
    A = implicit_attention(p, 0)
    assert relative_rmse(A @ p.v[0, :, 0], p.core_output[0, :, 0]) < 1e-5


def test_effective_span_on_hand_made_decays():
    g = torch.stack([torch.full((50,), math.log(0.5)), torch.full((50,), math.log(0.9)), torch.zeros(50)], dim=-1)
    span = effective_span(g, threshold=0.1)
    assert span[0].item() == pytest.approx(math.log(0.1) / math.log(0.5))              # 3.32 steps
    assert span[1].item() == pytest.approx(math.log(0.1) / math.log(0.9))              # 21.9 steps
    assert span[2].item() == math.inf                                                   # no decay: DeltaNet
    assert 0.5 ** math.ceil(span[0]) < 0.1 <= 0.5 ** math.floor(span[0])
    varying = torch.tensor([[math.log(0.25)], [0.0]]).repeat(10, 1)                     # alpha 0.25, 1, 0.25, ...
    assert effective_span(varying[None], threshold=0.25).item() == pytest.approx(2.0)  # 2 steps on average
    with pytest.raises(ConfigError, match="threshold"):
        effective_span(g, threshold=1.5)


def test_attention_hit_rate_counts_rows_whose_top_weight_is_the_expected_key():
    A = torch.eye(4) + 0.5 * torch.eye(4).roll(-1, 1)        # row t: 1 at t, 0.5 at t - 1 (row 0: at 3)
    assert attention_hit_rate(A, [0, 1, 2, 3], [0, 1, 2, 0]) == 0.75
    value_norms = torch.tensor([1.0, 3.0, 3.0, 3.0])           # |A| ||v||: row 0 now peaks at 3
    assert attention_hit_rate(A, [0, 1, 2, 3], [3, 1, 2, 3], value_norms=value_norms) == 1.0
    with pytest.raises(ValueError, match="one expected key position per query"):
        attention_hit_rate(A, [0, 1], [0])


def test_softmax_attention_map_matches_the_attention_layer(model, input_ids):
    P = softmax_attention_map(model, input_ids, layer=1, head=3, batch_index=1)
    assert P.shape == (T, T) and torch.equal(P.triu(1), torch.zeros(T, T))
    assert torch.allclose(P.sum(-1), torch.ones(T))
    with pytest.raises(ConfigError, match="not 'attn' or 'swa' layers"):
        softmax_attention_map(model, input_ids, layer=0, head=0)
    with pytest.raises(ConfigError, match="heads 0..3"):
        softmax_attention_map(model, input_ids, layer=1, head=4)


def test_softmax_attention_map_reads_through_the_attention_conv(input_ids):
    model = tiny_model(attn_conv_size=3)
    attn = model.model.layers[1].attn
    with torch.no_grad():  # a trained conv: far from its identity init, so skipping it would show
        for conv in (attn.q_conv1d, attn.k_conv1d, attn.v_conv1d):
            conv.weight.normal_()
    P = softmax_attention_map(model, input_ids, layer=1, head=2)
    assert torch.allclose(P.sum(-1), torch.ones(T))


@pytest.mark.parametrize("attn_conv_size", [0, 3], ids=["plain", "conv"])
def test_softmax_attention_map_of_a_sliding_window_layer_is_banded(input_ids, attn_conv_size):
    """On a sliding-window layer the map keeps only keys t - window < i <= t, and (the probe's own
    check) reproduces the layer's output, through its short conv too."""
    model = tiny_model(attn_layers=(), swa_layers=(1,), swa_window=5, attn_conv_size=attn_conv_size)
    if attn_conv_size:
        with torch.no_grad():
            for conv in (model.model.layers[1].attn.q_conv1d, model.model.layers[1].attn.k_conv1d):
                conv.weight.normal_()
    P = softmax_attention_map(model, input_ids, layer=1, head=1)
    t, i = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(P[(i > t) | (i <= t - 5)], torch.zeros(int(((i > t) | (i <= t - 5)).sum())))
    assert (P[(i <= t) & (i > t - 5)] > 0).all() and torch.allclose(P.sum(-1), torch.ones(T))
    assert sorted(capture(model, input_ids).layers) == [0, 2]


def test_softmax_attention_map_guard_can_fail(input_ids):
    model = tiny_model()
    attn = model.model.layers[1].attn
    attn.register_forward_hook(lambda module, args, output: (output[0] * 1.01, output[1]))  # a 1% different layer
    with pytest.raises(ProbeMismatch, match="attention layer 1: .*relative RMSE 9.90e-03"):
        softmax_attention_map(model, input_ids, layer=1, head=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FLA's kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_agrees_with_the_fla_backend(dtype):
    model = tiny_model(backend="fla", hidden_size=256, num_heads=4, head_dim=64, attn_num_heads=4,
                       attn_num_kv_heads=None).to("cuda", dtype)
    ids = torch.randint(0, 32, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()
    probe = capture(model, ids, state_steps=[0, 299])
    tolerance = FLA_OUTPUT_TOL if dtype == torch.float32 else HALF_TOLERANCE
    assert probe[0].tolerance == tolerance and probe.max_output_error <= tolerance
    A = implicit_attention(probe[2], 3)
    assert relative_rmse(A @ probe[2].v[0, :, 3], probe[2].core_output[0, :, 3]) < 1e-4
    assert softmax_attention_map(model, ids, layer=1, head=0).shape == (300, 300)
