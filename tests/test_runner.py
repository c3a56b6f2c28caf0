"""The notebook runner: failures reported compactly, bad parameters refused before anything runs.

One runner call (a real `python -m gdn_lab run` subprocess) executes two temp notebooks, one
failing and one passing; the other tests need no kernel.
"""
from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from gdn_lab import runner
from gdn_lab.__main__ import main
from gdn_lab.config import ConfigError

PARAMETERS = 'run_dir = "runs/manual/x"\ndevice = "auto"\ninteractive = True\nseed = 0\nsteps = 100'
FAILING_CELL = "def invert(x):\n    return 1 / x\n\n\ninvert(steps - 1)"
PASSING_CELL = ("from gdn_lab.results import write_metrics\n\n"
                "write_metrics(run_dir, {'steps': steps, 'loss': 2 / 3, 'interactive': interactive, 'table': [1, 2]})")


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory, make_notebook):
    folder = tmp_path_factory.mktemp("notebooks")
    make_notebook(folder / "00_fails.ipynb", PARAMETERS, FAILING_CELL)
    make_notebook(folder / "01_passes.ipynb", PARAMETERS, PASSING_CELL)
    (folder / "ci_params.yml").write_text("00_fails: {steps: 1}\n01_passes:\n  steps: 2\n")
    return folder


@pytest.fixture(scope="module")
def cli_run(notebooks, tmp_path_factory):
    """`python -m gdn_lab run` over both notebooks at smoke profile, as a user would type it."""
    run_dir = tmp_path_factory.mktemp("runs")
    done = subprocess.run([sys.executable, "-m", "gdn_lab", "run", "--notebooks-dir", str(notebooks),
                           "--run-dir", str(run_dir)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    return done, run_dir


def test_failing_cell_exits_nonzero_naming_notebook_and_error(cli_run):
    done, _ = cli_run
    assert done.returncode == 1, done.stdout + done.stderr
    report = done.stdout.split("FAILED ", 1)[1].split("\nnotebook ", 1)[0]
    assert report.startswith("00_fails: cell In [")
    assert "ZeroDivisionError: division by zero" in report.splitlines()[0]
    assert "return 1 / x" in report  # the traceback's last lines point into the failing function
    assert "00_fails.ipynb" in report.splitlines()[-1]  # where the executed copy lies
    assert len(report.splitlines()) <= 2 + runner.TRACEBACK_LINES + 1
    for noise in ('"output_type"', '"traceback"', "\x1b["):  # no notebook JSON, no terminal colours
        assert noise not in done.stdout + done.stderr


def test_other_notebooks_still_run_and_are_summarised(cli_run):
    done, run_dir = cli_run
    metrics = json.loads((run_dir / "01_passes" / "metrics.json").read_text())
    assert metrics == {"steps": 2, "loss": pytest.approx(2 / 3), "interactive": False, "table": [1, 2]}
    assert (run_dir / "01_passes" / "01_passes.ipynb").is_file()
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if re.match(r"0[01]_\w+ +(ok|failed) ", line)}
    assert rows["01_passes"][1] == "ok" and float(rows["01_passes"][2]) > 0
    assert rows["01_passes"][3:] == ["loss=0.6667"]  # the result; not the settings, not the list
    assert rows["00_fails"][1] == "failed" and "ZeroDivisionError" in " ".join(rows["00_fails"])
    assert "notebooks: 1 ok, 1 failed" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(nb["stem"], nb["status"]) for nb in summary["notebooks"]] == [("00_fails", "failed"), ("01_passes", "ok")]


