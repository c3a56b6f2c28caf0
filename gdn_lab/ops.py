"""Pure-torch Gated DeltaNet math: the readable reference (fp32 inside, outputs in the input dtype).

Per head, with state S in R^{K x V}, inputs prepared by the layer (q, k L2-normalised):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    alpha_t = exp(g_t)
    o_t = S_t^T (scale * q_t)

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; states [B, H, K, V].

Three entry points: `recurrent_gated_delta_rule` (one step at a time; the reference, and the
decode step), `chunk_gated_delta_rule` (the same numbers, a chunk of steps at a time; what
training and prefill use) and `gated_delta_rule` (picks one of the two, as the layer does).

How close two implementations must be, as FLA's tests measure it: `relative_rmse` and FLA's
tolerances `FLA_OUTPUT_TOL`, `FLA_QKV_GRAD_TOL`, `FLA_GATE_GRAD_TOL` (the one definition the
probes, the tests and benchmarks/parity.py use).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FLA_OUTPUT_TOL = 5e-3
"""Relative RMSE FLA's tests allow between a GDN kernel's output and the naive recurrence."""
FLA_QKV_GRAD_TOL = 8e-3
"""Relative RMSE FLA's tests allow for dq, dk, dv (and, in gdn_lab, every gradient not through the gates)."""
FLA_GATE_GRAD_TOL = 2e-2
"""Relative RMSE FLA's tests allow for dbeta and dg (gdn_lab: b_proj, a_proj, A_log, dt_bias)."""


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """rms(actual - expected) / rms(expected) in float64, FLA's test metric (`get_err_ratio`); the
    plain rms(actual - expected) when `expected` is all zeros. Any shapes that broadcast."""
    actual, expected = actual.detach().double(), expected.detach().double()
    error = (actual - expected).square().mean().sqrt()
    scale = expected.square().mean().sqrt()
    return float(error / scale) if scale > 0 else float(error)


def _checked_sizes(q, k, v, g, beta, initial_state) -> tuple[int, int, int, int, int]:
    """(B, T, H, K, V) of inputs whose shapes agree; a ValueError naming the first one that does not."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K]; got shape {list(q.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {list(q.shape)}; got {list(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with [B, T, H] = {list(q.shape[:3])}; got {list(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, H] = {list(q.shape[:3])}; got {list(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state must be [B, H, K, V] = {[B, H, K, V]}; got {list(initial_state.shape)}")
    return B, T, H, K, V


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    state_steps: str | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The recurrence one step at a time.

    Args: q, k [B, T, H, K]; v [B, T, H, V]; g (log alpha, <= 0), beta [B, T, H];
    initial_state [B, H, K, V] (zeros when None); scale (K ** -0.5 when None).

    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] fp32, states or None) where
    `states` is [B, len(steps), H, K, V]: S_t after step t for the sorted, distinct t in
    `state_steps` ("all" for every step; negative indices count from the end).
    """
    B, T, H, K, V = _checked_sizes(q, k, v, g, beta, initial_state)
    scale = K ** -0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float().clone()
    steps = range(T) if state_steps == "all" else (state_steps or ())
    if any(not -T <= int(t) < T for t in steps):
        raise IndexError(f"state_steps must lie in [-T, T) = [{-T}, {T}); got {list(steps)}")
    wanted = {int(t) % T for t in steps}
    kept, outputs = [], []
    for t in range(T):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t, :, None]
        S = S * g[:, t].exp()[..., None, None]                    # alpha_t S_{t-1}
        v_old = torch.einsum("bhk,bhkv->bhv", k_t, S)             # S^T k_t: what the state holds at k_t
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, b_t * (v_t - v_old))  # delta-rule write
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        if t in wanted:
            kept.append(S)
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, V)
    states = torch.stack(kept, dim=1) if kept else None
    return o.to(dtype), S, states


