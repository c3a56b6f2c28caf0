"""Activation memory: what a training step keeps for its backward pass, module by module.

A GDN layer's state is a constant size, yet a GDN model trains with more memory than the same-size
transformer (issue 23): the difference is what autograd keeps between forward and backward. This
module counts it instead of reading kernels' sources. A forward pass runs under
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor an op (or a custom autograd
Function, FLA's kernels included) saves for the backward:

    small = saved_for_backward(model, lambda: model(x[:, :1024], targets=y[:, :1024]), tokens=B * 1024)
    large = saved_for_backward(model, lambda: model(x, targets=y), tokens=B * 2048)   # x: [B, 2048]
    per_token = bytes_per_token(small, large)   # {"model.layers.0.attn": bytes per token, ...}
    over_layers(per_token)                      # {"model.layers.*.attn": summed over layers, ...}

Each saved storage counts once, at its full size (views of one buffer, and a tensor several ops
save, share a storage), for the innermost module running when it was first saved; the parameters'
own storages are left out (they are not activations). What does not grow with the tokens (weights
cast to bf16 under autocast, for instance) cancels in `bytes_per_token`, which is why it takes two
measurements (at lengths of two chunks or more: one chunk takes its own path through GDN's
chunked recurrence). A storage counts where it was saved, so a tensor made in one module and saved
by the next counts for the second. This is the memory the backward needs, not the allocator's peak: kernel
workspaces and transient tensors come on top (benchmarks/train_throughput.py measures the peak).
Tensors a custom autograd Function keeps as attributes of its ctx, not through save_for_backward,
are not seen (FLA's GDN kernels save through save_for_backward).
"""
from __future__ import annotations

import re
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

NO_MODULE = "(no module)"  # tensors saved outside every module's forward (e.g. a loss computed outside)


@dataclass
class SavedTensors:
    """Bytes saved for the backward by one forward pass. `by_module`: {qualified module name ("" is the
    model itself, `NO_MODULE` outside every module): bytes}; `tokens`: the tokens the pass read (the
    batch's B x T)."""

    by_module: dict[str, int]
    tokens: int

    @property
    def total(self) -> int:
        return sum(self.by_module.values())


def saved_for_backward(model: nn.Module, run: Callable[[], object], tokens: int) -> SavedTensors:
    """Run `run()` (a forward pass of `model`, with the loss if the step computes one) and count what
    autograd saves for the backward, by the innermost module of `model` running when it was saved.
    `tokens`: the tokens the pass reads (B x T). The graph is dropped afterwards; no backward runs."""
    names = {module: name for name, module in model.named_modules()}
    running: list[str] = []
    kept: list[tuple[weakref.ref, str]] = []  # each saved tensor, while the graph holds it, and its module

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # a detached alias (same storage): handing autograd back the tensor itself ties an op's saved
        # output to its own grad node, a cycle through C++ that Python's gc cannot free (every measured
        # graph stayed alive: ~365 MiB per call for a small model)
        alias = tensor.detach()
        kept.append((weakref.ref(alias), running[-1] if running else NO_MODULE))
        return alias

    def enter(module: nn.Module, _args) -> None:
        running.append(names[module])

    def leave(_module: nn.Module, _args, _output) -> None:  # returns None: the output stays the module's
        running.pop()

    handles = []
    for module in names:
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = run()
        # counted at the end of the forward: a branch that does not reach the output (a final state nobody
        # reads) has freed what it saved, and its memory may hold a later tensor, so storages alive now,
        # all at once, are the ones the backward keeps and each address is one storage
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        by_module: dict[str, int] = defaultdict(int)
        seen: set[int] = set()
        for ref, name in kept:
            tensor = ref()
            if tensor is None or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in seen and pointer not in parameters:
                seen.add(pointer)
                by_module[name] += storage.nbytes()
        del output  # the graph, and what it saved, goes with it
    finally:
        for handle in handles:
            handle.remove()
    return SavedTensors(dict(by_module), int(tokens))


def bytes_per_token(small: SavedTensors, large: SavedTensors) -> dict[str, float]:
    """{module name: saved bytes per token}: the growth from `small` to `large` (two passes of one model
    at different token counts) over the tokens added, so that constants (weights cast under autocast)
    cancel."""
    if large.tokens == small.tokens:
        raise ValueError(f"both passes read {small.tokens} tokens; measure two different lengths")
    added = large.tokens - small.tokens
    return {name: (large.by_module.get(name, 0) - small.by_module.get(name, 0)) / added
            for name in sorted(set(small.by_module) | set(large.by_module))}


def over_layers(per_module: dict[str, float]) -> dict[str, float]:
    """`per_module` (e.g. `bytes_per_token`'s) summed over layers: every index in a name becomes '*'
    ("model.layers.3.attn" -> "model.layers.*.attn"), largest first.

    >>> over_layers({"model.layers.0.attn": 2.0, "model.layers.1.attn": 3.0, "lm_head": 1.0})
    {'model.layers.*.attn': 5.0, 'lm_head': 1.0}
    """
    totals: dict[str, float] = defaultdict(float)
    for name, value in per_module.items():
        totals[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)] += value
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
