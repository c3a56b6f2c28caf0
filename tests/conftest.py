"""Shared test helpers: one torch thread for every test, repository paths, a maker of small notebooks
and a loader of the benchmark scripts."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import nbformat
import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def load_benchmark(name: str):
    """The module of `benchmarks/<name>.py`, loaded from its file (the scripts run without installing)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered first, as an import would: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test runs with one intra-op torch thread: bit-exact resume and distributed comparisons
    need a fixed thread count, and on a shared CPU a second thread on these tiny tensors only spins
    (two threads ran several times slower than one). Spawned processes set their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_notebook():
    """`make_notebook(path, parameters_source, *cell_sources)` writes a notebook whose first code
    cell is tagged `parameters`; returns the path."""

    def make(path: pathlib.Path, parameters: str, *cells: str) -> pathlib.Path:
        notebook = nbformat.v4.new_notebook()
        params_cell = nbformat.v4.new_code_cell(parameters)
        params_cell.metadata["tags"] = ["parameters"]
        notebook.cells = [params_cell, *(nbformat.v4.new_code_cell(source) for source in cells)]
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, path)
        return path

    return make
