"""gdn_lab.train on the CPU: the loss falls, resume is bit-exact, saves are atomic, failures are one line."""
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from gdn_lab.config import ConfigError, ModelConfig, TrainConfig
from gdn_lab.data import LMData, lm_data
from gdn_lab.models import build_model
from gdn_lab.tasks import TaskData
from gdn_lab.train import (
    RunState,
    TrainingDiverged,
    extend_schedule,
    find_checkpoint,
    lr_at,
    main,
    make_optimizer,
    new_schedule,
    save_checkpoint,
    train,
)

# a two-layer hybrid (GDN then attention) so both mixers train through the loop
TINY = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, attn_num_heads=2,
                   attn_layers=(1,), backend="torch")


@pytest.fixture(scope="module")
def data():
    return lm_data("pydoc", "byte", seq_len=32, max_chars=100_000)


def config(**changes) -> TrainConfig:
    settings = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2)
    return TrainConfig(**{**settings, **changes})


def fresh_model(model_config: ModelConfig = TINY):
    torch.manual_seed(0)
    return build_model(model_config)


@pytest.fixture(scope="module")
def mqar():
    return TaskData("mqar", vocab_size=32, seq_len=32, seed=0, num_kv_pairs=4)


@pytest.fixture(scope="module")
def mqar_full(mqar, tmp_path_factory):
    """12 MQAR steps without a threshold, evaluated every 4."""
    return train(fresh_model(TINY.replace(vocab_size=32)), config(), mqar, tmp_path_factory.mktemp("mqar"),
                 progress=False)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 12-step run with a checkpoint every 6 steps."""
    return train(fresh_model(), config(save_every=6), data, tmp_path_factory.mktemp("reference"), progress=False)


class InterruptAt:
    """A batch source that raises `error` (KeyboardInterrupt: as Ctrl-C would) when asked for `step`."""

    def __init__(self, data, step: int, error: type[BaseException] = KeyboardInterrupt):
        self.data, self.step, self.error = data, step, error

    def train_batch(self, step, *args):
        if step == self.step:
            raise self.error(f"asked for step {step}'s batch")
        return self.data.train_batch(step, *args)

    def __getattr__(self, name):
        return getattr(self.data, name)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_loss_falls_on_the_embedded_corpus(data, tmp_path):
    evals = []
    result = train(fresh_model(), config(steps=40, batch_size=8, eval_every=20), data, tmp_path, progress=False,
                   on_eval=lambda step, record, history: evals.append((step, record["val_loss"], len(history))))
    first = result.history[0]["train_loss"]
    assert abs(first - math.log(256)) < 0.1  # an untrained byte model is uniform
    assert result.metrics["final_val_loss"] < 4.0 and result.metrics["final_val_acc"] > 0.1
    assert [(step, length) for step, _, length in evals] == [(20, 20), (40, 40)]
    assert evals[1][1] == result.metrics["final_val_loss"] == result.metrics["best_val_loss"]
    assert result.metrics["final_val_ppl"] == pytest.approx(math.exp(result.metrics["final_val_loss"]))

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["tokens"] == 40 * 8 * 32 and metrics["tokens_per_second"] > 0
    assert metrics["num_params"] == sum(p.numel() for p in build_model(TINY).parameters())
    saved = json.loads((tmp_path / "training_results.json").read_text())
    assert saved["results"]["history"][-1]["val_loss"] == metrics["final_val_loss"]
    assert "torch" in saved["environment"] and saved["config"]["train"]["steps"] == 40
    assert json.loads((tmp_path / "config.json").read_text())["model"]["attn_layers"] == [1]
    assert (tmp_path / "training_curves.html").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.pt", "best.pt.json", "final.pt", "final.pt.json"]  # each checkpoint with its size and sha256


def test_resume_equals_the_uninterrupted_run_bitwise(data, reference, tmp_path):
    checkpoint = reference.run_dir / "checkpoints" / "step_6.pt"
    resumed = train(fresh_model(), config(save_every=6), data, tmp_path, resume=checkpoint, progress=False)
    assert resumed.history == reference.history  # every loss, lr, grad norm and val metric, exactly
    final = torch.load(reference.run_dir / "checkpoints" / "final.pt", weights_only=True)["model"]
    again = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(final[name], again[name]) for name in final)


def test_ctrl_c_saves_a_checkpoint_and_resume_auto_finishes_the_run_exactly(data, reference, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), config(save_every=6), InterruptAt(data, 9), tmp_path, progress=False)
    assert find_checkpoint(tmp_path).name == "step_9.pt"
    assert torch.load(tmp_path / "checkpoints" / "step_9.pt", weights_only=True)["step"] == 9
    resumed = train(fresh_model(), config(save_every=6), data, tmp_path, resume="auto", progress=False)
    assert resumed.history == reference.history


def test_an_exception_mid_save_leaves_the_previous_checkpoint_loadable(data, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_that_dies_on_the_second_call(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_that_dies_on_the_second_call)
    with pytest.raises(OSError, match="No space left"):  # best.pt at step 2, then its rewrite at step 4 dies
        train(fresh_model(), config(eval_every=2), data, tmp_path, progress=False)
    monkeypatch.undo()
    assert len(calls) == 2
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "best.pt.json"]  # no temp file


def test_nan_loss_stops_with_one_line_and_a_checkpoint(data, tmp_path):
    def poison(step, record, history):
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))

    model = fresh_model()
    with pytest.raises(TrainingDiverged) as err:
        train(model, config(), data, tmp_path, progress=False, on_eval=poison)
    assert one_line(err).startswith("loss became nan at step 5")
    assert torch.load(tmp_path / "checkpoints" / "diverged_step_4.pt", weights_only=True)["step"] == 4
    assert find_checkpoint(tmp_path).name == "best.pt"  # resume='auto' skips the diverged one


def test_bad_settings_are_one_line_errors(data, reference, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(reference.run_dir, finished)
    cases = [
        (lambda: train(fresh_model(), config(seq_len=16), data, tmp_path / "a"), "seq_len"),
        (lambda: train(fresh_model(TINY.replace(vocab_size=100)), config(), data, tmp_path / "b"), "vocab_size=256"),
        (lambda: train(fresh_model(), config(), data, tmp_path / "c", resume=tmp_path / "no.pt"), "no checkpoint"),
        (lambda: train(fresh_model(), config(), data, tmp_path / "d", extend_steps=5), "needs a run to extend"),
        (lambda: train(fresh_model(), config(), data, tmp_path / "e", extend_steps=-1), "extend_steps must be"),
        (lambda: train(fresh_model(), config(steps=20), data, finished, resume="auto"), "pass extend_steps"),
        (lambda: train(fresh_model(), config(batch_size=8), data, finished, resume="auto"), "batch_size=4"),
        (lambda: train(fresh_model(), config(), LMData(data.tokens, 32, val_fraction=0), tmp_path / "f"),
         "no validation batches"),
        (lambda: config(batch_size=6, grad_accum=4), "not divisible by grad_accum"),
        (lambda: config(warmup_steps=12), "warmup_steps"),
        (lambda: train(fresh_model(), config(cuda_graph=True), data, tmp_path / "g"), "cuda_graph=True needs a CUDA"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            call()
        one_line(err)


def test_extend_lengthens_a_finished_run_and_is_idempotent(data, tmp_path):
    base = train(fresh_model(), config(steps=8), data, tmp_path, progress=False)
    extended = train(fresh_model(), config(steps=8), data, tmp_path, extend_steps=6, progress=False)
    assert [r["step"] for r in extended.history] == list(range(1, 15))
    assert extended.history[:8] == base.history  # the finished part is untouched
    lrs = [r["lr"] for r in extended.history]
    min_lr = 3e-3 * 0.1
    assert lrs[7] == pytest.approx(min_lr)  # the base run ended on the floor
    assert lrs[8] > lrs[7] and max(lrs[8:]) < 3e-3 and lrs[-1] < lrs[9]  # ramp up, then cosine down
    assert extended.metrics["steps"] == 14 and extended.metrics["final_val_loss"] <= base.metrics["final_val_loss"]
    again = train(fresh_model(), config(steps=8), data, tmp_path, extend_steps=6, progress=False)
    assert again.history == extended.history  # asking again continues, it does not extend twice


def test_schedule_warmup_cosine_and_extension():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    schedule = new_schedule(cfg)
    lrs = [lr_at(step, schedule) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[10] == 1.0 and lrs[99] == pytest.approx(0.1)
    longer = extend_schedule(schedule, 100, 150, cfg)
    planned = new_schedule(cfg.replace(steps=150))
    assert lr_at(99, longer) == lrs[99]  # history is not rewritten
    assert lr_at(109, longer) == pytest.approx(lr_at(100, planned))  # ramped up to the 150-step plan's rate
    assert lr_at(100, longer) == pytest.approx(lrs[99] + (lr_at(100, planned) - lrs[99]) / 10)
    assert lr_at(149, longer) == pytest.approx(0.1)


def test_grad_accumulation_matches_one_big_batch(data, tmp_path):
    whole = train(fresh_model(), config(steps=4), data, tmp_path / "whole", progress=False)
    accumulated = train(fresh_model(), config(steps=4, grad_accum=2), data, tmp_path / "accum", progress=False)
    for a, b in zip(whole.history, accumulated.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)  # fp32 summation order only


def test_no_weight_decay_on_vectors_and_marked_parameters():
    model = build_model(TINY)
    decay, no_decay = make_optimizer(model, config(), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert any(name.endswith("A_log") for name in no_decay_names)
    assert any(name.endswith("dt_bias") for name in no_decay_names)
    assert all(p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_command_line(tmp_path, capsys):
    args = ["--preset", "tiny", "--steps", "3", "--run-dir", str(tmp_path), "--set", "batch_size=4",
            "--set", "seq_len=32", "--set", "eval_batches=1", "--no-progress"]
    assert main(args) == 0
    assert "3 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3
    assert main(args + ["--set", "colour=blue"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "colour=blue" in err


def test_stop_at_val_acc_ends_the_run_at_the_first_evaluation_that_meets_it(mqar, mqar_full, tmp_path):
    assert mqar_full.metrics["steps"] == 12 and mqar_full.metrics["stopped_early"] is False
    assert mqar_full.history[3]["val_acc"] > 1e-9  # the first evaluation (step 4) meets the threshold
    result = train(fresh_model(TINY.replace(vocab_size=32)), config(stop_at_val_acc=1e-9), mqar, tmp_path,
                   progress=False)
    assert result.metrics["steps"] == 4 and result.metrics["stopped_early"] is True
    assert result.history == mqar_full.history[:4]  # the same run, cut at its first evaluation
    assert result.metrics["final_val_acc"] == mqar_full.history[3]["val_acc"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["stopped_early"] is True and metrics["tokens"] == 4 * 4 * 32
    assert json.loads((tmp_path / "training_results.json").read_text())["results"]["metrics"] == metrics
    final = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert final["step"] == 4 and final["stopped_early"] is True
    assert (tmp_path / "training_curves.html").stat().st_size > 1000


def test_a_threshold_never_met_trains_every_step(mqar, mqar_full, tmp_path):
    assert max(r.get("val_acc", 0.0) for r in mqar_full.history) < 1.0  # 12 steps do not solve MQAR
    result = train(fresh_model(TINY.replace(vocab_size=32)), config(stop_at_val_acc=1.0), mqar, tmp_path,
                   progress=False)
    assert result.metrics["steps"] == 12 and result.metrics["stopped_early"] is False
    assert result.history == mqar_full.history


def test_resume_after_an_early_stop_trains_no_further_and_extend_trains_on(mqar, tmp_path):
    cfg = config(stop_at_val_acc=1e-9)
    stopped = train(fresh_model(TINY.replace(vocab_size=32)), cfg, mqar, tmp_path, progress=False)
    assert stopped.metrics["steps"] == 4
    weights = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)["model"]
    # asking for step 4's batch would raise: resuming the stopped run must not train
    again = train(fresh_model(TINY.replace(vocab_size=32)), cfg, InterruptAt(mqar, 4, AssertionError), tmp_path,
                  resume="auto", progress=False)
    assert again.metrics == stopped.metrics and again.history == stopped.history
    assert json.loads((tmp_path / "metrics.json").read_text()) == stopped.metrics
    reloaded = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[name], reloaded[name]) for name in weights)

    # extend_steps trains on; the threshold still holds, so it stops at the extension's first evaluation
    extended = train(fresh_model(TINY.replace(vocab_size=32)), cfg, mqar, tmp_path, extend_steps=4, progress=False)
    assert extended.metrics["steps"] == 8 and extended.metrics["stopped_early"] is True
    assert extended.history[:4] == stopped.history and [r["step"] for r in extended.history] == list(range(1, 9))


def test_a_checkpoint_without_the_stop_key_resumes_as_not_stopped(mqar, tmp_path):
    cfg = config(stop_at_val_acc=1e-9)
    train(fresh_model(TINY.replace(vocab_size=32)), cfg, mqar, tmp_path, progress=False)
    path = tmp_path / "checkpoints" / "final.pt"
    saved = torch.load(path, weights_only=True)
    del saved["stopped_early"]  # as written before stop_at_val_acc existed
    save_checkpoint(path, saved)
    resumed = train(fresh_model(TINY.replace(vocab_size=32)), cfg, mqar, tmp_path, resume="auto", progress=False)
    assert resumed.metrics["steps"] == 8 and resumed.metrics["stopped_early"] is True


def test_stop_at_val_acc_settings_are_one_line_errors():
    for changes, message in [({"stop_at_val_acc": 0.0}, r"stop_at_val_acc must be in \(0, 1\]"),
                             ({"stop_at_val_acc": 1.5}, r"stop_at_val_acc must be in \(0, 1\]"),
                             ({"stop_at_val_acc": 0.9, "eval_every": 0}, "set eval_every > 0")]:
        with pytest.raises(ConfigError, match=message) as err:
            config(**changes)
        one_line(err)
    assert config(stop_at_val_acc=1.0).stop_at_val_acc == 1.0 and config().stop_at_val_acc is None


# A child process that trains one tiny run per trial in a fresh folder, finishing it with resume='auto'
# after every Ctrl-C, and reports whether each equals the uninterrupted reference run.
INTERRUPTED_TRIALS = r"""
import json, pathlib, signal, sys, time
import torch
from gdn_lab.config import ModelConfig, TrainConfig
from gdn_lab.data import lm_data
from gdn_lab.models import build_model
from gdn_lab.train import train

