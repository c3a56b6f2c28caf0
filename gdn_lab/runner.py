"""The notebook runner: execute the numbered notebooks headlessly with papermill.

    python -m gdn_lab run                      # every notebooks/NN_*.ipynb, smoke profile
    python -m gdn_lab run 03 05 --profile full --run-dir runs/gpu-1
    python -m gdn_lab run 02_toy_tasks --param steps=400 --param device=cpu

Profiles (what each notebook's `parameters` cell receives):
  smoke  notebooks/ci_params.yml[stem] (tiny CPU sizes) + run_dir + interactive=False
  full   run_dir + interactive=False; every other parameter keeps the notebook's own default
`--param key=value` overrides either (the value is a Python literal; a bare word is a string).
Every parameter is checked against the notebook's `parameters` cell before anything runs:
its name must be declared there (papermill itself only warns), and its value must have the
type of the default there (an int takes no 2.5, a float takes an int; None where the default
is None or the parameter's comment mentions None); a name that is a ModelConfig or TrainConfig
field is checked against that field's annotation. run_dir and interactive belong to the runner.

A notebook that stops on a ConfigError (or another error whose message already says what to
change: `ONE_LINE_ERRORS`) is reported in one line. Ctrl-C stops the run after saying which
notebook it interrupted; summary.json then lists the notebooks that finished (`interrupted`).
The key-metrics column shows each notebook's headline results (`key_metrics`).

Layout of a run directory:
  <run_dir>/<stem>/<stem>.ipynb   the executed copy (saved after every cell)
  <run_dir>/<stem>/metrics.json   written by the notebook's last cell (`results.write_metrics`)
  <run_dir>/summary.json          status, seconds, error and metrics of every notebook

Each kernel runs in the notebook's own folder (as Jupyter does when you open the file) and
imports the same gdn_lab as the runner. A failing notebook does not stop the others; the
run then ends with a non-zero exit status.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import os
import pathlib
import re
import sys
import time
from collections.abc import Iterator, Sequence

import papermill
import yaml
from papermill.exceptions import PapermillExecutionError
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig, TrainConfig, check_field, parse_literal
from .results import load_json, write_json

PROFILES = ("smoke", "full")
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
KERNEL = "python3"
# The kernel's own log (TCP notices, the interrupt after a failed cell); errors reach us through the cells.
KERNEL_LOG_LEVEL = "CRITICAL"
REQUIRED_PARAMETERS = ("run_dir", "interactive")
TRACEBACK_LINES = 8
KEY_METRICS = 3
# errors raised with a message that says what to change: reported without a traceback
ONE_LINE_ERRORS = ("ConfigError", "BackendError", "DistributedLaunchError", "TrainingDiverged", "WriteError")
# metric names that are results (shown first in the summary), and names of settings (never shown)
HEADLINE_WORDS = ("loss", "acc", "exact", "ratio", "speedup", "speed_up")
SETTING_WORDS = ("device", "backend", "vocab", "chance", "seed", "dtype", "interactive")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PACKAGE_PARENT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class NotebookRun:
    """The outcome of one notebook: status is 'ok', 'failed' or 'interrupted' (Ctrl-C); `error` is the
    compact report."""

    stem: str
    status: str
    seconds: float
    executed: pathlib.Path
    metrics: dict | None = None
    error: str | None = None


def default_notebooks_dir() -> pathlib.Path:
    """`notebooks/` beside the gdn_lab package (a git checkout), else `./notebooks`."""
    beside_package = _PACKAGE_PARENT / "notebooks"
    return beside_package if beside_package.is_dir() else pathlib.Path("notebooks")


def default_run_dir(profile: str) -> pathlib.Path:
    """`runs/<YYYYmmdd-HHMMSS>-<profile>` under the current directory."""
    return pathlib.Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{profile}"


def find_notebooks(names: Sequence[str], notebooks_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The notebooks to run, in order: all numbered ones when `names` is empty.

    A name is a path to an .ipynb file, a stem (`02_toy_tasks`) or a number prefix (`2`, `02`).
    """
    notebooks_dir = pathlib.Path(notebooks_dir)
    numbered = sorted(notebooks_dir.glob(NOTEBOOK_GLOB))
    if not names:
        if not numbered:
            raise ConfigError(f"no notebooks matching {NOTEBOOK_GLOB} in {notebooks_dir}; pass --notebooks-dir")
        return numbered
    chosen = []
    for name in names:
        as_path = pathlib.Path(name)
        if as_path.suffix == ".ipynb" and as_path.is_file():
            chosen.append(as_path)
            continue
        matches = [nb for nb in numbered if nb.stem == name.removesuffix(".ipynb")]
        if not matches and name.isdigit():
            matches = [nb for nb in numbered if int(nb.stem[:2]) == int(name)]
        if len(matches) != 1:
            raise ConfigError(f"no single notebook named {name!r} in {notebooks_dir}; "
                              f"choose from {[nb.stem for nb in numbered]}")
        chosen.append(matches[0])
    return chosen


