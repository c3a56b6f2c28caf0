"""gdn_lab.ops: the chunked form equals the recurrence, and the recurrence equals FLA's reference.

Errors are relative RMSE, as FLA's tests measure them: rms(a - b) / rms(b). Tolerances, with
what was measured on CPU in fp32 (B=2, K=16, V=32, beta in (0, 2)) for outputs, final states
and the gradients of q, k, v, g, beta and the initial state:
- chunk vs recurrent: <= 4e-7 with log-sigmoid gates, <= 8e-7 with g = 0 (DeltaNet) and beta
  up to 2, <= 4e-7 with decays down to exp(-30) a step. Asserted: FP32_TOL = 1e-5. Forming
  the decays as exp(gamma_r - gamma_s) of two cumulative sums instead fails the last case (1.5e-5).
- recurrent vs FLA's naive recurrent: 0 (bitwise) except dk at 2e-8; chunk vs FLA's naive
  chunk: <= 6e-7. Asserted: FP32_TOL.
- bf16 inputs vs the fp32 result of the unrounded inputs: 3.5e-3. Asserted: BF16_TOL = 1e-2.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gdn_lab.ops import chunk_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule, relative_rmse

FP32_TOL = 1e-5
BF16_TOL = 1e-2
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def load_fla_naive():
    """FLA's pure-torch reference, fla/ops/gated_delta_rule/naive.py, loaded as a file.

    It needs only torch and einops; importing it through the fla package would load Triton
    and every kernel first (~10 s of CPU).
    """
    pytest.importorskip("einops")
    fla_spec = importlib.util.find_spec("fla")
    if fla_spec is None:
        pytest.skip("flash-linear-attention is not installed")
    path = Path(fla_spec.origin).parent / "ops" / "gated_delta_rule" / "naive.py"
    spec = importlib.util.spec_from_file_location("fla_gated_delta_rule_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(B=2, T=33, H=3, K=16, V=32, *, seed=0, gate="logsigmoid", beta_max=2.0, initial_state=True):
    """Seeded GDN inputs in the layer's layout: q, k L2-normalised, g <= 0, beta in (0, beta_max)."""
    gen = torch.Generator().manual_seed(seed)
    gates = {
        "logsigmoid": lambda: F.logsigmoid(torch.randn(B, T, H, generator=gen)),
        "none": lambda: torch.zeros(B, T, H),                       # DeltaNet: alpha = 1
        "strong": lambda: -30 * torch.rand(B, T, H, generator=gen),  # gamma reaches ~ -1000 in a chunk
    }
    return {
        "q": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        "v": torch.randn(B, T, H, V, generator=gen),
        "g": gates[gate](),
        "beta": beta_max * torch.rand(B, T, H, generator=gen),
        "initial_state": torch.randn(B, H, K, V, generator=gen) if initial_state else None,
    }


def outputs_and_grads(fn, inputs: dict, **kwargs) -> dict[str, torch.Tensor]:
    """Run `fn` and backpropagate a fixed random cotangent through o and the final state.

    Returns o, final_state and d<name> for every input tensor.
    """
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items() if x is not None}
    o, final_state = fn(**leaves, **kwargs)[:2]
    gen = torch.Generator().manual_seed(1234)
    do = torch.randn(o.shape, generator=gen)
    dstate = torch.randn(final_state.shape, generator=gen)
    ((o.float() * do).sum() + (final_state * dstate).sum()).backward()
    return {"o": o.detach(), "final_state": final_state.detach(),
            **{f"d{name}": x.grad for name, x in leaves.items()}}


def assert_all_close(got: dict, ref: dict, tol: float) -> None:
    assert got.keys() == ref.keys()
    errors = {name: relative_rmse(got[name], ref[name]) for name in ref}
    assert all(torch.isfinite(x).all() for x in got.values()), "non-finite values"
    assert max(errors.values()) <= tol, {name: f"{e:.1e}" for name, e in errors.items()}


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 130])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("H", [1, 3])
def test_chunk_matches_recurrent_fp32(T, with_initial_state, H):
    inputs = make_inputs(T=T, H=H, seed=T, initial_state=with_initial_state)
    ref = outputs_and_grads(recurrent_gated_delta_rule, inputs)
    got = outputs_and_grads(chunk_gated_delta_rule, inputs)
    assert got["o"].shape == (2, T, H, 32) and got["final_state"].shape == (2, H, 16, 32)
    assert_all_close(got, ref, FP32_TOL)