torch.set_num_threads(1)
base, trials = pathlib.Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, lambda *_: None)  # outside train() a late Ctrl-C changes nothing


class Announced:
    # the batch source; says "loop" when the first step's batch is asked for (the parent's cue)
    def __init__(self, data):
        self.data, self.announce, self.times = data, False, []

    def train_batch(self, step, *args):
        self.times.append(time.perf_counter())
        if step == 0 and self.announce:
            self.announce = False
            print("loop", flush=True)
        return self.data.train_batch(step, *args)

    def __getattr__(self, name):
        return getattr(self.data, name)


data = Announced(lm_data("pydoc", "byte", seq_len=32, max_chars=20_000))
model_config = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, attn_num_heads=2,
                           attn_layers=(1,), backend="torch")
cfg = TrainConfig(steps=24, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=8, eval_batches=1)


def run(run_dir):
    torch.manual_seed(0)
    model = build_model(model_config)
    return model, train(model, cfg, data, run_dir, resume="auto", progress=False)


reference_model, reference = run(base / "reference")
print(json.dumps({"loop_seconds": data.times[-1] - data.times[0]}), flush=True)
for trial in range(trials):
    run_dir = base / f"trial_{trial}"
    data.announce = True
    while True:
        try:
            model, result = run(run_dir)
            break
        except KeyboardInterrupt:
            pass
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    same_weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                           reference_model.state_dict().values()))
    print(json.dumps({"interrupted_at": saved, "same_history": result.history == reference.history,
                      "same_weights": same_weights}), flush=True)
