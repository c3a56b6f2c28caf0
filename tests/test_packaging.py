"""Packaging and notebook hygiene: what a fresh clone, Colab and CI rely on."""
from __future__ import annotations

import pkgutil
import re
import subprocess
import sys

import nbformat
import papermill
import pytest
import yaml
from conftest import NOTEBOOKS_DIR, REPO_ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import gdn_lab
from gdn_lab.runner import NOTEBOOK_GLOB

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob(NOTEBOOK_GLOB))
CONTRACT_PARAMETERS = ("run_dir", "device", "interactive", "seed")
OPTIONAL_IMPORTS = ("triton", "fla", "datasets", "ipywidgets")
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^)\s\"']+")


def _requirement_key(text: str) -> tuple[str, str, str]:
    requirement = Requirement(text)
    return requirement.name.lower().replace("_", "-"), str(requirement.specifier), str(requirement.marker or "")


def _colab_url(path: str) -> str:
    return f"https://colab.research.google.com/github/{gdn_lab.REPO_URL.removeprefix('https://github.com/')}" \
           f"/blob/main/{path}"


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())["dependencies"]
    conda = [dep for dep in environment if isinstance(dep, str)]
    pip = next(dep["pip"] for dep in environment if isinstance(dep, dict))
    assert sorted(map(_requirement_key, project["dependencies"])) == \
        sorted(_requirement_key(dep) for dep in pip if not dep.startswith("-e"))
    assert "-e ." in pip and "pip" in conda
    python = next(dep for dep in conda if dep.startswith("python="))
    assert SpecifierSet(project["requires-python"]).contains(python.removeprefix("python=") + ".0")


def test_console_script_points_at_main():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"gdn-lab": "gdn_lab.__main__:main"}


def test_repository_is_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]


def test_committed_notebooks_have_no_outputs():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.ipynb"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert {str(path.relative_to(REPO_ROOT)) for path in NOTEBOOKS} <= set(listed)
    dirty = []
    for path in listed:
        notebook = nbformat.read(REPO_ROOT / path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{path} cell {index}")
    assert not dirty, f"strip outputs (nbstripout, or pre-commit install) from: {dirty}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_follows_the_contract(path):
    """Badge, Colab install line and the `parameters` cell of docs/api.md's notebook contract."""
    notebook = nbformat.read(path, as_version=4)
    relative = str(path.relative_to(REPO_ROOT))
    title = notebook.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({_colab_url(relative)})"
    assert badge in title.source
    links = set(COLAB_LINK.findall("\n".join(cell.source for cell in notebook.cells)))
    assert links == {_colab_url(relative)}, f"every Colab link in {path.name} must open the notebook itself"
    install = notebook.cells[1].source
    assert 'if "google.colab" in sys.modules:' in install and f"@ git+{gdn_lab.REPO_URL}" in install
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is notebook.cells[2]
    declared = papermill.inspect_notebook(str(path))
    assert set(CONTRACT_PARAMETERS) <= set(declared), f"{path.name} lacks {set(CONTRACT_PARAMETERS) - set(declared)}"
    assert declared["run_dir"]["default"] == f'"runs/manual/{path.stem}"'
    assert declared["device"]["default"] == '"auto"'
    assert declared["interactive"]["default"] == "True"
    assert "write_metrics(run_dir" in notebook.cells[-1].source


def test_readme_has_a_colab_badge_for_every_notebook():
    readme = (REPO_ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert _colab_url(str(path.relative_to(REPO_ROOT))) in readme, f"README lacks a Colab badge for {path.name}"
    links = COLAB_LINK.findall(readme)
    assert links and all(link.startswith(_colab_url("notebooks/")) for link in links)


def test_ci_params_name_existing_notebooks_and_parameters():
    table = yaml.safe_load((NOTEBOOKS_DIR / "ci_params.yml").read_text())
    assert set(table) == {path.stem for path in NOTEBOOKS}, "one ci_params.yml entry per numbered notebook"
    for stem, params in table.items():
        declared = papermill.inspect_notebook(str(NOTEBOOKS_DIR / f"{stem}.ipynb"))
        unknown = set(params or {}) - set(declared)
        assert not unknown, f"ci_params.yml: {sorted(unknown)} are not parameters of {stem}"
        assert not {"run_dir", "interactive"} & set(params or {}), "the runner sets run_dir and interactive itself"


def test_gdn_lab_imports_without_optional_packages():
    """Every gdn_lab module imports with triton, fla, datasets and ipywidgets unimportable, and
    `import gdn_lab` alone loads neither torch nor any of them."""
    modules = sorted(f"gdn_lab.{info.name}" for info in pkgutil.iter_modules(gdn_lab.__path__))
    script = f"""
import importlib, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL_IMPORTS!r}:
            raise ModuleNotFoundError(f"blocked for this test: {{name}}")

sys.meta_path.insert(0, Block())
import gdn_lab
heavy = [name for name in ("torch", *{OPTIONAL_IMPORTS!r}) if name in sys.modules]
assert not heavy, f"import gdn_lab loaded {{heavy}}"
for module in {modules!r}:
    importlib.import_module(module)
print("imported", len({modules!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"imported {len(modules)}"
