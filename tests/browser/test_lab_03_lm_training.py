"""Notebook 03 in JupyterLab: every figure drawn, and its config panels set what the next cell builds.

The notebook runs at its ci_params.yml smoke sizes with `interactive = True`, so its Build
section shows two `gdn_lab.widgets.config_panel`s (model and training config) and the next cell
builds the model from `model_panel.value` and `train_panel.value`.
"""
from __future__ import annotations

import re

import pytest

from gdn_lab.config import get_preset
from gdn_lab.data import ByteTokenizer
from gdn_lab.models import count_params
from gdn_lab.runner import load_smoke_params

from .conftest import NOTEBOOKS_DIR, open_lab_notebook
from .lab import problems_on_page

NAME = "03_lm_training"
# the GDN run's curves, the extended run's schedule, GDN vs attention, and the live curves while training
FIGURES = 4


@pytest.fixture(scope="module")
def notebook(module_page, jupyter_server, lab_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / NAME
    return open_lab_notebook(module_page, jupyter_server, lab_root, NAME, run_dir).run_all(timeout=400)


def parameters_printed(text: str) -> int:
    match = re.search(r"([\d,]+) parameters", text)
    assert match, f"no parameter count in the cell's output: {text!r}"
    return int(match.group(1).replace(",", ""))


def test_every_figure_drawn_and_no_error(notebook, screenshots):
    notebook.wait_for_figures(FIGURES)
    assert problems_on_page(notebook, min_figures=FIGURES) == []
    curves = notebook.code_cell("viz.training_curves(gdn.history").locator(".jp-RenderedPlotly")
    screenshots.save(curves, "03_training_curves")


def test_config_panel_sets_the_parameters_of_the_next_cell(notebook, screenshots):
    preset = load_smoke_params(NOTEBOOKS_DIR / "ci_params.yml")[NAME].get("preset", "tiny")
    model_config = get_preset(preset).model.replace(vocab_size=ByteTokenizer().vocab_size)
    panels = notebook.code_cell("config_panel(")
    model_panel, train_panel = notebook.widget_box(panels, "ModelConfig"), notebook.widget_box(panels, "TrainConfig")
    build = notebook.code_cell("model_panel.value")
    assert parameters_printed(notebook.output_text(build)) == count_params(model_config)

    # an invalid value shows its ConfigError line under the controls; a valid one clears it
    error_line = notebook.widget(model_panel, "error")
    notebook.type_number(model_panel, "num_heads", 0)
    notebook.page.wait_for_function("(node) => node.innerText.includes('num_heads')",
                                    arg=error_line.element_handle(), timeout=10_000)
    notebook.type_number(model_panel, "num_heads", model_config.num_heads)
    notebook.page.wait_for_function("(node) => !node.innerText.includes('num_heads')",
                                    arg=error_line.element_handle(), timeout=10_000)

    hidden_size, steps = 2 * model_config.hidden_size, 6
    notebook.type_number(model_panel, "hidden_size", hidden_size)
    notebook.type_number(train_panel, "steps", steps)
    notebook.wait_until_idle()
    screenshots.save(panels.locator(".jp-Cell-outputArea"), "03_config_panels")
    notebook.run_cell(build)
    built = notebook.output_text(build)
    assert parameters_printed(built) == count_params(model_config.replace(hidden_size=hidden_size))
    assert re.search(rf"\bsteps={steps}\b", built), built
    assert problems_on_page(notebook) == []
