"""The one training loop: one process or many (torchrun), checkpoints, resume, extend.

    result = train(model, TrainConfig(steps=200), lm_data("pydoc"), "runs/gdn")
    result = train(model, TrainConfig(steps=200), data, "runs/gdn", resume="auto", extend_steps=100)

Each optimizer step takes the global batch `data.train_batch(step, batch_size, rank, world_size)`
(a pure function of the step, so resume needs no loader state; on a GPU the next one is built in
a background thread while the step runs, `data.PrefetchedBatches`), splits this rank's rows into
`grad_accum` micro-batches, and calls `model(inputs, targets=..., loss_mask=...)` so DDP's hooks
fire. The loss is the mean over every scored token of the global batch, however it is split
over micro-steps and ranks. Then: clip, AdamW, the next learning rate.

Learning rate: linear warmup to `lr`, cosine down to `lr * min_lr_ratio` at `steps`.

On one CUDA GPU (bf16 or fp32, grad_accum 1) the steps after the first replay CUDA graphs
(`gdn_lab.cuda_graph`; `TrainConfig.cuda_graph`): eager, a GDN model's step waits on the host
that launches its ~1700 kernels (H100, 768d x 12 layers: 160-180 ms eager, 118 ms graphed at 16k).
`extend_steps=N` lengthens a run to `steps + N` steps: from the step it resumes at, the rate
ramps linearly (over at most `warmup_steps`) from where it stands to the rate a run planned for
`steps + N` steps would have there, then follows a cosine down to the same minimum at the new end.
Asking again with the same `steps` and `extend_steps` continues that extension (a Colab
disconnect in the middle of it is resumed, not extended twice).

`TrainConfig.stop_at_val_acc` ends a run early (a learning-rate sweep on MQAR stops each rate once
it solves the task): at the first evaluation with val_acc >= the threshold, the run ends there as
at `steps` (final.pt, results, metrics with `stopped_early: true` and `steps` the step it stopped
at). The checkpoint keeps the stop, so resume='auto' with the same config returns the stopped run
without training. `extend_steps` on a stopped run trains on (the user asked for more): the
schedule is extended from the stopped step, and the threshold still applies at the extension's
evaluations, so pass stop_at_val_acc=None (or a higher one) to train the whole extension.

Run directory (rank 0 writes it):
    config.json             model, train and data settings, world size
    checkpoints/            best.pt (lowest val loss), step_N.pt (every save_every, and on Ctrl-C),
                            final.pt, diverged_step_N.pt (a NaN/inf loss); each written atomically,
                            with <name>.pt.json beside it (step, size, sha256: resume checks them)
    training_results.json   history: one record per step (train_loss, lr, tokens, grad_norm; and
                            val_loss, val_acc, val_ppl at eval steps), environment, metrics
    metrics.json            final val loss / accuracy / perplexity, tokens/s, steps, params
    training_curves.html    `gdn_lab.viz.training_curves` of the history

Runs never lose work: a fresh start (resume=None) in a run directory that holds checkpoints is
refused unless `overwrite=True`; Ctrl-C waits for the optimizer step under way to finish, then
saves step_N.pt; resume='auto' skips damaged checkpoints (naming each on stderr) for the newest
intact one; a save that fails (disk full) raises `results.WriteError` with the previous file intact.

Multi-GPU: `torchrun --nproc_per_node 2 -m gdn_lab train --preset small` runs this same loop.
It reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, starts torch.distributed
(nccl on CUDA, gloo on the CPU), wraps the model in DistributedDataParallel, gives each rank its
block of every global batch and skips the gradient all-reduce on all but the last micro-step.
`batch_size` stays the global batch: a checkpoint saved at one world size resumes at another.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig, TrainConfig, get_preset, parse_literal
from .cuda_graph import GraphedTrainStep, graph_unsupported_reason
from .data import PrefetchedBatches
from .env import BackendError, check_training_backend, evaluating, pick_device, pick_dtype, resolve_backend
from .results import WriteError, atomic_path, save_results, write_json, write_metrics

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; a checkpoint of the last good weights was written."""


class DistributedLaunchError(RuntimeError):
    """The torchrun environment is incomplete or does not fit the configuration."""


@dataclass
class TrainResult:
    """`history`: one dict per optimizer step (see the module docstring); `metrics`: what
    metrics.json holds; `run_dir`: where checkpoints and files went."""

    history: list[dict]
    metrics: dict
    run_dir: pathlib.Path


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Launch:
    """Where this process sits: rank of world_size, and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory and prints."""
        return self.rank == 0


