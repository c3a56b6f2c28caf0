"""Notebook 01 in JupyterLab: every figure drawn, the probe explorer redraws, the static exports render.

The notebook runs at its ci_params.yml smoke sizes with `interactive = True`, so its Explore cell
shows `gdn_lab.widgets.probe_explorer` over the trained model's probe.
"""
from __future__ import annotations

import json

import pytest

from .conftest import open_lab_notebook
from .lab import problems_after_widget_change, problems_in_static_page, problems_on_page

NAME = "01_layer_internals"


@pytest.fixture(scope="module")
def notebook(module_page, jupyter_server, lab_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / NAME
    return open_lab_notebook(module_page, jupyter_server, lab_root, NAME, run_dir).run_all(timeout=300)


@pytest.fixture(scope="module")
def metrics(notebook) -> dict:
    return json.loads((notebook.run_dir / "metrics.json").read_text())


def test_every_figure_drawn_and_no_error(notebook, metrics, screenshots):
    expected = len(metrics["figures"]) + 1  # the figures it exports, and the explorer's
    notebook.wait_for_figures(expected)
    assert problems_on_page(notebook, min_figures=expected) == []
    trained_gates = notebook.code_cell("viz.gate_traces(").locator(".jp-RenderedPlotly").last
    screenshots.save(trained_gates, "01_gates")


def test_explorer_redraws_for_layer_head_time_and_view(notebook, screenshots):
    explorer = notebook.code_cell("widgets.probe_explorer(")
    layers = notebook.dropdown_options(explorer, "layer")
    assert len(layers) >= 2, f"the smoke model probes {layers}; the layer check needs two GDN layers"
    moves = [
        ("time slider to its first step", lambda: notebook.press_slider(explorer, "time", "Home")),
        (f"layer {layers[0]} -> {layers[1]}", lambda: notebook.select(explorer, "layer", layers[1])),
        ("view -> state S_t", lambda: notebook.select(explorer, "view", "state S_t")),
        ("head 0 -> 1", lambda: notebook.press_slider(explorer, "head")),
        ("time one step on", lambda: notebook.press_slider(explorer, "time")),
        ("view -> implicit attention", lambda: notebook.select(explorer, "view", "implicit attention")),
        ("head 1 -> 0", lambda: notebook.press_slider(explorer, "head", "ArrowLeft")),
    ]
    problems = []
    for what, move in moves:
        problems += problems_after_widget_change(notebook, explorer, move, what)
        if what == "time one step on":
            screenshots.save(explorer, "01_probe_explorer")
    assert problems == []


def test_static_exports_render_offline(notebook, metrics, file_page):
    exported = sorted((notebook.run_dir / "figures").glob("*.html"))
    assert len(exported) == len(metrics["figures"]), exported
    assert all(any(path.stem.endswith(name) for path in exported) for name in metrics["figures"]), exported
    problems = []
    for path in exported:
        problems += problems_in_static_page(file_page, path)
    assert problems == []