def load_smoke_params(path: str | os.PathLike) -> dict[str, dict]:
    """`ci_params.yml`: {notebook stem: {parameter: value}}."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; the smoke profile reads each notebook's tiny parameters from it")
    table = yaml.safe_load(path.read_text()) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path} must map notebook stems to {{parameter: value}} mappings")
    bad = [stem for stem, params in table.items() if not isinstance(params, dict | None)]
    if bad:
        raise ConfigError(f"{path}: the entries for {bad} must be {{parameter: value}} mappings")
    return {stem: dict(params or {}) for stem, params in table.items()}


def parse_param(text: str) -> tuple[str, object]:
    """'steps=400' -> ('steps', 400); 'device=cuda' -> ('device', 'cuda') (bare words are strings)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise ConfigError(f"--param {text!r}: write it as name=value, e.g. --param steps=400")
    return name, parse_literal(value)


_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string", list: "a list",
          tuple: "a list", dict: "a mapping"}


def check_param_value(stem: str, name: str, value: object, declared: dict) -> None:
    """ConfigError (one line) when a --param value does not fit the parameter `declared` by
    `papermill.inspect_notebook`: a ModelConfig/TrainConfig field name is checked against the
    field's annotation, any other name against the type of its default in the notebook."""
    for config in (ModelConfig, TrainConfig):
        if name in {item.name for item in dataclasses.fields(config)}:
            try:
                check_field(config, name, value)
            except ConfigError as err:
                raise ConfigError(f"--param {err}") from None
            return
    try:
        default = ast.literal_eval(declared["default"])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return  # an expression: nothing to compare with
    if default is None or (value is None and "None" in (declared.get("help") or "")):
        return
    if isinstance(default, bool):
        fits = isinstance(value, bool)
    elif isinstance(default, int):
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        fits = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        fits = isinstance(value, (list, tuple) if isinstance(default, list | tuple) else type(default))
    if not fits:
        kind = _KINDS.get(type(default), type(default).__name__)
        raise ConfigError(f"--param {name}={value!r}: {name} of {stem} takes {kind} (its default is "
                          f"{declared['default']})")


def notebook_parameters(notebook: pathlib.Path, profile: str, run_dir: pathlib.Path,
                        smoke_params: dict[str, dict], overrides: dict) -> dict:
    """The parameters one notebook receives, checked against its `parameters` cell.

    Raises ConfigError (one line, naming the parameter and the notebook) for a name the
    notebook does not declare, for run_dir or interactive (the runner sets them), for a --param
    value of the wrong type (`check_param_value`), and for a smoke run of a notebook without a
    ci_params.yml entry.
    """
    if profile not in PROFILES:
        raise ConfigError(f"profile {profile!r}; use one of {PROFILES}")
    declared = papermill.inspect_notebook(str(notebook))
    missing = [name for name in REQUIRED_PARAMETERS if name not in declared]
    if missing:
        raise ConfigError(f"{notebook.name}: its cell tagged 'parameters' must define {missing} "
                          f"(the notebook contract in docs/api.md)")
    sources = {}
    if profile == "smoke":
        if notebook.stem not in smoke_params:
            raise ConfigError(f"{notebook.stem} has no entry in ci_params.yml; add its tiny CPU parameters "
                              f"({notebook.stem}: {{}} when its defaults are already small)")
        sources["ci_params.yml"] = smoke_params[notebook.stem]
    sources["--param"] = overrides
    params = {}
    for source, values in sources.items():
        for name, value in values.items():
            if name not in declared:
                raise ConfigError(f"{source}: {name!r} is not a parameter of {notebook.stem} "
                                  f"(it has: {', '.join(declared)})")
            if name in REQUIRED_PARAMETERS:
                raise ConfigError(f"{source}: the runner sets {name} itself (run_dir: RUN_DIR/<notebook>, chosen "
                                  f"with --run-dir; interactive: False); drop {name}")
            if source == "--param":
                check_param_value(notebook.stem, name, value, declared[name])
            params[name] = value
    params["run_dir"] = str(run_dir.resolve())
    params["interactive"] = False
    return params