def test_unknown_parameter_is_a_one_line_error_before_any_run(notebooks, tmp_path, capsys):
    params_file = tmp_path / "ci_params.yml"
    params_file.write_text("00_fails: {}\n01_passes: {stepz: 2}\n")
    code = main(["run", "--notebooks-dir", str(notebooks), "--params-file", str(params_file),
                 "--run-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "'stepz' is not a parameter of 01_passes" in err and "ci_params.yml" in err
    assert not (tmp_path / "runs").exists()


def test_param_override_must_exist_in_every_chosen_notebook(notebooks, tmp_path, capsys):
    code = main(["run", "0", "--notebooks-dir", str(notebooks), "--param", "lr=0.1", "--run-dir", str(tmp_path)])
    assert code == 2
    assert "--param: 'lr' is not a parameter of 00_fails" in capsys.readouterr().err


def test_profiles_set_exactly_their_parameters(notebooks, tmp_path):
    notebook = notebooks / "01_passes.ipynb"
    smoke = runner.notebook_parameters(notebook, "smoke", tmp_path, {"01_passes": {"steps": 2}}, {"seed": 3})
    full = runner.notebook_parameters(notebook, "full", tmp_path, {}, {})
    assert smoke == {"steps": 2, "seed": 3, "run_dir": str(tmp_path.resolve()), "interactive": False}
    assert full == {"run_dir": str(tmp_path.resolve()), "interactive": False}
    with pytest.raises(ConfigError, match="01_passes has no entry in ci_params.yml"):
        runner.notebook_parameters(notebook, "smoke", tmp_path, {}, {})


def test_notebooks_are_chosen_by_stem_number_or_path(notebooks):
    both = [notebooks / "00_fails.ipynb", notebooks / "01_passes.ipynb"]
    assert runner.find_notebooks([], notebooks) == both
    assert runner.find_notebooks(["1", "00_fails"], notebooks) == both[::-1]
    assert runner.find_notebooks([str(both[1])], notebooks) == both[1:]
    with pytest.raises(ConfigError, match="no single notebook named '7'"):
        runner.find_notebooks(["7"], notebooks)


def test_param_values_are_python_literals_or_bare_strings():
    assert runner.parse_param("steps=400") == ("steps", 400)
    assert runner.parse_param("lr=3e-4") == ("lr", 3e-4)
    assert runner.parse_param("attn_layers=[5, 11]") == ("attn_layers", [5, 11])
    assert runner.parse_param("device=cuda") == ("device", "cuda")
    assert runner.parse_param("name='a=b'") == ("name", "a=b")
    with pytest.raises(ConfigError, match="name=value"):
        runner.parse_param("steps")


def test_cli_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "gdn_lab", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert all(command in done.stdout for command in ("run", "presets", "train"))


def test_key_metrics_are_headline_results_not_settings():
    notebook_03 = {"device": "cpu", "backend": "torch", "vocab_size": 256, "steps": 40, "initial_train_loss": 5.6,
                   "final_val_loss": 2.5, "final_val_acc": 0.31, "final_val_ppl": 12.2,
                   "extended_final_val_loss": 2.4, "final_val_loss_by_model": {"gdn": 2.5}}
    assert runner.key_metrics(notebook_03) == "final_val_loss=2.5 final_val_acc=0.31 extended_final_val_loss=2.4"
    notebook_04 = {"device": "cuda", "source": "trained", "runs": 21, "final_val_loss": {"gdn": 4.4, "sparse": 4.06}}
    assert runner.key_metrics(notebook_04) == "final_val_loss[gdn]=4.4 final_val_loss[sparse]=4.06"
    nested = {"mqar_chance": 0.03, "mqar_accuracy": {"GDN slow decay": {"16": 1.0}}, "copy_exact_match": {"GDN": 0.5}}
    assert runner.key_metrics(nested) == "mqar_accuracy[GDN_slow_decay][16]=1 copy_exact_match[GDN]=0.5"
    named = {"device": "cpu", "final_val_loss": 2.0, "speedup": 3.0, "headline": ["speedup"]}
    assert runner.key_metrics(named) == "speedup=3"  # a notebook may name its headline results
    assert runner.key_metrics({"device": "cpu", "trials": 4, "seconds": 2.5}) == "trials=4 seconds=2.5"


def test_runner_owned_and_mistyped_parameters_are_one_line_errors(notebooks, tmp_path, capsys):
    cases = [("interactive=True", "the runner sets interactive itself"),
             ("run_dir='elsewhere'", "the runner sets run_dir itself"),
             ("steps=2.5", "--param steps=2.5: TrainConfig.steps takes an integer"),
             ("steps=abc", "--param steps='abc': TrainConfig.steps takes an integer"),
             ("seed=[1]", "TrainConfig.seed takes an integer"),
             ("device=3", "TrainConfig.device takes a string")]
    for param, message in cases:
        code = main(["run", "--notebooks-dir", str(notebooks), "--param", param, "--run-dir", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (param, err)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match=r"num_seeds=2.5: num_seeds of nb takes an integer \(its default is 2\)"):
        runner.check_param_value("nb", "num_seeds", 2.5, {"default": "2", "help": ""})
    with pytest.raises(ConfigError, match="models of nb takes a list"):
        runner.check_param_value("nb", "models", "GDN", {"default": '["GDN"]', "help": ""})
    declared = {"default": "0.5", "help": "a rate; None: off"}
    runner.check_param_value("nb", "rate", 1, declared)  # a float takes an int
    runner.check_param_value("nb", "rate", None, declared)  # the comment allows None
    runner.check_param_value("nb", "cap", 3, {"default": "None", "help": ""})  # anything where the default is None


def test_a_config_error_inside_a_notebook_is_one_line():
    from papermill.exceptions import PapermillExecutionError

    error = PapermillExecutionError(3, 5, "ModelConfig(num_heads=num_heads)", "ConfigError",
                                    "num_heads must be positive, got 0", ["Traceback", "ConfigError: ..."])
    report = runner.describe_failure("01_layer_internals", error, runner.pathlib.Path("x.ipynb"))
    assert report.count("\n") == 0
    assert report.startswith("01_layer_internals: ConfigError: num_heads must be positive, got 0 (cell In [5]")


def _running_a_cell(path: pathlib.Path, holding: str = "time.sleep") -> bool:
    """Whether papermill's output notebook at `path` marks the cell whose source holds `holding` as running
    (its kernel is executing it): a Ctrl-C sent earlier, while the kernel still starts, tests another path."""
    try:
        cells = json.loads(path.read_text())["cells"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or half written
        return False
    return any(cell.get("metadata", {}).get("papermill", {}).get("status") == "running"
               and holding in "".join(cell.get("source", "")) for cell in cells)


def test_ctrl_c_stops_the_run_and_summarises_what_finished(tmp_path, make_notebook):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    make_notebook(folder / "00_quick.ipynb", PARAMETERS, PASSING_CELL)
    make_notebook(folder / "01_sleeps.ipynb", PARAMETERS, "import time\n\ntime.sleep(120)")
    make_notebook(folder / "02_never.ipynb", PARAMETERS, PASSING_CELL)
    run_dir = tmp_path / "runs"
    child = subprocess.Popen([sys.executable, "-m", "gdn_lab", "run", "--profile", "full", "--notebooks-dir",
                              str(folder), "--run-dir", str(run_dir)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             # a suite started in the background (`nohup ... &`) ignores SIGINT, and so would the
                             # child: Python then never turns Ctrl-C into KeyboardInterrupt
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        started = time.monotonic()
        while not _running_a_cell(run_dir / "01_sleeps" / "01_sleeps.ipynb") and time.monotonic() - started < 120:
            time.sleep(0.1)
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert "interrupted (Ctrl-C) in 01_sleeps; 1 finished" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert [(nb["stem"], nb["status"]) for nb in summary["notebooks"]] == [("00_quick", "ok"),
                                                                           ("01_sleeps", "interrupted")]
