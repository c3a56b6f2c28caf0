"""Figures saved by `gdn_lab.viz.save_html` render in Chromium from file://, with no server and no network.

Each page loads the one `plotly.min.js` beside it (include_plotlyjs="directory"); every request
that is not a file is blocked and reported. The state heatmap's slider must still animate offline.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from gdn_lab import viz

from .lab import open_static_page, problems_in_static_page

T, H, K, V = 12, 2, 4, 8
STATE_STEPS = [0, 2, 4, 6, 8, 11]


def _figures() -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = [f"w{t}" for t in range(T)]
    alpha, beta = torch.rand(T, H, generator=generator), torch.rand(T, H, generator=generator)
    states = torch.randn(len(STATE_STEPS), H, K, V, generator=generator)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    implicit = torch.randn(T, T, generator=generator) * causal
    softmax = torch.randn(T, T, generator=generator).masked_fill(~causal, float("-inf")).softmax(-1)
    keys = torch.nn.functional.normalize(torch.randn(T, K, generator=generator), dim=-1)
    history = [{"step": s, "train_loss": 5.5 - 0.1 * s, "val_loss": 5.6 - 0.09 * s, "val_acc": 0.01 * s}
               for s in range(0, 40, 10)]
    return {
        "gates": viz.gate_traces(alpha, beta, tokens),
        "state": viz.state_heatmap(states, tokens, head=1, steps=STATE_STEPS),
        "implicit_attention": viz.implicit_attention_heatmap(implicit, tokens, softmax),
        "spectrum": viz.transition_spectrum(keys, beta[:, 0], allow_neg_eigval=False, tokens=tokens),
        "curves": viz.training_curves(history),
    }


FIGURES = _figures()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every figure above saved into one folder with viz.save_html: {name: path}."""
    folder = tmp_path_factory.mktemp("figures")
    return {name: viz.save_html(fig, folder / f"{name}.html") for name, fig in FIGURES.items()}


@pytest.mark.parametrize("name", FIGURES)
def test_saved_figure_renders_offline(name, saved, file_page):
    assert problems_in_static_page(file_page, saved[name], traces=len(FIGURES[name].data)) == []


def test_state_slider_animates_offline(saved, file_page):
    assert open_static_page(file_page, saved["state"]) == []
    title = file_page.locator(".js-plotly-plot .gtitle")
    title.wait_for(state="attached")
    assert title.text_content().startswith("S_t, head 1, t = 11")
    rail = file_page.locator(".slider-rail-touch-rect").bounding_box()
    file_page.mouse.click(rail["x"] + 2, rail["y"] + rail["height"] / 2)  # the slider's first step
    file_page.wait_for_function("() => document.querySelector('.js-plotly-plot .gtitle').textContent"
                                ".startsWith('S_t, head 1, t = 0 ')", timeout=10_000)
    # the drawn heatmap's first row (plotly's _fullData: the decoded arrays it draws) is frame t = 0's
    shown = file_page.evaluate("() => Array.from(document.querySelector('.js-plotly-plot')._fullData[0].z[0])")
    assert shown == pytest.approx(FIGURES["state"].frames[0].data[0].z[0].tolist(), rel=1e-6)


def test_detects_a_page_whose_plotly_js_is_missing(saved, file_page, tmp_path):
    lonely = shutil.copy(saved["gates"], tmp_path / "gates.html")
    problems = problems_in_static_page(file_page, lonely, traces=len(FIGURES["gates"].data))
    assert any("plotly.js did not load" in p for p in problems), problems
    assert any("no plotly figure" in p for p in problems), problems
