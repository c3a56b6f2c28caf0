"""The one training loop under torch.distributed on the CPU (gloo): two processes equal one.

Tolerance: the single process runs grad_accum=2 micro-batches of 2 sequences, each of the two
ranks one micro-batch of 2, so the forward passes are the same computations; only the gradient
combination differs (autograd accumulation vs DDP's divide-and-all-reduce). Losses are compared
at a relative 1e-6, the rounding of fp32 sums; on these machines they come out bit-equal.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from gdn_lab.config import ModelConfig, TrainConfig
from gdn_lab.data import lm_data
from gdn_lab.models import build_model
from gdn_lab.train import TORCHRUN_ENV, DistributedLaunchError, main, shutdown_distributed, train

TINY = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, attn_num_heads=2,
                   attn_layers=(1,), backend="torch")
RTOL = 1e-6


def config(grad_accum: int) -> TrainConfig:
    return TrainConfig(steps=6, batch_size=4, grad_accum=grad_accum, seq_len=32, lr=3e-3, warmup_steps=1,
                       eval_every=3, eval_batches=2, save_every=3)


def make_data():
    return lm_data("pydoc", "byte", seq_len=32, max_chars=100_000)


def fresh_model():
    torch.manual_seed(0)
    return build_model(TINY)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, runs: list[tuple[str, str | None]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    clean = False
    try:
        for run_dir, resume in runs:  # one process group serves every run
            train(fresh_model(), config(grad_accum=1), make_data(), run_dir, resume=resume, progress=False)
        clean = True
    finally:
        shutdown_distributed(clean)


def train_on_two_processes(*runs: tuple[pathlib.Path, pathlib.Path | None]) -> list[list[dict]]:
    """Each (run_dir, resume) trained in turn by the same two spawned processes; their histories."""
    jobs = [(str(run_dir), resume and str(resume)) for run_dir, resume in runs]
    mp.spawn(_rank_main, args=(2, _free_port(), jobs), nprocs=2, join=True)
    return [json.loads((run_dir / "training_results.json").read_text())["results"]["history"] for run_dir, _ in runs]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    return train(fresh_model(), config(grad_accum=2), make_data(), run_dir, progress=False)


@pytest.fixture(scope="module")
def double(single, tmp_path_factory):
    """Two processes: a fresh run, and a resume of the single-process run's step-3 checkpoint."""
    fresh, resumed = tmp_path_factory.mktemp("double"), tmp_path_factory.mktemp("double_resumed")
    histories = train_on_two_processes((fresh, None), (resumed, single.run_dir / "checkpoints" / "step_3.pt"))
    return {"run_dir": fresh, "history": histories[0], "resumed_history": histories[1]}


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            if key in x or key in y:
                assert y[key] == pytest.approx(x[key], rel=RTOL), (x["step"], key)


def test_two_processes_equal_one_with_the_same_global_batch(single, double):
    assert_same_run(single.history, double["history"])
    assert json.loads((double["run_dir"] / "metrics.json").read_text())["world_size"] == 2
    assert json.loads((double["run_dir"] / "config.json").read_text())["world_size"] == 2


def test_a_two_process_checkpoint_resumes_in_one_process(double, tmp_path):
    resumed = train(fresh_model(), config(grad_accum=2), make_data(), tmp_path,
                    resume=double["run_dir"] / "checkpoints" / "step_3.pt", progress=False)
    assert_same_run(double["history"], resumed.history)


def test_a_one_process_checkpoint_resumes_in_two(single, double):
    assert_same_run(single.history, double["resumed_history"])


def _torchrun_env(monkeypatch, **values) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))


def test_a_world_size_that_does_not_divide_the_batch_stops_before_any_rank_waits(monkeypatch, tmp_path, capsys):
    _torchrun_env(monkeypatch, RANK=0, LOCAL_RANK=0, WORLD_SIZE=3, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    with pytest.raises(DistributedLaunchError) as err:
        train(fresh_model(), config(grad_accum=1), make_data(), tmp_path, progress=False)
    assert str(err.value) == ("batch_size=4 is not divisible by grad_accum x world_size = 1 x 3; pick a batch_size "
                              "that is a multiple of 3 (world_size=3 processes)")
    assert not torch.distributed.is_initialized()
    assert main(["--run-dir", str(tmp_path), "--steps", "2", "--set", "batch_size=4", "--no-progress"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "not divisible by grad_accum x world_size = 1 x 3" in stderr


def test_missing_torchrun_variables_are_named_in_one_line(monkeypatch, tmp_path):
    _torchrun_env(monkeypatch, RANK=0, WORLD_SIZE=2)
    with pytest.raises(DistributedLaunchError) as err:
        train(fresh_model(), config(grad_accum=1), make_data(), tmp_path, progress=False)
    message = str(err.value)
    assert "\n" not in message and "LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing" in message
    assert "torchrun --nproc_per_node" in message


def test_torchrun_runs_the_command_line_entry(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    repo = pathlib.Path(__file__).resolve().parents[1]
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gdn_lab", "train", "--preset", "tiny", "--steps", "2", "--run-dir", str(tmp_path),
               "--set", "batch_size=4", "--set", "seq_len=32", "--set", "eval_batches=1", "--no-progress"]
    done = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 steps, 256 tokens" in done.stdout and done.stdout.count("val loss") == 1  # rank 0 prints, once
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