@pytest.mark.parametrize("gate, beta_max", [("none", 2.0), ("none", 1.0), ("strong", 2.0)])
def test_chunk_matches_recurrent_at_extreme_gates(gate, beta_max):
    """DeltaNet (g = 0, no decay) and decays so strong that exp(-gamma) would overflow fp32."""
    inputs = make_inputs(T=150, seed=7, gate=gate, beta_max=beta_max)
    ref = outputs_and_grads(recurrent_gated_delta_rule, inputs)
    got = outputs_and_grads(chunk_gated_delta_rule, inputs)
    assert_all_close(got, ref, FP32_TOL)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 200])
def test_chunk_size_only_changes_rounding(chunk_size):
    inputs = make_inputs(T=70, seed=3)
    ref = outputs_and_grads(chunk_gated_delta_rule, inputs, chunk_size=64)
    got = outputs_and_grads(chunk_gated_delta_rule, inputs, chunk_size=chunk_size)
    assert_all_close(got, ref, FP32_TOL)


def test_recurrent_and_chunk_match_fla_naive():
    """Against FLA's naive.py: same outputs, states and gradients (its argument order differs)."""
    naive = load_fla_naive()
    inputs = make_inputs(T=45, seed=11)

    def fla_recurrent(q, k, v, g, beta, initial_state):
        return naive.naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, scale=0.3, initial_state=initial_state, output_final_state=True)

    def fla_chunk(q, k, v, g, beta, initial_state):
        return naive.naive_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=16, scale=0.3, initial_state=initial_state, output_final_state=True)

    ours = outputs_and_grads(recurrent_gated_delta_rule, inputs, scale=0.3)
    assert_all_close(ours, outputs_and_grads(fla_recurrent, inputs), FP32_TOL)
    assert_all_close(outputs_and_grads(chunk_gated_delta_rule, inputs, scale=0.3),
                     outputs_and_grads(fla_chunk, inputs), FP32_TOL)


def test_state_steps_are_states_after_that_many_steps():
    inputs = make_inputs(T=12, seed=5)
    q, k, v, g, beta, h0 = (inputs[name] for name in GRAD_NAMES)
    steps = [0, 4, -1]
    _, final_state, states = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, state_steps=steps)
    assert states.shape == (2, len(steps), 3, 16, 32)
    for i, t in enumerate(step % 12 for step in steps):
        _, state_t, _ = recurrent_gated_delta_rule(
            q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], g[:, :t + 1], beta[:, :t + 1], initial_state=h0)
        assert torch.equal(states[:, i], state_t), f"S after step {t}"
    _, _, every = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, state_steps="all")
    assert every.shape == (2, 12, 3, 16, 32)
    assert torch.equal(every[:, -1], final_state)
    with pytest.raises(IndexError, match="state_steps"):
        recurrent_gated_delta_rule(q, k, v, g, beta, state_steps=[12])


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_bf16_inputs_give_bf16_outputs_close_to_fp32(fn):
    inputs = make_inputs(T=100, seed=9)
    q, k, v, g, beta, h0 = (inputs[name] for name in GRAD_NAMES)
    o_ref, state_ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o, state = fn(*(x.bfloat16() for x in (q, k, v, g, beta)), initial_state=h0)[:2]
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert relative_rmse(o, o_ref) <= BF16_TOL and relative_rmse(state, state_ref) <= BF16_TOL


def test_dispatcher_prefill_then_decode_equals_one_pass():
    """The layer's pattern: prefill T - 1 tokens (chunk form), then one decode step (recurrent)."""
    inputs = make_inputs(T=40, seed=13)
    q, k, v, g, beta, h0 = (inputs[name] for name in GRAD_NAMES)
    o_ref, state_ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o_prefill, state = gated_delta_rule(q[:, :-1], k[:, :-1], v[:, :-1], g[:, :-1], beta[:, :-1], initial_state=h0)
    o_step, state = gated_delta_rule(q[:, -1:], k[:, -1:], v[:, -1:], g[:, -1:], beta[:, -1:], initial_state=state)
    assert relative_rmse(torch.cat([o_prefill, o_step], dim=1), o_ref) <= FP32_TOL
    assert relative_rmse(state, state_ref) <= FP32_TOL
    o_chunk, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    assert torch.equal(gated_delta_rule(q, k, v, g, beta, initial_state=h0)[0], o_chunk)


def test_shape_errors_name_the_argument():
    inputs = make_inputs(T=4, seed=0)
    inputs["beta"] = inputs["beta"][..., None]
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_delta_rule(**inputs)