def _to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D] in fp32, zero-padded at the end of time to N * C steps."""
    T = x.shape[1]
    num_chunks = -(-T // chunk_size)
    x = x.float()
    if num_chunks * chunk_size > T:
        x = F.pad(x, (0, 0, 0, 0, 0, num_chunks * chunk_size - T))
    return x.unflatten(1, (num_chunks, chunk_size)).permute(0, 3, 1, 2, 4).contiguous()


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence computed a chunk of C steps at a time (the WY / UT-transform form).

    Args: q, k [B, T, H, K]; v [B, T, H, V]; g (log alpha, <= 0), beta [B, T, H], beta in (0, 2);
    initial_state [B, H, K, V] (zeros when None); scale (K ** -0.5 when None); chunk_size C.
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] fp32), equal to
    `recurrent_gated_delta_rule` up to fp32 rounding. Any T >= 1: the tail is padded with
    steps that leave the state alone (g = 0, beta = 0); T < C runs as one chunk of T.

    Within one chunk, steps r = 1..C, S the state entering the chunk, gamma_r = g_1 + ... + g_r
    the cumulative log-decay, and K, V, Q the chunk's rows k_r, v_r, q_r:

    WY representation. Each step adds a rank-one term, so for some pseudo-values u_s
        S_r = exp(gamma_r) S + sum_{s <= r} exp(gamma_r - gamma_s) k_s u_s^T.
    Putting this into the recurrence, u_r = beta_r (v_r - (alpha_r S_{r-1})^T k_r), gives a
    unit lower-triangular system for U = [u_1; ...; u_C]:
        (I + A) U = diag(beta) V - diag(beta exp(gamma)) K S,
        A_rs = beta_r exp(gamma_r - gamma_s) k_r . k_s  for s < r, else 0.
    UT transform. With T_ut = (I + A)^{-1} (one triangular solve, independent of S, so done for
    every chunk at once):
        U = U_v - W S,    U_v = T_ut diag(beta) V,    W = T_ut diag(beta exp(gamma)) K.
    Chunk state update (with k~_s = exp(gamma_C - gamma_s) k_s, the keys decayed to the chunk's
    end) and output (with D_rs = exp(gamma_r - gamma_s) for s <= r, 0 above the diagonal):
        S_next = exp(gamma_C) S + K~^T U,
        O = diag(exp(gamma)) Q S + (Q K^T * D) U.
    Only U and S_next run chunk after chunk (two [C, K] x [K, V]-sized products per chunk);
    the rest is batched over all chunks. Every exponent is a sum g_{s+1} + ... + g_r <= 0
    (s <= r; the empty sum 0 above the diagonal, masked after exp), summed directly rather than
    as gamma_r - gamma_s of two cumulative sums: it neither overflows nor cancels.
    """
    B, T, H, K, V = _checked_sizes(q, k, v, g, beta, initial_state)
    if T < 1 or chunk_size < 1:
        raise ValueError(f"chunk_gated_delta_rule needs T >= 1 and chunk_size >= 1; got T={T}, chunk_size={chunk_size}")
    scale = K ** -0.5 if scale is None else scale
    dtype = q.dtype
    C = min(chunk_size, T)
    q, k, v = (_to_chunks(x, C) for x in (q * scale, k, v))             # [B, H, N, C, K | V]
    g, beta = (_to_chunks(x[..., None], C)[..., 0] for x in (g, beta))  # [B, H, N, C]

    gamma = g.cumsum(-1)                                                # [B, H, N, C]
    causal = torch.ones(C, C, device=q.device).tril()                   # 1 where s <= r
    # log D_rs = g_{s+1} + ... + g_r: a cumulative sum down each column of the strictly lower part;
    # above the diagonal the sum is empty (0), so no exponent is positive, and the mask zeroes it
    log_decay = (g[..., :, None] * causal.tril(-1)).cumsum(-2)
    decay = log_decay.exp() * causal                                    # D [B, H, N, C, C]
    decay_in = gamma.exp()                                              # exp(gamma_r)
    decay_out = decay[..., -1, :]                                       # exp(gamma_C - gamma_s)

    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay
    # unitriangular: the solver reads only A's strict lower triangle and takes the diagonal as 1
    T_ut = torch.linalg.solve_triangular(A, torch.eye(C, device=q.device), upper=False, unitriangular=True)
    U_v = T_ut @ (beta[..., None] * v)                                  # [B, H, N, C, V]
    W = T_ut @ ((beta * decay_in)[..., None] * k)                       # [B, H, N, C, K]
    k_out = (k * decay_out[..., None]).transpose(-1, -2)                # K~^T [B, H, N, K, C]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    chunk_starts, pseudo_values = [], []
    # unbind, not U_v[:, :, n]: the backward of one unbind is one stack, not N zero-filled full-size grads
    per_chunk = (x.unbind(2) for x in (U_v, W, k_out, decay_in[..., -1, None, None]))
    for U_v_n, W_n, k_out_n, decay_end_n in zip(*per_chunk):
        U = U_v_n - W_n @ S
        chunk_starts.append(S)
        pseudo_values.append(U)
        S = decay_end_n * S + k_out_n @ U
    S_start = torch.stack(chunk_starts, dim=2)                          # [B, H, N, K, V]
    U = torch.stack(pseudo_values, dim=2)                               # [B, H, N, C, V]

    P = (q @ k.transpose(-1, -2)) * decay
    o = (q * decay_in[..., None]) @ S_start + P @ U                     # [B, H, N, C, V]
    o = o.reshape(B, H, -1, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype).contiguous(), S


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the torch backend of the layer calls: the recurrent step for T <= 1 (decoding),
    the chunked form otherwise (training, prefill).

    Shapes as in `chunk_gated_delta_rule`; returns (o [B, T, H, V] in q's dtype, final state
    [B, H, K, V] fp32).
    """
    if q.shape[1] > 1:
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, scale=scale)
    o, final_state, _ = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, scale=scale)
    return o, final_state
