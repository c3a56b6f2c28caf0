"""A training step replayed from CUDA graphs: what `train(..., TrainConfig(cuda_graph=True))` runs.

An eager training step launches ~1500 kernels (768d x 12 layers); a GDN layer's FLA kernels are
Triton launches with Python around each, and at 32k tokens per step the host then takes longer
to issue the step than the GPU takes to run it (H100, benchmarks/train_throughput.py --profile:
GPU busy 128 of 164 ms at 16k context). Captured once, a step is two graph launches:

    graph 1  forward under autocast, loss backward, gradient clipping -> loss, grad norm
    graph 2  the optimizer step (fused AdamW, capturable: lr is a device tensor)

Two graphs, not one, so that `train` keeps its contract: it reads the loss between them and
stops on a NaN/inf with the weights from before the step. The batch is copied into static
tensors before each replay; gradients live in the graph's memory pool (no zero_grad between
steps: graph 1's backward writes them afresh, since they were None when it was captured).

Limits, checked by `graph_unsupported_reason`: one CUDA process, no gradient accumulation, no
fp16 GradScaler (bf16 or fp32), fixed batch shapes (the packed LM and task loaders give them).
"""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def graph_unsupported_reason(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, world_size: int) -> str | None:
    """Why `cfg.cuda_graph` cannot run here (one line, says what to change), or None if it can."""
    if device.type != "cuda":
        return f"cuda_graph=True needs a CUDA device (this run is on {device.type}): set cuda_graph=False"
    if world_size > 1:
        return "cuda_graph=True runs in one process; under torchrun set cuda_graph=False"
    if cfg.grad_accum > 1:
        return f"cuda_graph=True takes one micro-batch per step; set grad_accum=1 (got {cfg.grad_accum})"
    if dtype == torch.float16:
        return "cuda_graph=True does not run the fp16 GradScaler (pre-Ampere GPUs): set cuda_graph=False"
    return None


class GraphedTrainStep:
    """One optimizer step as two CUDA graphs. Build it after at least one eager step (the optimizer
    state exists, Triton has tuned its kernels).

    loss_fn(inputs, targets, mask) -> scalar loss: the forward, e.g. `model(inputs, targets=targets,
    loss_mask=mask)` for a gdn_lab LM; model: the module whose parameters train; optimizer: AdamW
    made with capturable=True (`gdn_lab.train.make_optimizer`); example: (inputs [B, T], targets
    [B, T], mask [B, T] bool) of the shapes every step will have.
    """

    def __init__(self, loss_fn, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype,
                 grad_clip: float | None, example: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        self.optimizer = optimizer
        self.static = [t.clone() for t in example]
        device = self.static[0].device
        for group in optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        optimizer.zero_grad(set_to_none=True)
        self.backward_graph, self.optimizer_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph):
            inputs, targets, mask = self.static
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
                self.loss = loss_fn(inputs, targets, mask)
            self.loss.backward()
            self.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
        with torch.cuda.graph(self.optimizer_graph, pool=self.backward_graph.pool()):
            optimizer.step()

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the batch in, replay forward + backward + clipping: (loss, grad norm), fp32 device scalars."""
        if inputs.shape != self.static[0].shape:
            raise ValueError(f"a captured step takes batches of shape {list(self.static[0].shape)}, got "
                             f"{list(inputs.shape)}: use fixed-shape batches or cuda_graph=False")
        for static, value in zip(self.static, (inputs, targets, mask)):
            static.copy_(value, non_blocking=True)
        self.backward_graph.replay()
        return self.loss, self.grad_norm

    def optimizer_step(self, lr: float) -> None:
        """Set every group's lr (a device tensor) and replay the optimizer step."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        self.optimizer_graph.replay()
