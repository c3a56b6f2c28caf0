"""Shared test helpers: repository paths and a maker of small notebooks."""
from __future__ import annotations

import pathlib

import nbformat
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


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
