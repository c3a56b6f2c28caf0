"""Notebook 00 in JupyterLab: runs without an error output, and its sampling widget resamples."""
from __future__ import annotations

from .lab import problems_after_widget_change, problems_on_page


def test_runs_clean_and_the_temperature_slider_resamples(open_notebook):
    notebook = open_notebook("00_quickstart").run_all(timeout=180)
    assert problems_on_page(notebook) == []
    assert (notebook.run_dir / "metrics.json").is_file()  # the last cell ran
    sampler = notebook.code_cell("ipywidgets.interact(")
    sample_text = sampler.locator(".widget-interact .jp-OutputArea")

    def to_greedy():
        notebook.press_slider(sampler, "temperature", "Home")

    problems = problems_after_widget_change(notebook, sampler, to_greedy, "temperature 1.0 -> 0.0 (greedy)",
                                            read=sample_text.inner_text)
    assert problems == []
    assert notebook.slider_readout(sampler, "temperature") == "0.00"