"""


def test_ctrl_c_at_random_moments_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGINT to a training process at random moments of its loop (mid forward, backward, optimizer step,
    evaluation, save): every run finished with resume='auto' equals the uninterrupted one, weights and
    history alike."""
    trials, rng = 16, random.Random(0)
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_TRIALS, str(tmp_path), str(trials)],
                             stdout=subprocess.PIPE, text=True)
    try:
        loop_seconds = json.loads(child.stdout.readline())["loop_seconds"]
        reports = []
        for _ in range(trials):
            assert child.stdout.readline() == "loop\n"
            time.sleep(rng.uniform(0, loop_seconds))
            child.send_signal(signal.SIGINT)
            line = child.stdout.readline()
            while line.startswith("interrupted at step"):  # train's own report of the Ctrl-C
                line = child.stdout.readline()
            reports.append(json.loads(line))
    finally:
        child.kill()
        child.wait()
    assert all(r["same_history"] and r["same_weights"] for r in reports), reports
    assert sum(bool(r["interrupted_at"]) for r in reports) >= trials // 2, reports  # most landed mid-run


def test_a_fresh_run_over_an_existing_one_is_refused_unless_asked(data, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        train(fresh_model(), config(save_every=6), data, run_dir, progress=False)
    assert "resume='auto'" in one_line(err) and "overwrite=True" in one_line(err) and "another run_dir" in one_line(err)
    args = ["--steps", "3", "--run-dir", str(run_dir), "--set", "batch_size=4", "--set", "seq_len=32", "--no-progress"]
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and all(flag in stderr for flag in ("--resume auto", "--overwrite", "--run-dir"))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing touched
    with pytest.raises(ConfigError, match="pass one or the other"):
        train(fresh_model(), config(), data, run_dir, resume="auto", overwrite=True)

    again = train(fresh_model(), config(steps=4), data, run_dir, overwrite=True, progress=False)
    assert again.metrics["steps"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["best.pt", "final.pt"]  # old ones gone


def test_resume_auto_skips_damaged_checkpoints_and_an_explicit_one_is_named(data, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    final, step_6 = run_dir / "checkpoints" / "final.pt", run_dir / "checkpoints" / "step_6.pt"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # truncated
    step_12 = run_dir / "checkpoints" / "step_12.pt"
    step_12.write_bytes(step_12.read_bytes()[:1000])
    step_12.with_name("step_12.pt.json").unlink()  # as before sidecars existed: checked by loading
    corrupted = bytearray(step_6.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF  # one flipped byte: same size, another sha256
    step_6.write_bytes(bytes(corrupted))
    assert find_checkpoint(run_dir).name == "best.pt"  # final.pt and step_12.pt (also at step 12) are damaged
    skipped = capsys.readouterr().err.splitlines()
    assert len(skipped) == 2 and all(line.startswith("gdn_lab: skipping a damaged checkpoint:") for line in skipped)
    assert any("final.pt is truncated" in line for line in skipped)
    assert any("step_12.pt cannot be read" in line for line in skipped)
    for path, message in [(final, "is truncated"), (step_6, "is corrupted"), (step_12, "cannot be read")]:
        with pytest.raises(ConfigError, match=message) as err:
            train(fresh_model(), config(save_every=6), data, tmp_path / "other", resume=path, progress=False)
        assert str(path) in one_line(err)
    resumed = train(fresh_model(), config(save_every=6), data, run_dir, resume="auto", progress=False)
    assert resumed.history == reference.history  # from best.pt at step 12: nothing left to train, nothing lost


def test_a_save_that_fails_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    args = ["--steps", "4", "--run-dir", str(tmp_path), "--set", "batch_size=4", "--set", "seq_len=32",
            "--set", "eval_every=2", "--set", "eval_batches=1", "--no-progress"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}

    def full_disk(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert main(args + ["--extend-steps", "2"]) == 1  # its evaluation at step 6 saves best.pt
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "could not write" in stderr and "best.pt: No space left on device" in stderr
    assert "the previous file there is intact" in stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before  # no temp file left


def test_results_and_checkpoints_are_written_with_the_usual_file_mode(data, tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        train(fresh_model(), config(steps=4, eval_every=2), data, tmp_path, progress=False)
    finally:
        os.umask(umask)
    for path in [tmp_path / "metrics.json", tmp_path / "checkpoints" / "final.pt",
                 tmp_path / "checkpoints" / "final.pt.json"]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_checkpoints_from_before_the_sidecars_still_resume_in_step_order(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    for name in ("final.pt", "best.pt"):
        (run_dir / "checkpoints" / name).unlink()
    for sidecar in (run_dir / "checkpoints").glob("*.pt.json"):
        sidecar.unlink()
    assert find_checkpoint(run_dir).name == "step_12.pt"  # by the step inside, not by name (step_6 > step_12)
    (run_dir / "checkpoints" / "step_12.pt").write_bytes(b"not a zip")
    assert find_checkpoint(run_dir, quiet=True).name == "step_6.pt"


def test_a_checkpoint_saves_the_run_state_under_the_keys_old_runs_resume_from(reference):
    saved = torch.load(reference.run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert set(saved) == {"model", "optimizer", "scaler", "rng", "train_config", "model_config",  # the keys
                          "schedule", "step", "tokens", "stopped_early", "train_seconds", "best_val_loss", "history"}
    state = RunState.from_payload(saved)
    assert state.payload() == {key: saved[key] for key in state.payload()}
    assert state.step == state.total_steps == 12 and state.history == reference.history
    assert state.best_val_loss == reference.metrics["best_val_loss"] and not state.stopped_early


def test_prefetched_batches_train_the_same_run(data, reference, tmp_path, monkeypatch):
    """On a GPU train() builds the next batch in a thread; forced on here, the run is the same bitwise,
    and a Ctrl-C met while building a batch still stops at that step with its checkpoint."""
    import gdn_lab.train as train_module

    monkeypatch.setattr(train_module, "_prefetch_batches", lambda device: True)
    prefetched = train(fresh_model(), config(save_every=6), data, tmp_path / "a", progress=False)
    assert prefetched.history == reference.history
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), config(save_every=6), InterruptAt(data, 9), tmp_path / "b", progress=False)
    assert find_checkpoint(tmp_path / "b").name == "step_9.pt"
    assert train(fresh_model(), config(save_every=6), data, tmp_path / "b", resume="auto",
                 progress=False).history == reference.history