def launch_from_env(train_config: TrainConfig) -> Launch:
    """One process, or a torchrun rank with torch.distributed started (nccl on CUDA, gloo on CPU).

    Every check that can fail runs before `init_process_group`, so a bad launch stops each rank
    with the same one-line error instead of leaving the others waiting.
    """
    device = pick_device(train_config.device)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        present = [name for name in TORCHRUN_ENV if name in os.environ]
        if not present:
            return Launch(0, 1, device)
        missing = [name for name in TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise DistributedLaunchError(
                f"{', '.join(present)} set but {', '.join(missing)} missing: launch with "
                f"`torchrun --nproc_per_node N -m gdn_lab train ...`, or unset {', '.join(present)} for one process")
        rank, local_rank, world_size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if not 0 <= rank < world_size:
            raise DistributedLaunchError(f"RANK={rank} is outside WORLD_SIZE={world_size}; let torchrun set both")
    try:
        train_config.micro_batch_size(world_size)
    except ConfigError as err:
        raise DistributedLaunchError(f"{err} (world_size={world_size} processes)") from None
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Launch(rank, world_size, device)


def shutdown_distributed(clean: bool = True) -> None:
    """End torch.distributed in this process, if it was started.

    `clean` (this rank got here without an error): first a barrier, so no rank tears its group down
    while a peer still talks to it (gloo aborts the process, "terminate called without an active
    exception", when a peer's connection closes under a pending operation). After an error only this
    rank's group is destroyed: a barrier would wait for ranks that may never arrive. A rank that
    failed alone (a checkpoint rank 0 could not write) leaves the others in that barrier; torchrun
    (and torch.multiprocessing.spawn) end them when it exits non-zero.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _all_reduce_sum(tensor: torch.Tensor, launch: Launch) -> torch.Tensor:
    if launch.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------- schedule


def _segment_lr(step: int, segment: dict) -> float:
    k = step - segment["start"]
    if k < segment["warmup"]:
        return segment["from_lr"] + (segment["peak_lr"] - segment["from_lr"]) * (k + 1) / segment["warmup"]
    progress = min(1.0, (k - segment["warmup"]) / max(1, segment["end"] - segment["start"] - segment["warmup"] - 1))
    return segment["min_lr"] + 0.5 * (segment["peak_lr"] - segment["min_lr"]) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, schedule: list[dict]) -> float:
    """Learning rate for optimizer step `step` (0-based) of a schedule made by `new_schedule` and
    `extend_schedule`: the last segment that starts at or before `step` applies."""
    return _segment_lr(step, [s for s in schedule if s["start"] <= step][-1])


def new_schedule(cfg: TrainConfig) -> list[dict]:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then a cosine that reaches `lr * min_lr_ratio`
    at the last step (step `steps - 1`)."""
    return [{"start": 0, "end": cfg.steps, "warmup": cfg.warmup_steps, "from_lr": 0.0, "peak_lr": cfg.lr,
             "min_lr": cfg.lr * cfg.min_lr_ratio}]


def extend_schedule(schedule: list[dict], step: int, new_end: int, cfg: TrainConfig) -> list[dict]:
    """The schedule lengthened to `new_end` steps from `step` on: ramp from the current rate to the
    rate a run planned for `new_end` steps has at `step`, then cosine to the minimum at `new_end`."""
    planned = {**new_schedule(cfg)[0], "end": new_end}
    segment = {"start": step, "end": new_end, "warmup": min(cfg.warmup_steps, (new_end - step) // 2),
               "from_lr": lr_at(max(step - 1, 0), schedule), "peak_lr": _segment_lr(step, planned),
               "min_lr": planned["min_lr"]}
    return [s for s in schedule if s["start"] < step] + [segment]


# ----------------------------------------------------------------------------- pieces of the loop


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                   capturable: bool = False) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); no weight decay on vectors (norm weights, biases, A_log, dt_bias)
    nor on parameters marked `_no_weight_decay`; embeddings and projections decay. `capturable`
    (CUDA): its step can be captured in a CUDA graph (`gdn_lab.cuda_graph`)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or getattr(param, "_no_weight_decay", False) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda",
                             capturable=capturable and device.type == "cuda")


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, device: torch.device, dtype: torch.dtype = torch.float32,
             launch: Launch | None = None) -> dict:
    """Loss, next-token accuracy and perplexity over the scored (`mask`) positions of `batches`.

    Logits come from `model(inputs)` ([B, T, vocab]). Under torchrun rank r takes batches
    r::world_size and the sums are all-reduced, so every rank returns the full-set numbers.
    """
    launch = launch or Launch(0, 1, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, scored tokens
    with evaluating(model):
        for batch in batches[launch.rank::launch.world_size]:
            batch = batch.to(device)
            with _autocast(device, dtype):
                logits = model(batch.inputs)
            logits, targets = logits.float()[batch.mask], batch.targets[batch.mask]
            sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                                 (logits.argmax(-1) == targets).sum().double(),
                                 targets.new_tensor(len(targets)).double()])
    loss_sum, correct, tokens = _all_reduce_sum(sums, launch).tolist()
    loss = loss_sum / max(tokens, 1)
    return {"val_loss": loss, "val_acc": correct / max(tokens, 1), "val_ppl": math.exp(min(loss, 700.0))}


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".json")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> pathlib.Path:
    """torch.save through `results.atomic_path`, fsynced, with `<name>.pt.json` beside it (step, size,
    sha256) for `verify_checkpoint`. A crash or an error mid-write (disk full: `WriteError`, one
    line) leaves the previous file at `path` intact."""
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        stamp = {"step": payload["step"], "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
    write_json(_sidecar(path), stamp)
    return path


def verify_checkpoint(path: str | os.PathLike) -> int:
    """The step of the checkpoint at `path` once its size and sha256 match the `.pt.json` written
    beside it; ConfigError (one line, naming the file) when it is missing, truncated or corrupted.
    A checkpoint from before the sidecars existed is checked by loading it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; pass resume='auto' or an existing .pt file")
    if not _sidecar(path).is_file():
        return _read_checkpoint(path, torch.device("cpu"), mmap=True)["step"]
    stamp = _read_sidecar(path)
    size = path.stat().st_size
    if size != stamp["bytes"]:
        raise ConfigError(f"{path} is truncated ({size:,} of {stamp['bytes']:,} bytes); resume from another "
                          f"checkpoint (resume='auto' picks the newest intact one)")
    if _sha256(path) != stamp["sha256"]:
        raise ConfigError(f"{path} is corrupted (its sha256 differs from the one saved with it); resume from "
                          f"another checkpoint (resume='auto' picks the newest intact one)")
    return stamp["step"]


def read_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """The payload of the checkpoint at `path` (model and optimizer state, model_config, step, ...)
    once `verify_checkpoint` accepts it; ConfigError (one line, naming the file) otherwise."""
    verify_checkpoint(path)
    return _read_checkpoint(pathlib.Path(path), torch.device(device))


def _read_sidecar(path: pathlib.Path) -> dict:
    """The step, size and sha256 saved beside checkpoint `path`; ConfigError when they cannot be read."""
    try:
        stamp = json.loads(_sidecar(path).read_text())
        if isinstance(stamp["step"], int) and isinstance(stamp["bytes"], int) and isinstance(stamp["sha256"], str):
            return stamp
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise ConfigError(f"{_sidecar(path)} is damaged, so {path} cannot be verified; resume from another "
                      f"checkpoint (resume='auto' picks the newest intact one)")


def _read_checkpoint(path: pathlib.Path, device: torch.device, mmap: bool = False) -> dict:
    """torch.load of a gdn_lab checkpoint; ConfigError (one line, naming the file) when it cannot be read."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:  # a truncated zip, a pickle error, a file that is no checkpoint at all
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{path} cannot be read as a checkpoint ({_clip(reason)}); resume from another "
                          f"checkpoint (resume='auto' picks the newest intact one)") from None
    missing = [key for key in ("step", "model", "optimizer", "schedule", "train_config") if key not in saved]
    if missing:
        raise ConfigError(f"{path} is not a gdn_lab training checkpoint (no {', '.join(missing)}); pass a file "
                          f"from a run's checkpoints/ folder")
    return saved


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_checkpoint(run_dir: str | os.PathLike, quiet: bool = False) -> pathlib.Path | None:
    """The intact checkpoint under `run_dir/checkpoints` with the most steps (final.pt on a tie), or None.

    Diverged checkpoints are skipped (resuming them would diverge again), and so are damaged ones
    (`verify_checkpoint`): each skipped file is named in one line on stderr unless `quiet`.
    """
    def skip(err: ConfigError) -> None:
        if not quiet:
            print(f"gdn_lab: skipping a damaged checkpoint: {str(err).split(';')[0]}", file=sys.stderr)

    rank = {"final": 2, "best": 0}
    candidates = []  # (step, rank, path, verified already)
    for path in pathlib.Path(run_dir, "checkpoints").glob("*.pt"):
        if path.name.startswith("diverged"):
            continue
        try:
            if _sidecar(path).is_file():
                candidates.append((_read_sidecar(path)["step"], rank.get(path.stem, 1), path, False))
            else:  # from before the sidecars: its step is read by loading it, which checks it too
                candidates.append((verify_checkpoint(path), rank.get(path.stem, 1), path, True))
        except ConfigError as err:
            skip(err)
    for _, _, path, verified in sorted(candidates, reverse=True):
        try:
            if not verified:
                verify_checkpoint(path)
            return path
        except ConfigError as err:
            skip(err)
    return None


