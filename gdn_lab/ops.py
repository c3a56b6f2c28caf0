"""Pure-torch Gated DeltaNet math: the readable reference (fp32 inside).

Per head, with state S in R^{K x V}, inputs prepared by the layer (q, k L2-normalised):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    alpha_t = exp(g_t)
    o_t = S_t^T (scale * q_t)

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; states [B, H, K, V].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


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

    Returns (o [B,T,H,V] in q's dtype, final state [B,H,K,V] fp32, states or None) where
    `states` is [B, len(steps), H, K, V]: S_t after step t for the sorted, distinct t in
    `state_steps` ("all" for every step; negative indices count from the end).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float().clone()
    steps = range(T) if state_steps == "all" else (state_steps or ())
    wanted = {int(t) % T for t in steps} if T else set()
    kept, o = [], q.new_empty(B, T, H, V)
    for t in range(T):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t, :, None]
        S = S * g[:, t].exp()[..., None, None]                    # alpha_t S_{t-1}
        v_old = torch.einsum("bhk,bhkv->bhv", k_t, S)             # S^T k_t: what the state holds at k_t
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, b_t * (v_t - v_old))  # delta-rule write
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
        if t in wanted:
            kept.append(S)
    states = torch.stack(kept, dim=1) if state_steps is not None and kept else None
    return o.to(dtype), S, states
