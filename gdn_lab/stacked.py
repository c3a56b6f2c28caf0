"""Groups of bias-free linears on one input, as few GEMMs as possible, with a backward per group.

`stacked_linear(x, groups)` is what `GatedDeltaNet.project`, `Attention` and `MLP` run their input
projections through: the parameters stay separate `nn.Linear`s (FLA's state_dict), but the forward
reads x once, and the backward (`_StackedLinear`) takes each group's gradient where it lies.
tests/test_stacked.py holds it to plain `nn.Linear` (outputs and every gradient) on the CPU.

    q, k, v = stacked_linear(x, [[q_proj], [k_proj], [v_proj]])   # three [..., out] views of one GEMM
    (qkv,) = stacked_linear(x, [[q_proj, k_proj, v_proj]])         # one [..., sum of outs] output
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def stacked_linear(x: torch.Tensor, groups: list[list[nn.Linear]], separate: bool = False
                   ) -> tuple[torch.Tensor, ...]:
    """x [..., D] through groups of bias-free linears: one output per group, [..., sum of the
    group's out_features], the group's outputs side by side in order.

    By default one GEMM on the weights concatenated on the fly (x read once; the outputs are views
    with the row stride of the whole). `separate=True` runs one GEMM per group instead, so every
    output is contiguous: for consumers that would copy a strided input (FLA's GDN kernels copy
    their q, k, v and gate to contiguous; a short conv reads a strided input slower).
    The parameters stay separate `nn.Linear`s (FLA's state_dict). Under autograd the backward
    (`_StackedLinear`) takes each group's gradient where it lies: one GEMM per group accumulates into
    x's gradient and one gives the group's weights, where `linear(...).split(...)` would first copy
    the groups' gradients into one [..., sum] tensor and separate linears would add their x gradients.
    """
    weights = [linear.weight for group in groups for linear in group]
    if not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))):
        return _grouped_linear(x, weights, [len(group) for group in groups], separate)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    with torch.autocast(device_type, enabled=False):
        return _StackedLinear.apply(x.to(dtype), [len(group) for group in groups], separate,
                                    *(w.to(dtype) for w in weights))


def _weight_groups(weights: tuple[torch.Tensor, ...] | list[torch.Tensor], group_lengths: list[int]
                   ) -> list[tuple[torch.Tensor, ...]]:
    """`weights` cut into consecutive groups of `group_lengths` weights."""
    bounds = list(itertools.accumulate(group_lengths, initial=0))
    return [tuple(weights[start:end]) for start, end in zip(bounds, bounds[1:])]


def _as_one(group: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A group's weights as one [out, D] matrix (the weight itself when the group has one)."""
    return group[0] if len(group) == 1 else torch.cat(group)


def _grouped_linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...] | list[torch.Tensor],
                    group_lengths: list[int], separate: bool) -> tuple[torch.Tensor, ...]:
    """x through the grouped weights: one GEMM per group (`separate`: contiguous outputs), or one
    GEMM on all the weights concatenated, its output split into one view per group."""
    groups = _weight_groups(weights, group_lengths)
    if separate:
        return tuple(F.linear(x, _as_one(group)) for group in groups)
    return F.linear(x, torch.cat(list(weights))).split([sum(w.shape[0] for w in g) for g in groups], dim=-1)


class _StackedLinear(torch.autograd.Function):
    """`stacked_linear` under autograd: forward one GEMM (or one per group), backward per group
    (no gradient concatenation, x's gradient accumulated inside the GEMMs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_lengths: list[int], separate: bool,
                *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, *weights)
        ctx.group_lengths = group_lengths
        return _grouped_linear(x, weights, group_lengths, separate)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx, dweights = None, []
        for group, dy in zip(_weight_groups(weights, ctx.group_lengths), grads):
            if dy is None:  # an unused group: zero gradients, as linear(...).split(...) would give
                dweights += [torch.zeros_like(w) for w in group]
                continue
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.needs_input_grad[0]:
                weight = _as_one(group)
                dx = dy2 @ weight if dx is None else dx.addmm_(dy2, weight)
            dweights += list((dy2.t() @ x2).split([w.shape[0] for w in group]))
        if dx is None and ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x2)
        return (None if dx is None else dx.view_as(x)), None, None, *dweights
