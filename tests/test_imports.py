"""Import floors: the task generators and the long-context probes load no model or training code,
and gdn_lab's modules import each other in one direction only (no cycles, lazy imports included)."""
import ast
import pathlib
import subprocess
import sys

import pytest

import gdn_lab

PACKAGE = pathlib.Path(gdn_lab.__file__).parent

# DESIGN.md's module list as layers, lowest first: a module may import only modules before it. Where
# DESIGN.md lists no order it is made explicit here: `recall` runs models on `tasks`' data; `viz` draws
# the records of `longctx` and `scaling`; `train` saves its curves through `viz`, and the experiment
# modules (grid, sweep, protocol) and the command line sit on top of the one training loop.
LAYERS = ["config", "ops", "stacked", "stats", "memory", "env", "results", "data", "tasks", "layers", "models",
          "generate", "probe", "recall", "longctx", "scaling", "ablations", "viz", "widgets", "cuda_graph", "train",
          "grid", "sweep", "protocol", "runner", "__main__"]

# what importing a module may not load (checked in a fresh interpreter)
FLOORS = {
    "gdn_lab.tasks": ["layers", "models", "probe", "generate", "recall", "train"],
    "gdn_lab.longctx": ["layers", "models", "probe", "generate", "recall", "train"],
    "gdn_lab.viz": ["train", "grid", "sweep"],
}


def imported_modules(path: pathlib.Path) -> set[str]:
    """The gdn_lab modules that `path` imports anywhere in its source (function-level imports too)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gdn_lab."):
            names = [node.module.removeprefix("gdn_lab.")]
        elif isinstance(node, ast.Import):
            names = [alias.name.removeprefix("gdn_lab.") for alias in node.names if alias.name.startswith("gdn_lab.")]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & modules  # `from . import __version__`: not a module
    return found


def test_every_module_imports_only_modules_below_it():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(LAYERS) == modules, "a new module needs its place in LAYERS (tests/test_imports.py)"
    upward = [f"{module} imports {target}"
              for module in LAYERS for target in sorted(imported_modules(PACKAGE / f"{module}.py"))
              if LAYERS.index(target) >= LAYERS.index(module)]
    assert not upward, f"imports against the layering (a cycle in the making): {upward}"


@pytest.mark.parametrize("module", sorted(FLOORS))
def test_import_floor(module):
    script = f"import sys, {module}\nprint(sorted(m for m in sys.modules if m.startswith('gdn_lab.')))"
    done = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = {name.removeprefix("gdn_lab.") for name in ast.literal_eval(done.stdout.strip())}
    assert not loaded & set(FLOORS[module]), f"import {module} loads {sorted(loaded & set(FLOORS[module]))}"
