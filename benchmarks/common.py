"""What the benchmark scripts share: their command line, their environment line, device memory and
synchronisation, and the models that decode.py and train_throughput.py compare.

The scripts import it as `benchmarks.common` after putting the repository root on `sys.path`, so
they run as `python benchmarks/<name>.py`, under torchrun, or loaded from a file by the GPU tests.
"""
from __future__ import annotations

import argparse
import gc
import pathlib
import re

import torch

from gdn_lab.config import ModelConfig, get_preset
from gdn_lab.env import fla_unavailable_reason
from gdn_lab.models import build_model, to_fla


def benchmark_parser(doc: str, smoke_help: str, dtype: bool = True) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of `doc`, with the options every benchmark takes:
    --smoke, --device, --dtype (unless `dtype` is False), --seed and --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    if dtype:
        parser.add_argument("--dtype", default="auto",
                            help="auto (bf16 on Ampere+ GPUs, fp32 on the CPU) | float32 | ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, help="results JSON (gdn_lab.results.save_results)")
    return parser


def environment_line(report: dict, dtype: torch.dtype | str, world_size: int | None = None) -> str:
    """One log line from `gdn_lab.env.environment_report`: device (x world size), versions, GDN backend, dtype."""
    devices = report["device_name"] if world_size is None else f"{report['device_name']} x {world_size}"
    return (f"{devices} | torch {report['torch']} | triton {report['triton']} | "
            f"fla {report['flash-linear-attention']} | gdn backend {report['backend']} | "
            f"{str(dtype).removeprefix('torch.')}")


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec` for a table cell, '-' where there is none (out of memory, skipped)."""
    return "-" if value is None else format(value, spec)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached GPU blocks back, so one cell's leftovers do not count in the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement (GPU only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last `reset_peak`, in MiB; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def memory_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer, resident_bytes: int | None,
                     peak_bytes: int | None, logits_elements: int, logits_element_size: int = 2) -> dict | None:
    """Where a training step's peak memory goes (issue 23): parameters, optimizer state and gradients
    counted from the tensors themselves; `resident_bytes` (allocated between steps, after warmup) less
    parameters and optimizer state is the rest that stays (inputs, buffers); the peak above resident
    memory and gradients is what the step itself adds: activations kept for the backward, the logits
    (`logits_elements` x `logits_element_size`, listed for scale: the batch's tokens x vocabulary in
    bf16) and kernel workspace. MiB; None when the memory was not measured (the CPU)."""
    if resident_bytes is None or peak_bytes is None:
        return None
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for values in optimizer.state.values() for t in values.values()
                if torch.is_tensor(t))
    mib = 2 ** 20
    return {"parameters_mib": parameters / mib, "optimizer_state_mib": state / mib, "gradients_mib": gradients / mib,
            "other_resident_mib": (resident_bytes - parameters - state) / mib,
            "step_above_resident_and_gradients_mib": (peak_bytes - resident_bytes - gradients) / mib,
            "logits_mib": logits_elements * logits_element_size / mib, "peak_mib": peak_bytes / mib}


def fla_small_configs(smoke: bool, vocab_size: int, backend: str = "auto") -> dict[str, ModelConfig]:
    """GDN and transformer configs: FLA's 'small' (768d x 12L, 12 heads x 64), or 64d x 2L for --smoke;
    'gdn_v64' is the GDN with value dim = key dim (expand_v 1): within 6% of the transformer's parameters;
    'gdn_recompute' and 'gdn_recompute_core' the GDN with `recompute_gdn` 'mixer' and 'core' (its mixers'
    activations, or those between the projections and o_proj, recomputed in the backward)."""
    base = get_preset("fla-small").model.replace(vocab_size=vocab_size, max_position_embeddings=65536,
                                                 backend=backend)
    if smoke:
        base = base.replace(hidden_size=64, num_layers=2, num_heads=2, head_dim=16, attn_num_heads=2)
    return {"gdn": base, "transformer": base.replace(attn_layers="transformer"), "gdn_v64": base.replace(expand_v=1.0),
            "gdn_recompute": base.replace(recompute_gdn="mixer"),
            "gdn_recompute_core": base.replace(recompute_gdn="core")}


def model_configs(configs: dict[str, ModelConfig], models: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """The config of every model `compared_models` built, for a results file ('fla' runs the 'gdn' one)."""
    return {name: configs["gdn" if name == "fla" else name].to_dict() for name in models}


def compared_models(configs: dict[str, ModelConfig], names: list[str], device: torch.device,
                    dtype: torch.dtype | None = None) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Of `names`: 'gdn' (gdn_lab's LM from configs['gdn']), 'fla' (FLA's GatedDeltaNetForCausalLM with
    the GDN model's weights, where FLA can run), 'transformer', 'gdn_v64', 'gdn_recompute' and
    'gdn_recompute_core' (from their configs; the recomputing ones with the GDN model's weights), on
    `device` in `dtype` (None: as built, fp32).
    The GDN model is always built first, so the transformer's weights do not depend on `names`; seed torch
    before calling.

    Returns (name -> model, in that order; name -> note "skipped: <why>" for those that cannot run)."""
    models: dict[str, torch.nn.Module] = {}
    notes: dict[str, str] = {}
    gdn = build_model(configs["gdn"]).to(device=device, dtype=dtype)
    if "gdn" in names:
        models["gdn"] = gdn
    if "fla" in names:
        reason = fla_unavailable_reason(device.type)
        if reason:
            notes["fla"] = f"skipped: {reason}"
        else:
            models["fla"] = to_fla(gdn)
    if "transformer" in names:
        models["transformer"] = build_model(configs["transformer"]).to(device=device, dtype=dtype)
    if "gdn_v64" in names:
        models["gdn_v64"] = build_model(configs["gdn_v64"]).to(device=device, dtype=dtype)
    for name in ("gdn_recompute", "gdn_recompute_core"):
        if name in names:  # the GDN model's weights: the same math, other memory
            models[name] = build_model(configs[name]).to(device=device, dtype=dtype)
            models[name].load_state_dict(gdn.state_dict())
    return models, notes


# Kernel families of a training step, by kernel name (first match wins); the rest is "other"
# (elementwise, casts, reductions, copies).
KERNEL_FAMILIES = (
    ("attention", r"flash|fmha|attention|cudnn"),
    ("gdn_chunk", r"chunk|recompute_w_u|solve_tril|wy_repr|kkt|fused_recurrent|l2norm"),
    ("short_conv", r"conv"),
    ("norm", r"norm"),
    ("swiglu", r"swiglu"),
    ("cross_entropy", r"cross_entropy|logsumexp"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("copy", r"copy|cat|Memcpy|Memset|fill"),
)


def kernel_family(name: str) -> str:
    """The family of a CUDA kernel (KERNEL_FAMILIES) from its name."""
    for family, pattern in KERNEL_FAMILIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return family
    return "other"


def kernel_profile(step, top: int = 8, steps: int = 1) -> dict:
    """`steps` profiled calls of `step()`: per call, the GPU time summed over the kernels (and copies)
    it ran in ms, how many it launched, the time per kernel family (`kernel_family`), and the `top`
    kernels by time as [name, calls, ms]. Kernels of one stream do not overlap, so wall time minus
    gpu_ms is time the GPU waited for the host."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.self_device_time_total, reverse=True)
    families: dict[str, float] = {}
    for e in kernels:
        family = kernel_family(e.key)
        families[family] = families.get(family, 0.0) + e.self_device_time_total / 1e3 / steps
    return {"gpu_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            "kernels": sum(e.count for e in kernels) // steps,
            "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top": [[e.key[:100], e.count // steps, e.self_device_time_total / 1e3 / steps] for e in kernels[:top]]}
