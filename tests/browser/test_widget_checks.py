"""The tier's own checks, on a notebook made here: working widgets pass, broken ones are caught.

One notebook, run once in JupyterLab, holds a ProbeExplorer over a tiny untrained model and a
slider that redraws a gdn_lab.viz figure (both must redraw when moved), and three widgets broken
on purpose: an `interact` callback that raises (a traceback in its output area), a ProbeExplorer
whose figure builder raises, and a bare `observe` callback that raises outside any output area
(nothing on the page but a figure that never changes). The checks must report each of them.
"""
from __future__ import annotations

import pytest

from .conftest import open_lab_notebook
from .lab import problems_after_widget_change, problems_on_page

NOTEBOOK = "browser_widget_checks.ipynb"
SETUP = """\
import ipywidgets
import numpy as np
import torch
from IPython.display import display

from gdn_lab import viz, widgets
from gdn_lab.models import build_model
from gdn_lab.probe import capture

torch.manual_seed(0)
model = build_model("tiny", vocab_size=32).eval()
probe = capture(model, torch.randint(0, 32, (1, 12)), state_steps=[3, 7, 11])
x = np.linspace(0.0, 1.0, 64)

def wave_figure(frequency):
    return viz.line_plot({"sin": (x, np.sin(2 * np.pi * frequency * x))}, "x", "y", title=f"frequency {frequency}")
"""
EXPLORER = "# a working explorer\nexplorer = widgets.probe_explorer(probe)\ndisplay(explorer)\n"
WAVE = """\
# a working slider
@ipywidgets.interact(frequency=(1, 4))
def wave(frequency=1):
    wave_figure(frequency).show()
"""
BROKEN_WAVE = """\
# broken: the interact callback raises
@ipywidgets.interact(frequency=(1, 4))
def broken_wave(frequency=1):
    if frequency > 1:
        raise ValueError("broken on purpose")
    wave_figure(frequency).show()
"""
BROKEN_EXPLORER = """\
# broken: the explorer's redraw raises
broken_explorer = widgets.probe_explorer(probe)
broken_explorer.build_figure = lambda: 1 / 0  # every redraw after the first raises
display(broken_explorer)
"""
SILENT_WAVE = """\
# broken: a bare observer raises, nothing shows it
silent_slider = ipywidgets.IntSlider(value=1, min=1, max=4, description="frequency")
silent_area = ipywidgets.Output()

def silent_redraw(change):
    raise ValueError("broken on purpose, outside any output area")

silent_slider.observe(silent_redraw, names="value")
with silent_area:
    wave_figure(1).show()
display(silent_slider, silent_area)
"""
CELLS = {"explorer": EXPLORER, "wave": WAVE, "broken_wave": BROKEN_WAVE, "broken_explorer": BROKEN_EXPLORER,
         "silent_wave": SILENT_WAVE}


@pytest.fixture(scope="module")
def notebook(module_page, jupyter_server, lab_root, make_notebook):
    """The notebook above, opened and run; each test reads or moves the widgets of one cell."""
    make_notebook(lab_root / NOTEBOOK, "interactive = True", SETUP, *CELLS.values())
    return open_lab_notebook(module_page, jupyter_server, lab_root, lab_root / NOTEBOOK).run_all(timeout=180)


def cell(notebook, name: str):
    return notebook.code_cell(CELLS[name].splitlines()[0])


def test_every_figure_renders_and_no_error_before_any_widget_moves(notebook):
    notebook.wait_for_figures(len(CELLS))
    assert problems_on_page(notebook, min_figures=len(CELLS)) == []


def test_probe_explorer_redraws_for_layer_head_time_and_view(notebook):
    explorer = cell(notebook, "explorer")
    problems = problems_after_widget_change(notebook, explorer, lambda: notebook.press_slider(explorer, "time", "Home"),
                                            "time slider to its first step")
    assert notebook.dropdown_options(explorer, "layer") == ["0", "1"]
    problems += problems_after_widget_change(notebook, explorer, lambda: notebook.select(explorer, "layer", "1"),
                                             "layer 0 -> 1")
    problems += problems_after_widget_change(notebook, explorer, lambda: notebook.select(explorer, "view", "state S_t"),
                                             "view -> state S_t")
    problems += problems_after_widget_change(notebook, explorer, lambda: notebook.press_slider(explorer, "head"),
                                             "head 0 -> 1")
    problems += problems_after_widget_change(notebook, explorer, lambda: notebook.press_slider(explorer, "time"),
                                             "time one step on")
    assert problems == []
    assert notebook.slider_readout(explorer, "head") == "1"


def test_slider_redraws_a_viz_figure(notebook):
    wave = cell(notebook, "wave")
    assert problems_after_widget_change(notebook, wave, lambda: notebook.press_slider(wave, "frequency"),
                                        "frequency 1 -> 2") == []
    assert "frequency 2" in notebook.figure_state(wave)


def test_detects_an_interact_callback_that_raises(notebook):
    broken = cell(notebook, "broken_wave")
    problems = problems_after_widget_change(notebook, broken, lambda: notebook.press_slider(broken, "frequency"),
                                            "frequency 1 -> 2")
    assert any("error output" in p and "ValueError: broken on purpose" in p for p in problems), problems
    assert any("ValueError: broken on purpose" in p for p in problems_on_page(notebook))


def test_detects_a_probe_explorer_whose_redraw_raises(notebook):
    broken = cell(notebook, "broken_explorer")
    problems = problems_after_widget_change(notebook, broken, lambda: notebook.press_slider(broken, "head"),
                                            "head 0 -> 1")
    assert any("ZeroDivisionError" in p for p in problems), problems


def test_detects_a_callback_that_fails_silently(notebook):
    silent = cell(notebook, "silent_wave")
    problems = problems_after_widget_change(notebook, silent, lambda: notebook.press_slider(silent, "frequency"),
                                            "frequency 1 -> 2", timeout=5)
    assert problems == ["frequency 1 -> 2: the view did not change within 5 s"]
    assert notebook.slider_readout(silent, "frequency") == "2"  # the slider moved; only its callback failed