@contextlib.contextmanager
def _kernel_imports_this_gdn_lab() -> Iterator[None]:
    """Put this gdn_lab's parent folder first on the kernel's PYTHONPATH, also when it is not installed."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_PARENT), before]))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def _clean(text: str, limit: int = 240) -> str:
    text = _ANSI.sub("", text).rstrip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_failure(stem: str, error: BaseException, executed: pathlib.Path) -> str:
    """A few lines a person can read: the notebook, the cell, `ename: evalue`, the traceback's end;
    one line for the `ONE_LINE_ERRORS`, whose message already says what to change."""
    if isinstance(error, PapermillExecutionError) and error.ename in ONE_LINE_ERRORS:
        return (f"{stem}: {error.ename}: {_clean(error.evalue)} (cell In [{error.exec_count}]; "
                f"executed copy: {executed})")
    if isinstance(error, PapermillExecutionError):
        source = next((line for line in error.source.splitlines() if line.strip()), "")
        lines = [f"{stem}: cell In [{error.exec_count}] raised {error.ename}: {_clean(error.evalue)}",
                 f"    cell starts: {_clean(source, 100)}"]
        traceback = _ANSI.sub("", "\n".join(error.traceback)).splitlines()
        traceback = [line for line in traceback if line.strip() and not set(line.strip()) <= {"-"}]
        if traceback and traceback[-1].startswith(f"{error.ename}:"):
            traceback.pop()
        lines += [f"    | {_clean(line)}" for line in traceback[-TRACEBACK_LINES:]]
    else:
        message = str(error).strip().splitlines()
        lines = [f"{stem}: {type(error).__name__}: {_clean(message[0] if message else '')}"]
    lines.append(f"    executed copy: {executed}")
    return "\n".join(lines)


def run_notebook(notebook: pathlib.Path, params: dict, progress: bool = False) -> NotebookRun:
    """Execute one notebook into `params['run_dir']`; never raises for an error inside the notebook.
    Ctrl-C (here or reaching the kernel) raises KeyboardInterrupt."""
    out_dir = pathlib.Path(params["run_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / notebook.name
    metrics_path = out_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)
    start = time.perf_counter()
    error = None
    try:
        with _kernel_imports_this_gdn_lab():
            papermill.execute_notebook(
                str(notebook), str(executed), parameters=params, kernel_name=KERNEL,
                cwd=str(notebook.resolve().parent), start_timeout=180, log_output=False,
                extra_arguments=[f"--IPKernelApp.log_level={KERNEL_LOG_LEVEL}"],
                progress_bar={"desc": notebook.stem, "leave": False, "position": 1} if progress else False,
            )
    except PapermillExecutionError as err:
        if err.ename == "KeyboardInterrupt":
            raise KeyboardInterrupt from None
        error = describe_failure(notebook.stem, err, executed)
    except Exception as err:  # a cell error, a dead kernel, a timeout: report it, run the next notebook
        error = describe_failure(notebook.stem, err, executed)
    seconds = time.perf_counter() - start
    metrics = load_json(metrics_path) if metrics_path.is_file() else None
    if error is None and metrics is None:
        error = (f"{notebook.stem}: ran, but wrote no metrics.json; its last cell must call "
                 f"gdn_lab.results.write_metrics(run_dir, {{...}})\n    executed copy: {executed}")
    return NotebookRun(notebook.stem, "failed" if error else "ok", seconds, executed, metrics, error)


def run_notebooks(notebooks: Sequence[pathlib.Path], profile: str = "smoke",
                  run_dir: str | os.PathLike | None = None, overrides: dict | None = None,
                  params_file: str | os.PathLike | None = None, progress: bool = True) -> list[NotebookRun]:
    """Check every notebook's parameters, then execute them one after another.

    Writes `<run_dir>/<stem>/` per notebook and `<run_dir>/summary.json`. Raises ConfigError
    before running anything when a parameter is unknown; failures inside notebooks are returned.
    Ctrl-C ends the run: the interrupted notebook is returned with status 'interrupted', and
    summary.json (`"interrupted": true`) lists it after those that finished.
    """
    run_dir = pathlib.Path(run_dir or default_run_dir(profile))
    smoke_params = {}
    if profile == "smoke":
        params_file = params_file or pathlib.Path(notebooks[0]).parent / "ci_params.yml"
        smoke_params = load_smoke_params(params_file)
    plans = [(nb, notebook_parameters(nb, profile, run_dir / nb.stem, smoke_params, overrides or {}))
             for nb in notebooks]
    runs = []
    bar = tqdm(plans, desc="notebooks", unit="nb", file=sys.stderr, disable=not progress)
    for notebook, params in bar:
        bar.set_postfix_str(notebook.stem)
        start = time.perf_counter()
        try:
            run = run_notebook(notebook, params, progress=progress and sys.stderr.isatty())
        except KeyboardInterrupt:
            runs.append(NotebookRun(notebook.stem, "interrupted", time.perf_counter() - start,
                                    pathlib.Path(params["run_dir"]) / notebook.name,
                                    error=f"{notebook.stem}: interrupted (Ctrl-C); the notebooks after it did not run"))
            break
        if run.error:
            bar.write(f"FAILED {run.error}", file=sys.stdout)
        runs.append(run)
    bar.close()
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = [{**dataclasses.asdict(run), "executed": str(run.executed)} for run in runs]
    write_json(run_dir / "summary.json", {"profile": profile, "interrupted": runs[-1].status == "interrupted",
                                          "notebooks": summary})
    return runs


def _scalars(metrics: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(label, value) for every scalar in a metrics dict, nested dicts as name[key][key]."""
    for name, value in metrics.items():
        label = f"{prefix}[{str(name).replace(' ', '_')}]" if prefix else str(name)
        if isinstance(value, dict):
            yield from _scalars(value, label)
        elif isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 24):
            yield label, value


