"""Where the workbook runs: device, dtype, kernel backend, Colab detection, the Triton guard; a
module's device and eval mode for a block (`module_device`, `evaluating`).

Nothing here imports `fla` or `triton` at module import: a CPU machine without Triton must be
able to `import gdn_lab`. The fla backend is probed on first use and the answer cached.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import platform
import sys

import torch


class BackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message says what to do instead."""


def in_colab() -> bool:
    return "google.colab" in sys.modules


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; any other string is passed to torch.device.
    BackendError (one line) for a string that names no device, or CUDA where there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackendError(f"device={device!r} names no device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if picked.type == "cuda" and not torch.cuda.is_available():
        where = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise BackendError(f"device={device!r} but {where} (torch {torch.__version__}); use device='cpu' or 'auto'")
    if picked.type == "cuda" and picked.index is not None and picked.index >= torch.cuda.device_count():
        raise BackendError(f"device={device!r} but only {torch.cuda.device_count()} CUDA GPUs are visible")
    return picked


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of `module`'s first parameter (the CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """`module` in eval mode for the block, back to its own mode after (an exception included)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def pick_dtype(device: torch.device | str, dtype: str = "auto") -> torch.dtype:
    """Training compute dtype: bf16 on Ampere+ GPUs, fp16 (with a GradScaler) on older GPUs
    such as Colab's T4, fp32 on the CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def triton_hopper_problem(device: torch.device | None = None) -> str | None:
    """One line explaining why FLA's GDN backward is unsafe here, or None when it is fine.

    flash-linear-attention refuses (and would compute wrong gradients for) the Gated DeltaNet
    backward on Hopper GPUs with Triton >= 3.4 and < 3.7.1 (fla issue #640).
    """
    device = device or pick_device()
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:  # the imported module, not the installed metadata: a carried Triton on PYTHONPATH wins
        import triton as _triton
    except ImportError:
        return None
    triton = _triton.__version__
    if (3, 4) <= _version_tuple(triton) < (3, 7, 1):
        return (f"Triton {triton} computes wrong Gated DeltaNet gradients on Hopper (fla issue #640): "
                f"pip install 'triton>=3.7.1', or use backend='torch'")
    return None


@functools.lru_cache(maxsize=None)
def fla_unavailable_reason(device_type: str = "cuda") -> str | None:
    """Why the fla backend cannot run on `device_type`, or None when it can."""
    if device_type != "cuda":
        return "FLA's Triton kernels need a CUDA GPU; on the CPU use backend='torch'"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible; use backend='torch'"
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception as err:  # ImportError, or Triton failing to find a driver
        return (f"flash-linear-attention does not import ({type(err).__name__}: {str(err).splitlines()[0]}); "
                f"pip install 'flash-linear-attention>=0.6' 'triton>=3.7.1', or use backend='torch'")
    return None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' -> 'fla' on a CUDA device where fla imports, else 'torch'. An explicit 'fla' that
    cannot run raises BackendError with one line saying what to install or change."""
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    reason = fla_unavailable_reason(device.type)
    if backend == "auto":
        return "torch" if reason else "fla"
    if backend == "fla":
        if reason:
            raise BackendError(reason)
        return "fla"
    raise BackendError(f"backend={backend!r}; use 'auto', 'fla' or 'torch'")


def check_training_backend(backend: str, device: torch.device | str) -> None:
    """Raise BackendError before training with the fla backend where its backward is wrong."""
    if backend == "fla":
        problem = triton_hopper_problem(torch.device(device))
        if problem:
            raise BackendError(problem)


def environment_report(device: str = "auto", backend: str = "auto") -> dict:
    """Versions and choices, for the first cell of every notebook and every results JSON."""
    dev = pick_device(device)
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(pick_dtype(dev)).replace("torch.", ""),
        "backend": resolve_backend(backend, dev),
        "colab": in_colab(),
    }
    for package in ("torch", "triton", "flash-linear-attention", "fla-core", "transformers"):
        report[package] = version_of(package)
    from . import __version__
    report["gdn_lab"] = __version__
    report["git_commit"] = git_commit()
    return report


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The commit of the gdn_lab checkout in use: `$GDN_LAB_COMMIT` when set (a copy of the tree
    without .git, such as a GPU machine's), else `git rev-parse` of the checkout."""
    import os
    import pathlib
    import subprocess

    if os.environ.get("GDN_LAB_COMMIT"):
        return os.environ["GDN_LAB_COMMIT"]

    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