def refuse_to_overwrite(run_dir: str | os.PathLike,
                        hints: tuple[str, str, str] = ("resume='auto'", "overwrite=True", "another run_dir")) -> None:
    """ConfigError (one line) when `run_dir/checkpoints` holds checkpoints that a fresh run would replace;
    `hints`: how to resume, how to overwrite, where else to go (the command line passes its flags)."""
    found = sorted(path.name for path in pathlib.Path(run_dir, "checkpoints").glob("*.pt"))
    if found:
        resume, overwrite, elsewhere = hints
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(f"{run_dir} already holds a run ({shown}): continue it with {resume}, start it "
                          f"again with {overwrite}, or pass {elsewhere}")


def _clear_run(run_dir: pathlib.Path) -> None:
    """What a fresh run in `run_dir` replaces (overwrite=True): checkpoints and their sidecars, results."""
    checkpoints = run_dir / "checkpoints"
    for path in [*checkpoints.glob("*.pt"), *checkpoints.glob("*.pt.json"),
                 *(run_dir / name for name in ("metrics.json", "training_results.json", "training_curves.html"))]:
        path.unlink(missing_ok=True)


class _DeferredInterrupt:
    """Ctrl-C held back to the next step boundary, so a checkpoint never holds half an optimizer step.

    Inside the block SIGINT only sets `pending`; `requested(launch)` (all ranks agree) tells the loop
    to stop at the boundary. A second Ctrl-C before that raises KeyboardInterrupt at once and sets
    `forced` (mid-step: nothing is saved). Off the main thread, or where SIGINT is ignored, nothing
    is installed."""

    def __init__(self):
        self.pending = self.forced = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.pending:
            self.forced = True
            raise KeyboardInterrupt
        self.pending = True

    def requested(self, launch: Launch) -> bool:
        """Whether any rank has a pending Ctrl-C (one all-reduce under torchrun)."""
        if launch.world_size == 1:
            return self.pending
        flag = torch.tensor(float(self.pending), device=launch.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (signal.SIG_IGN, None):
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _curves(history: list[dict], path: pathlib.Path) -> None:
    from .viz import save_html, training_curves

    save_html(training_curves(history, title=f"Training curves: {path.parent.name}"), path)


# ----------------------------------------------------------------------------- the loop's state and steps


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves beside the weights, optimizer, GradScaler and RNG,
    and what resume restores. Each field is a top-level key of the checkpoint under its own name
    (`payload`, `from_payload`), so checkpoints written before this class existed resume as before."""

    schedule: list[dict]  # learning-rate segments (new_schedule, extend_schedule); the last one ends the run
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all ranks together
    stopped_early: bool = False  # an evaluation met stop_at_val_acc before total_steps
    train_seconds: float = 0.0  # wall time of the optimizer steps (evaluations and saves not counted)
    best_val_loss: float = math.inf
    history: list[dict] = dataclasses.field(default_factory=list)  # one record per optimizer step

    @property
    def total_steps(self) -> int:
        """The step the run ends at: the end of its last schedule segment."""
        return self.schedule[-1]["end"]

    def payload(self) -> dict:
        """The fields under their checkpoint keys (the objects themselves, not copies)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_payload(cls, saved: dict) -> RunState:
        """The state saved in a loaded checkpoint; one from before `stopped_early` existed did not stop."""
        return cls(schedule=saved["schedule"], step=saved["step"], tokens=saved["tokens"],
                   stopped_early=saved.get("stopped_early", False), train_seconds=saved["train_seconds"],
                   best_val_loss=saved["best_val_loss"], history=saved["history"])


@dataclass(frozen=True)
class _RunFiles:
    """What rank 0 writes into the run directory while training, and what resume reads back: checkpoints
    (the weights, AdamW, the GradScaler, the RNG and the configs, with a RunState) and
    training_results.json. The save methods write on whichever rank calls them: `train` calls them on rank 0."""

    run_dir: pathlib.Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    device: torch.device

    @property
    def run_config(self) -> dict:
        """The model and train configs, as config.json and training_results.json record them."""
        return {"model": getattr(self.model, "config", None), "train": self.cfg}

    def payload(self, state: RunState) -> dict:
        """Everything a checkpoint holds at `state`."""
        model_config = self.run_config["model"]
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), **state.payload(), "rng": _rng_state(self.device),
                "train_config": self.cfg.to_dict(),
                "model_config": dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else None}

    def checkpoint_path(self, name: str) -> pathlib.Path:
        return self.run_dir / "checkpoints" / name

    def save_checkpoint(self, name: str, state: RunState) -> pathlib.Path:
        """checkpoints/<name> at `state` (`save_checkpoint`: atomic, with its sidecar)."""
        return save_checkpoint(self.checkpoint_path(name), self.payload(state))

    def restore(self, path: str | os.PathLike) -> RunState:
        """Load checkpoint `path` (it must fit the train config and the model) into the model, AdamW,
        the GradScaler and the RNG; the RunState it was saved at."""
        saved = _load_checkpoint(path, self.device, self.cfg)
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as err:
            raise ConfigError(f"{path} does not fit this model: {str(err).splitlines()[0]}") from None
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"]:  # empty when the run had no GradScaler (bf16 / fp32)
            self.scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"], self.device)
        return RunState.from_payload(saved)

    def save_results(self, history: list[dict], metrics: dict | None = None) -> None:
        """training_results.json: the history so far (and the metrics, once the run is done)."""
        results = {"history": history} if metrics is None else {"history": history, "metrics": metrics}
        save_results(self.run_dir / "training_results.json", results, config=self.run_config, seed=self.cfg.seed)


