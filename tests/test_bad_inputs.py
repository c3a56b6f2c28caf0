"""Careless input, everywhere a user can type it: the API, `gdn-lab train` and `gdn-lab run`.

Every wrong value gets one line that says what to change, a non-zero exit, no traceback, and leaves
the disk as it was. Wrong values are drawn with a seeded generator (hypothesis is not a dependency):
for every ModelConfig and TrainConfig field, values of the wrong type and values out of its range.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import subprocess
import sys
import types
import typing

import pytest
import torch
from conftest import REPO_ROOT

from gdn_lab import train as train_module
from gdn_lab.__main__ import main as gdn_lab_main
from gdn_lab.config import ConfigError, ModelConfig, TrainConfig
from gdn_lab.env import BackendError, pick_device

SEED, DRAWS = 20, 3  # DRAWS wrong-type values per field, plus its out-of-range values

# values outside each field's range (the ranges ModelConfig and TrainConfig document)
OUT_OF_RANGE = {
    **{name: [0, -1, "negative"] for name in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "attn_num_heads", "hidden_ratio",
        "max_position_embeddings", "steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every",
        "attn_num_kv_heads", "intermediate_size")},
    **{name: [-1, "negative"] for name in ("eval_every", "save_every", "seed", "warmup_steps")},
    **{name: [0.0, -1.0, "negative"] for name in ("expand_v", "rope_theta", "norm_eps", "lr", "dt_min", "dt_max")},
    **{name: [-0.5, "negative"] for name in ("initializer_range", "grad_clip", "weight_decay")},
    "conv_size": [1, 0, -4], "attn_conv_size": [1, -1, "negative"], "min_lr_ratio": [-0.1, 1.5],
    "beta1": [1.0, -0.1, 2.0], "beta2": [1.0, -0.5], "stop_at_val_acc": [0.0, -0.5, 1.5],
    "attn_layers": [(9,), (-1,), (1, 1), "sparsest", "3/7"], "swa_layers": [(9,), (-1,), (1,), "sparsest"],
    "swa_window": [0, "negative"], "fixed_beta": [0.0, -0.5, 3.0], "backend": ["cuda", "FLA", ""],
    "dtype": ["fp8", "float64", ""],
    # no range of their own: their values are checked where they are used (device: pick_device)
    "use_gate": [], "use_short_conv": [], "allow_neg_eigval": [], "use_decay": [], "tie_embeddings": [],
    "recompute_gdn": ["all", "yes"],
    "device": [], "cuda_graph": [],
}
# ModelConfig with both mixers, so every check applies
BASE = {ModelConfig: ModelConfig(attn_layers=(1,), backend="torch"), TrainConfig: TrainConfig()}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8)))


def wrong_types(hint, rng: random.Random) -> list:
    """Values that do not fit the annotation `hint`, drawn from a pool of the other kinds."""
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    pool = []
    if int not in arms and float not in arms:
        pool += [rng.randint(-5, 5), rng.uniform(-10, 10)]
    if int in arms and float not in arms:
        pool += [rng.randint(1, 50) + rng.choice([0.5, 0.25]), float("nan"), True]
    if float in arms:
        pool += [float("nan"), rng.choice([math.inf, -math.inf]), False]
    if str not in arms:
        pool += [_word(rng), str(rng.randint(1, 9))]
    if bool in arms:
        pool += [rng.randint(0, 1), "True"]
    if type(None) not in arms:
        pool.append(None)
    if not any(typing.get_origin(arm) is tuple for arm in arms):
        pool += [[rng.randint(0, 3)], {"value": 1}]
    else:
        pool += [[rng.uniform(0.1, 0.9)], [_word(rng)]]
    return rng.sample(pool, min(DRAWS, len(pool)))


def bad_values(cls: type) -> list[tuple[str, object]]:
    """(field, value) for every field of `cls`: DRAWS wrong types and its out-of-range values."""
    rng = random.Random(f"{SEED}-{cls.__name__}")
    hints = typing.get_type_hints(cls)
    cases = []
    for field in dataclasses.fields(cls):
        for value in OUT_OF_RANGE.get(field.name, []):
            cases.append((field.name, -rng.randint(2, 10**6) if value == "negative" else value))
        cases += [(field.name, value) for value in wrong_types(hints[field.name], rng)]
    return cases


MODEL_CASES, TRAIN_CASES = bad_values(ModelConfig), bad_values(TrainConfig)


def test_every_field_is_covered():
    for cls, cases in ((ModelConfig, MODEL_CASES), (TrainConfig, TRAIN_CASES)):
        fields = {field.name for field in dataclasses.fields(cls)}
        assert {name for name, _ in cases} == fields
        assert fields <= set(OUT_OF_RANGE), f"give {sorted(fields - set(OUT_OF_RANGE))} out-of-range values here"
    assert len(MODEL_CASES) + len(TRAIN_CASES) > 150


def _one_line(err: pytest.ExceptionInfo, name: str) -> str:
    message = str(err.value)
    assert message and "\n" not in message and (name in message or "pattern" in message), message
    return message


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_api_wrong_values_are_one_line_config_errors(cls):
    for name, value in MODEL_CASES if cls is ModelConfig else TRAIN_CASES:
        with pytest.raises(ConfigError) as err:
            BASE[cls].replace(**{name: value})
        _one_line(err, name)


def test_cli_set_wrong_values_are_one_line_and_write_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for name, value in MODEL_CASES + TRAIN_CASES:
        if name == "vocab_size":  # set by the tokenizer after the check, as documented
            continue
        text = repr(value)
        code = train_module.main(["--preset", "tiny", "--run-dir", str(run_dir), "--no-progress",
                                  "--set", "attn_layers=(1,)", "--set", f"{name}={text}"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("gdn_lab train: "), (name, text, err)
        assert not run_dir.exists(), (name, text)


def test_cli_argument_mistakes_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for args, message in [(["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
                          (["--extend-steps", "1.5"], "argument --extend-steps: invalid int value"),
                          (["--colour", "blue"], "unrecognized arguments: --colour blue"),
                          (["--attn-layers", "5,x"], "--attn-layers 5,x: write indices as 5,11"),
                          (["--preset", "huge"], "unknown preset 'huge'"),
                          (["--extend-steps", "-2"], "extend_steps must be >= 0")]:
        try:
            code = train_module.main(["--run-dir", str(run_dir), "--no-progress", *args])
        except SystemExit as exit_:  # argparse's own errors, made one line by OneLineParser
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert not run_dir.exists()


def test_runner_param_wrong_types_are_one_line_before_anything_runs(tmp_path, make_notebook, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    fields = ("num_heads", "lr", "steps", "use_gate", "stop_at_val_acc", "attn_layers", "seed", "device")
    make_notebook(folder / "00_configs.ipynb", "run_dir = 'x'\ninteractive = True\n" + "\n".join(
        f"{name} = {getattr(BASE[cls], name)!r}" for cls in BASE for name in fields
        if name in {f.name for f in dataclasses.fields(cls)}), "raise AssertionError('never runs')")
    rng, hints = random.Random(SEED), {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(TrainConfig)}
    for name in fields:
        for value in wrong_types(hints[name], rng):
            code = gdn_lab_main(["run", "--profile", "full", "--notebooks-dir", str(folder),
                                 "--run-dir", str(tmp_path / "runs"), "--param", f"{name}={value!r}"])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and f"--param {name}=" in err, (name, value, err)
    assert not (tmp_path / "runs").exists()


def test_device_strings_are_checked_where_they_are_used():
    for device in ("gpu", "cuda:x", ""):
        with pytest.raises(BackendError, match="names no device"):
            pick_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="use device='cpu' or 'auto'") as err:
            pick_device("cuda")
        assert "\n" not in str(err.value)


def _snapshot(folder) -> dict:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_command_line_mistakes_in_subprocesses(tmp_path):
    """As a user types them (the issue's examples among them): status 2, one line on stderr, no
    traceback, the run directory untouched. The processes run side by side."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_5.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    before = _snapshot(tmp_path)
    train_cli = [sys.executable, "-m", "gdn_lab", "train", "--run-dir", str(run_dir), "--no-progress"]
    commands = {
        "lr=abc": train_cli + ["--set", "lr=abc"],
        "num_heads=2.5": train_cli + ["--set", "num_heads=2.5"],
        "corrupt resume": train_cli + ["--resume", str(run_dir / "checkpoints" / "step_5.pt")],
        "overwrite": train_cli,
        "runner num_heads": [sys.executable, "-m", "gdn_lab", "run", "01", "--param", "num_heads=2.5",
                             "--run-dir", str(tmp_path / "runs")],
    }
    if not torch.cuda.is_available():
        commands["device=cuda"] = train_cli + ["--set", "device=cuda"]
    processes = {name: subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
                 for name, command in commands.items()}
    errors = {}
    for name, process in processes.items():
        out, errors[name] = process.communicate(timeout=120)
        assert process.returncode == 2, (name, out, errors[name])
        assert errors[name].count("\n") == 1 and "Traceback" not in out + errors[name], (name, errors[name])
    assert "step_5.pt cannot be read as a checkpoint" in errors["corrupt resume"]
    assert "--resume auto" in errors["overwrite"] and "--param num_heads=2.5" in errors["runner num_heads"]
    assert _snapshot(tmp_path) == before
