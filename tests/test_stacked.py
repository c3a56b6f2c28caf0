"""stacked_linear against plain nn.Linear on the CPU: outputs, the gradient of x and of every weight,
in both layouts (one GEMM split into views, `separate` GEMMs), for several groupings; and
torch.autograd.gradcheck of its custom backward in float64.

Tolerances (atol and rtol): fp64 1e-12, fp32 1e-5 (the same products summed in another order:
largest absolute difference measured 2.8e-7 in fp32); gradcheck's own defaults in fp64.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gdn_lab.stacked import stacked_linear

WIDTH = 12
TOLERANCES = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}
GROUPINGS = {  # out_features of each linear, grouped as stacked_linear takes them
    "one-each": [[5], [7], [3]],            # attention's q, k, v; the MLP's gate, up
    "all-in-one": [[5, 5, 9]],              # GDN's joint qkv before the short conv
    "mixed": [[6], [6], [10], [2, 2], [10]],  # GDN's project(separate=True): q, k, v, (a, b), g
    "pairs": [[4, 3], [1], [2, 6, 5]],
}


def linears(grouping: list[list[int]], dtype: torch.dtype, seed: int = 0) -> list[list[nn.Linear]]:
    torch.manual_seed(seed)
    return [[nn.Linear(WIDTH, out, bias=False, dtype=dtype) for out in group] for group in grouping]


def reference(x: torch.Tensor, groups: list[list[nn.Linear]]) -> list[torch.Tensor]:
    """Each group's output as plain nn.Linear forwards side by side."""
    return [torch.cat([linear(x) for linear in group], dim=-1) for group in groups]


def forward_backward(fn, x: torch.Tensor, groups: list[list[nn.Linear]], output_grads: list[torch.Tensor | None]
                     ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
    """Outputs of `fn(x, groups)`, then the gradients of x and every weight (zeros for a weight no
    output reached) after a backward of sum(<output, dy>) over the outputs whose dy is not None."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    for group in groups:
        for linear in group:
            linear.weight.grad = None
    outputs = fn(x, groups)
    loss = sum((y * dy).sum() for y, dy in zip(outputs, output_grads) if dy is not None)
    loss.backward()
    weight_grads = [linear.weight.grad if linear.weight.grad is not None else torch.zeros_like(linear.weight)
                    for group in groups for linear in group]
    return [y.detach() for y in outputs], x.grad, weight_grads


def assert_matches_linear(grouping, separate: bool, dtype: torch.dtype, x_requires_grad: bool = True,
                          unused: tuple[int, ...] = ()):
    groups = linears(grouping, dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, WIDTH, dtype=dtype, generator=generator).requires_grad_(x_requires_grad)
    output_grads = [None if i in unused else torch.randn(2, 9, sum(group), dtype=dtype, generator=generator)
                    for i, group in enumerate(grouping)]
    got = forward_backward(lambda x, g: stacked_linear(x, g, separate=separate), x, groups, output_grads)
    expected = forward_backward(reference, x, groups, output_grads)
    tolerance = TOLERANCES[dtype]
    for name, a, b in zip(("outputs", "x grad", "weight grads"), got, expected):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    outputs = stacked_linear(x, groups, separate=separate)
    assert [y.shape[-1] for y in outputs] == [sum(group) for group in grouping]
    if separate:
        assert all(y.is_contiguous() for y in outputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("grouping", list(GROUPINGS.values()), ids=list(GROUPINGS))
def test_outputs_and_gradients_match_nn_linear(grouping, separate, dtype):
    assert_matches_linear(grouping, separate, dtype)


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
def test_unused_group_gets_zero_gradients(separate):
    """An output that no loss reads (dy None in the backward) gives its weights zero gradients."""
    assert_matches_linear(GROUPINGS["mixed"], separate, torch.float64, unused=(1, 3))


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
def test_frozen_input_gets_no_gradient(separate):
    """x without requires_grad: the weights' gradients only, and none for x."""
    assert_matches_linear(GROUPINGS["pairs"], separate, torch.float64, x_requires_grad=False)


def test_without_autograd_returns_the_same_outputs():
    groups = linears(GROUPINGS["mixed"], torch.float64)
    x = torch.randn(3, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        for separate in (False, True):
            for got, expected in zip(stacked_linear(x, groups, separate=separate), reference(x, groups), strict=True):
                torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
def test_gradcheck_float64(separate):
    """torch.autograd.gradcheck of the custom backward: the weights are the Parameters gradcheck perturbs."""
    groups = linears([[3], [2, 4], [1]], torch.float64)
    weights = [linear.weight for group in groups for linear in group]
    x = torch.randn(2, 3, WIDTH, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *_: stacked_linear(x, groups, separate=separate), (x, *weights))


def test_autocast_runs_in_the_autocast_dtype_with_fp32_weight_gradients():
    groups = linears(GROUPINGS["one-each"], torch.float32)
    x = torch.randn(2, 5, WIDTH, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = stacked_linear(x, groups)
        expected = reference(x, groups)
    assert all(y.dtype == torch.bfloat16 for y in outputs)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    sum(y.float().sum() for y in outputs).backward()
    assert x.grad.dtype == torch.float32
    assert all(linear.weight.grad.dtype == torch.float32 for group in groups for linear in group)