def _checkpoint_to_resume(run_dir: pathlib.Path, resume: str | os.PathLike | None, extend_steps: int,
                          launch: Launch) -> str | os.PathLike | None:
    """The checkpoint `train(resume=...)` continues from: None (a fresh run), for 'auto' the newest intact
    one in `run_dir` (or None; ConfigError when `extend_steps` needs one), else the path given, verified."""
    if resume != "auto":
        if resume is not None:
            verify_checkpoint(resume)
        return resume
    path = find_checkpoint(run_dir, quiet=not launch.is_main)
    if extend_steps and path is None:
        raise ConfigError(f"extend_steps={extend_steps} needs a run to extend, but {run_dir}/checkpoints holds "
                          f"no intact checkpoint")
    return path


def _extend(state: RunState, cfg: TrainConfig, extend_steps: int, run_dir: pathlib.Path) -> None:
    """Lengthen the schedule of `state` to `cfg.steps + extend_steps` steps (which trains a stopped run on);
    ConfigError when the run was already extended further."""
    end = cfg.steps + extend_steps
    if end < state.total_steps:
        raise ConfigError(f"the run in {run_dir} was extended to {state.total_steps} steps; resume it with "
                          f"extend_steps={state.total_steps - cfg.steps}")
    if end > state.total_steps:
        state.schedule = extend_schedule(state.schedule, state.step, end, cfg)
        state.stopped_early = False