def key_metrics(metrics: dict | None, count: int = KEY_METRICS) -> str:
    """A notebook's headline results, 'name=value' joined by spaces: the labels its metrics list
    under "headline" if it has that key; else numeric results whose names contain one of
    `HEADLINE_WORDS` (final ones first), nested dicts shown as name[key]; else the first scalars.
    Settings (`SETTING_WORDS`: device, backend, vocab size, chance level ...) are never shown."""
    scalars = dict(_scalars(metrics or {}))
    if isinstance((metrics or {}).get("headline"), list):
        chosen = [label for label in metrics["headline"] if label in scalars]
    else:
        results = [label for label, value in scalars.items()
                   if not isinstance(value, bool | str) and any(word in label.lower() for word in HEADLINE_WORDS)
                   and not any(word in label.lower() for word in SETTING_WORDS)]
        others = [label for label in scalars if not any(word in label.lower() for word in SETTING_WORDS)]
        chosen = sorted(results, key=lambda label: "final" not in label) or others
    shown = []
    for label in chosen[:count]:
        value = scalars[label]
        shown.append(f"{label}={value:.4g}" if isinstance(value, float) else f"{label}={value}")
    return " ".join(shown)


def summary_table(runs: Sequence[NotebookRun]) -> str:
    """notebook | status | seconds | key metrics, one row per notebook."""
    width = max([len("notebook"), *(len(run.stem) for run in runs)])
    status_width = max([len("status"), *(len(run.status) for run in runs)])
    rows = [f"{'notebook':<{width}}  {'status':<{status_width}}  {'seconds':>7}  key metrics"]
    for run in runs:
        detail = key_metrics(run.metrics) if run.status == "ok" else (run.error or "").splitlines()[0]
        rows.append(f"{run.stem:<{width}}  {run.status:<{status_width}}  {run.seconds:7.1f}  {_clean(detail, 100)}")
    return "\n".join(rows)


def run_command(names: Sequence[str], profile: str, run_dir: str | None, params: Sequence[str],
                notebooks_dir: str | None, params_file: str | None) -> int:
    """The `run` subcommand: 0 when every notebook passed, 1 when one failed, 2 on a usage error."""
    try:
        notebooks = find_notebooks(names, notebooks_dir or default_notebooks_dir())
        overrides = dict(parse_param(text) for text in params)
        run_path = pathlib.Path(run_dir) if run_dir else default_run_dir(profile)
        runs = run_notebooks(notebooks, profile, run_path, overrides, params_file)
    except ConfigError as err:
        print(f"gdn-lab run: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any notebook started: nothing to summarise
        print("gdn-lab run: interrupted (Ctrl-C) before any notebook ran", file=sys.stderr)
        return 130
    print(summary_table(runs))
    if runs[-1].status == "interrupted":
        print(f"notebooks: interrupted (Ctrl-C) in {runs[-1].stem}; {len(runs) - 1} finished, summary in "
              f"{run_path / 'summary.json'}")
        return 130
    failed = sum(run.status != "ok" for run in runs)
    print(f"notebooks: {len(runs) - failed} ok, {failed} failed ({profile} profile); results in {run_path}")
    return 1 if failed else 0