def _use_cuda_graph(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, world_size: int) -> bool:
    """`cfg.cuda_graph`, or where it is None whether graphs can run here; ConfigError when it is True
    and they cannot."""
    reason = graph_unsupported_reason(cfg, device, dtype, world_size)
    if cfg.cuda_graph and reason:
        raise ConfigError(reason)
    return reason is None if cfg.cuda_graph is None else cfg.cuda_graph


class _EagerStep:
    """One optimizer step without CUDA graphs, in the two halves of `GraphedTrainStep` (`train` reads the
    loss between them): the global batch's rows on this rank in micro-batches of `micro_batch` (DDP
    all-reduces the gradients on the last only), GradScaler, clipping, then AdamW."""

    def __init__(self, ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 micro_batch: int, launch: Launch, dtype: torch.dtype, grad_clip: float | None):
        self.ddp_model, self.optimizer, self.scaler = ddp_model, optimizer, scaler
        self.micro_batch, self.launch, self.dtype, self.grad_clip = micro_batch, launch, dtype, grad_clip

    def forward_backward(self, batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the learning rate, then forward and backward every micro-batch of `batch`, unscale and clip:
        (the loss over the global batch's scored tokens, the gradient norm), device scalars."""
        launch, device = self.launch, self.launch.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scored = _all_reduce_sum(batch.mask.sum().double(), launch)  # scored tokens in the global batch
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        micro_batches = batch.split(self.micro_batch)
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or launch.world_size == 1 else self.ddp_model.no_sync():
                with _autocast(device, self.dtype):
                    loss = self.ddp_model(micro.inputs, targets=micro.targets, loss_mask=micro.mask)
                # weight the micro-batch mean by its share of the global batch's scored tokens;
                # DDP averages over ranks, hence the world_size factor
                share = micro.mask.sum() * launch.world_size / scored
                self.scaler.scale(loss * share.to(loss.dtype)).backward()
            step_loss += loss.detach().double() * micro.mask.sum()
        step_loss = _all_reduce_sum(step_loss, launch) / scored
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.ddp_model.parameters(), self.grad_clip or math.inf)
        return step_loss, grad_norm

    def optimizer_step(self) -> None:
        """AdamW through the GradScaler, then the gradients cleared."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def _prefetch_batches(device: torch.device) -> bool:
    """Whether train() builds the next batch in a background thread: on accelerators."""
    return device.type != "cpu"


def _read_step(loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, state: RunState, files: _RunFiles,
               launch: Launch) -> tuple[float, float]:
    """The step's loss and gradient norm as floats (one sync); on a NaN/inf loss, checkpoint the weights
    from before the step (rank 0) and raise TrainingDiverged."""
    loss_value, grad_norm_value = torch.stack([loss.double(), grad_norm.double()]).tolist()
    if not math.isfinite(loss_value):
        name = f"diverged_step_{state.step}.pt"
        if launch.is_main:
            files.save_checkpoint(name, state)
        raise TrainingDiverged(f"loss became {loss_value} at step {state.step + 1} (lr {lr:.2e}); weights before "
                               f"it saved to {files.checkpoint_path(name)}: lower lr, raise warmup_steps or set "
                               f"grad_clip")
    return loss_value, grad_norm_value


def _evaluate_and_record(state: RunState, files: _RunFiles, val_batches: list, dtype: torch.dtype, launch: Launch,
                         bar: tqdm, on_eval) -> None:
    """Evaluate the model into the last history record (every rank); then on rank 0 save best.pt at a new
    lowest val loss, print the numbers under `bar` (when it shows), rewrite training_results.json and
    call `on_eval(step, record, history)`."""
    record = evaluate(files.model, val_batches, launch.device, dtype, launch)
    state.history[-1].update(record)
    if not launch.is_main:
        return
    if record["val_loss"] < state.best_val_loss:
        state.best_val_loss = record["val_loss"]
        files.save_checkpoint("best.pt", state)
    if not bar.disable:  # rank 0 with progress=True
        bar.write(f"step {state.step}/{state.total_steps}: val loss {record['val_loss']:.4f}, "
                  f"acc {record['val_acc']:.3f}, ppl {record['val_ppl']:.2f}")
    files.save_results(state.history)
    if on_eval is not None:
        on_eval(state.step, record, state.history)


def _final_metrics(state: RunState, num_params: int, launch: Launch, dtype: torch.dtype, use_graph: bool) -> dict:
    """What metrics.json holds: the last evaluation, the best val loss, the counters and the setup."""
    final = state.history[-1]
    return {"final_val_loss": final["val_loss"], "final_val_acc": final["val_acc"],
            "final_val_ppl": final["val_ppl"], "best_val_loss": state.best_val_loss, "steps": state.step,
            "stopped_early": state.stopped_early, "tokens": state.tokens,
            "tokens_per_second": state.tokens / state.train_seconds,
            "train_seconds": state.train_seconds, "num_params": num_params, "world_size": launch.world_size,
            "device": str(launch.device), "dtype": str(dtype).removeprefix("torch."), "cuda_graph": use_graph}


# ----------------------------------------------------------------------------- the loop


def train(model: torch.nn.Module, train_config: TrainConfig, data, run_dir: str | os.PathLike,
          resume: str | os.PathLike | None = None, extend_steps: int = 0, progress: bool = True,
          on_eval=None, overwrite: bool = False) -> TrainResult:
    """Train `model` on `data` (any batch source: `LMData`, `TaskData`) and write `run_dir`.

    resume: None (start fresh), 'auto' (the newest intact checkpoint in run_dir if any, else fresh;
    damaged ones are skipped with a line on stderr) or a checkpoint path. A fresh start in a run_dir
    that holds checkpoints is refused (ConfigError) unless `overwrite=True`, which deletes them first.
    extend_steps: train to `train_config.steps + extend_steps` steps (implies resume='auto' when
    resume is None; see the module docstring for the schedule).
    on_eval(step, record, history): called on rank 0 after each evaluation (live plots).
    Raises TrainingDiverged on a NaN/inf loss, ConfigError / DistributedLaunchError on settings
    that cannot work, `results.WriteError` when a file cannot be written (the previous one is kept).
    Ctrl-C is held back until the current optimizer step is done; then checkpoints/step_N.pt is
    written and KeyboardInterrupt re-raised (a second Ctrl-C stops at once, saving nothing).
    """
    cfg, run_dir = train_config, pathlib.Path(run_dir)
    if extend_steps < 0:
        raise ConfigError(f"extend_steps must be >= 0, got {extend_steps}")
    if extend_steps and resume is None:
        resume = "auto"
    if overwrite and resume is not None:
        raise ConfigError(f"overwrite=True starts {run_dir} afresh, but resume={str(resume)!r} (or extend_steps) "
                          f"continues a run; pass one or the other")
    if resume is None and not overwrite:
        refuse_to_overwrite(run_dir)
    launch = launch_from_env(cfg)
    device, micro_batch = launch.device, cfg.micro_batch_size(launch.world_size)
    _check_fit(model, cfg, data)
    dtype = pick_dtype(device, cfg.dtype)
    model_config = getattr(model, "config", None)
    check_training_backend(resolve_backend(getattr(model_config, "backend", "torch"), device), device)
    use_graph = _use_cuda_graph(cfg, device, dtype, launch.world_size)

    torch.manual_seed(cfg.seed)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device, capturable=use_graph)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    files = _RunFiles(run_dir, model, optimizer, scaler, cfg, device)
    checkpoint_path = _checkpoint_to_resume(run_dir, resume, extend_steps, launch)
    state = RunState(new_schedule(cfg)) if checkpoint_path is None else files.restore(checkpoint_path)
    _extend(state, cfg, extend_steps, run_dir)

    val_batches = data.val_batches(micro_batch, cfg.eval_batches * cfg.grad_accum * launch.world_size)
    if not val_batches:
        raise ConfigError("the data has no validation batches; build it with val_fraction > 0")
    ddp_model = model
    if launch.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    eager = _EagerStep(ddp_model, optimizer, scaler, micro_batch, launch, dtype, cfg.grad_clip)
    graphed: GraphedTrainStep | None = None  # built after the first eager step when use_graph
    bar = tqdm(total=state.total_steps, initial=state.step, desc=run_dir.name,
               disable=not (progress and launch.is_main), dynamic_ncols=True)
    num_params = sum(p.numel() for p in model.parameters())
    if launch.is_main:
        if overwrite:
            _clear_run(run_dir)
        write_json(run_dir / "config.json", {
            **files.run_config, "data": data.describe() if hasattr(data, "describe") else None,
            "world_size": launch.world_size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "num_params": num_params})

    model.train()
    # on a GPU the next batch is built in a thread while this step runs (a CPU step is compute-bound
    # and its threads would only compete with the builder)
    batches = PrefetchedBatches(data, cfg.batch_size, launch.rank, launch.world_size, last_step=state.total_steps,
                                enabled=_prefetch_batches(device))
    with _DeferredInterrupt() as interrupt, batches:
        try:
            while state.step < state.total_steps and not state.stopped_early:
                started = time.perf_counter()
                lr = lr_at(state.step, state.schedule)
                batch = batches.get(state.step).to(device)
                if graphed is not None:
                    loss, grad_norm = graphed.forward_backward(batch.inputs, batch.targets, batch.mask)
                    loss_value, grad_norm = _read_step(loss, grad_norm, lr, state, files, launch)
                    graphed.optimizer_step(lr)
                else:
                    loss, grad_norm = eager.forward_backward(batch, lr)
                    loss_value, grad_norm = _read_step(loss, grad_norm, lr, state, files, launch)
                    eager.optimizer_step()
                    if use_graph:
                        graphed = GraphedTrainStep(
                            lambda inputs, targets, mask: model(inputs, targets=targets, loss_mask=mask),
                            model, optimizer, dtype, cfg.grad_clip, (batch.inputs, batch.targets, batch.mask))
                state.step += 1
                state.tokens += batch.inputs.numel() * launch.world_size
                state.train_seconds += time.perf_counter() - started
                state.history.append({"step": state.step, "tokens": state.tokens, "train_loss": loss_value, "lr": lr,
                                      "grad_norm": grad_norm})
                bar.update()
                if state.step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{state.tokens / state.train_seconds:.3g}")
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    _evaluate_and_record(state, files, val_batches, dtype, launch, bar, on_eval)
                    state.stopped_early = (state.step < state.total_steps
                                           and _reached(state.history[-1], cfg.stop_at_val_acc))
                    if state.stopped_early and not bar.disable:
                        bar.write(f"step {state.step}: val acc reached stop_at_val_acc={cfg.stop_at_val_acc}; "
                                  f"stopping")
                if cfg.save_every and state.step % cfg.save_every == 0 and launch.is_main:
                    files.save_checkpoint(f"step_{state.step}.pt", state)
                if interrupt.requested(launch):  # the step boundary: the only place a Ctrl-C stops the loop
                    raise KeyboardInterrupt
            if "val_loss" not in state.history[-1]:
                _evaluate_and_record(state, files, val_batches, dtype, launch, bar, on_eval)
        except KeyboardInterrupt:
            if launch.is_main and interrupt.forced:
                bar.write(f"a second Ctrl-C stopped step {state.step + 1} midway: nothing saved; resume='auto' "
                          f"continues from the last checkpoint")
            elif launch.is_main:
                path = files.save_checkpoint(f"step_{state.step}.pt", state)
                bar.write(f"interrupted at step {state.step}: saved {path}; continue with resume='auto'")
            raise
        finally:
            bar.close()

        metrics = _final_metrics(state, num_params, launch, dtype, use_graph)
        if launch.is_main:
            files.save_checkpoint("final.pt", state)
            files.save_results(state.history, metrics)
            write_metrics(run_dir, metrics)
            _curves(state.history, run_dir / "training_curves.html")
    if interrupt.pending:  # Ctrl-C during the last evaluation or the final writes: the run is complete
        raise KeyboardInterrupt
    return TrainResult(state.history, metrics, run_dir)


def _reached(record: dict, stop_at_val_acc: float | None) -> bool:
    """Whether an evaluation `record` meets the early-stop threshold (never when it is None)."""
    return stop_at_val_acc is not None and record["val_acc"] >= stop_at_val_acc


def _check_fit(model: torch.nn.Module, cfg: TrainConfig, data) -> None:
    data_seq_len = getattr(data, "seq_len", cfg.seq_len)
    if data_seq_len != cfg.seq_len:
        raise ConfigError(f"the data serves sequences of {data_seq_len} tokens but train_config.seq_len="
                          f"{cfg.seq_len}; build both with the same seq_len")
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    data_vocab = getattr(data, "vocab_size", None)
    if model_vocab is not None and data_vocab is not None and data_vocab > model_vocab:
        raise ConfigError(f"the data has {data_vocab} token ids but the model's vocab_size={model_vocab}; "
                          f"build the model with vocab_size={data_vocab}")


def _load_checkpoint(path: str | os.PathLike, device: torch.device, cfg: TrainConfig) -> dict:
    saved = _read_checkpoint(pathlib.Path(path), device)
    for name in ("batch_size", "seq_len"):
        saved_value, value = saved["train_config"][name], getattr(cfg, name)
        if saved_value != value:
            raise ConfigError(f"{path} was trained with {name}={saved_value}, not {value}; resume with the same "
                              f"value (grad_accum and world size may change)")
    if saved["schedule"][0]["end"] != cfg.steps:
        raise ConfigError(f"{path} is from a run planned for {saved['schedule'][0]['end']} steps but "
                          f"train_config.steps={cfg.steps}; keep steps and pass extend_steps to train longer")
    return saved


# ----------------------------------------------------------------------------- command line


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with --steps, --attn-layers and --set key=value applied (validated)."""
    preset = get_preset(args.preset)
    model_changes, train_changes = {}, {}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in model_fields | train_fields:
            raise ConfigError(f"--set {item!r}: write key=value with a ModelConfig or TrainConfig field as key")
        (model_changes if key in model_fields else train_changes)[key] = parse_literal(value)
    if args.steps is not None:
        train_changes["steps"] = args.steps
    if args.attn_layers is not None:
        layers = args.attn_layers
        if layers[:1].isdigit():
            try:
                layers = tuple(int(i) for i in layers.split(","))
            except ValueError:
                raise ConfigError(f"--attn-layers {args.attn_layers}: write indices as 5,11 or a pattern name "
                                  f"such as sparse") from None
        model_changes["attn_layers"] = layers
    if isinstance(train_changes.get("steps"), int) and "warmup_steps" not in train_changes:
        train_changes["warmup_steps"] = min(preset.train.warmup_steps, max(0, train_changes["steps"] // 10))
    return preset.model.replace(**model_changes), preset.train.replace(**train_changes)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (status 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m gdn_lab train",
        description="Train a gdn_lab language model; under `torchrun --nproc_per_node N` on N processes.")
    parser.add_argument("--preset", default="tiny", help="model + training preset (see `python -m gdn_lab presets`)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--run-dir", help="where checkpoints and results go (default: runs/<preset>)")
    parser.add_argument("--resume", help="'auto' (newest intact checkpoint in the run dir) or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run dir that holds a run, deleting its checkpoints")
    parser.add_argument("--extend-steps", type=int, default=0, help="train a finished run this many steps longer")
    parser.add_argument("--corpus", default="pydoc", help="'pydoc', 'python-source' or a Hugging Face dataset name")
    parser.add_argument("--tokenizer", default="byte", help="'byte', 'bpe:<vocab>' or a Hugging Face tokenizer name")
    parser.add_argument("--attn-layers", help="hybrid pattern (sparse, alternating, late, transformer, 2/12) "
                                              "or indices such as 5,11")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ModelConfig or TrainConfig field (a Python literal; repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m gdn_lab train ...`: build data and model from a preset, train, print the result.
    Returns the exit status; configuration and launch problems print one line, status 2 (every
    --set value, the device and the run directory are checked before the data is built); a
    diverged run or a file that cannot be written prints one line, status 1."""
    args = _parser().parse_args(argv)
    from .data import lm_data
    from .models import build_model

    run_dir = args.run_dir or f"runs/{args.preset}"
    clean = False
    try:
        model_config, train_config = configs_from_args(args)
        pick_device(train_config.device)
        if args.resume is None and not args.extend_steps and not args.overwrite:
            refuse_to_overwrite(run_dir, ("--resume auto", "--overwrite", "another --run-dir"))
        data = lm_data(args.corpus, args.tokenizer, seq_len=train_config.seq_len, seed=train_config.seed)
        torch.manual_seed(train_config.seed)
        model = build_model(model_config.replace(vocab_size=data.vocab_size))
        result = train(model, train_config, data, run_dir, resume=args.resume, extend_steps=args.extend_steps,
                       progress=not args.no_progress, overwrite=args.overwrite)
        clean = True
    except (ConfigError, BackendError, DistributedLaunchError) as err:
        print(f"gdn_lab train: {err}", file=sys.stderr)
        return 2
    except (TrainingDiverged, WriteError) as err:
        print(f"gdn_lab train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutdown_distributed(clean)
    if int(os.environ.get("RANK", 0)) == 0:
        m = result.metrics
        print(f"{m['steps']} steps, {m['tokens']:,} tokens: val loss {m['final_val_loss']:.4f}, "
              f"acc {m['final_val_acc']:.3f}, ppl {m['final_val_ppl']:.2f}, {m['tokens_per_second']:,.0f} tokens/s "
              f"-> {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
