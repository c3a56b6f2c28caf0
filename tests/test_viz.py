"""Every figure builder returns a go.Figure with the expected traces and frames for a tiny input."""
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from gdn_lab import scaling, viz
from gdn_lab.sweep import SweepResult, VariantResult

B, T, H, K, V = 2, 12, 3, 4, 8
TOKENS = [f"w{t}" for t in range(T)]


@pytest.fixture
def gates():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(B, T, H, generator=generator), torch.rand(B, T, H, generator=generator)


def test_state_heatmap_has_one_frame_per_kept_step_up_to_the_cap():
    states = torch.randn(B, 5, H, K, V, generator=torch.Generator().manual_seed(0))
    fig = viz.state_heatmap(states, TOKENS, head=1, steps=[0, 2, 5, 8, 11])
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"
    assert [f.name for f in fig.frames] == ["0", "2", "5", "8", "11"]
    assert np.allclose(fig.frames[2].data[0].z, states[0, 2, 1].numpy())
    assert np.allclose(fig.data[0].z, states[0, 4, 1].numpy())           # opens on the last step
    assert fig.data[0].zmin == -fig.data[0].zmax                         # centred, fixed across frames
    assert len(fig.layout.sliders[0].steps) == 5

    many = viz.state_heatmap(torch.randn(40 * 3, H, K, V), None, head=0, max_frames=40)
    assert 2 <= len(many.frames) <= 40 and many.frames[-1].name == str(40 * 3 - 1)
    single = viz.state_heatmap(states[:, :1], TOKENS, head=0, steps=[3])
    assert len(single.frames) == 0 and not single.layout.sliders


def test_state_heatmap_rejects_steps_that_do_not_match_the_states():
    with pytest.raises(ValueError, match="one time index per state"):
        viz.state_heatmap(torch.zeros(3, H, K, V), TOKENS, head=0, steps=[1, 2])


def test_gate_traces_plot_alpha_and_beta_per_head_with_token_hover(gates):
    alpha, beta = gates
    fig = viz.gate_traces(alpha, beta, TOKENS, batch_index=1)
    assert len(fig.data) == 2 * H
    assert np.allclose(fig.data[0].y, alpha[1, :, 0].numpy())
    assert np.allclose(fig.data[H + 2].y, beta[1, :, 2].numpy())
    assert fig.data[0].text[3] == "3·w3"
    assert [trace.showlegend for trace in fig.data] == [True] * H + [False] * H


def test_gate_traces_want_one_token_per_step(gates):
    with pytest.raises(ValueError, match="one string per step"):
        viz.gate_traces(*gates, TOKENS[:-1])


def test_state_norm_has_a_line_per_head():
    norms = torch.rand(T, H)
    fig = viz.state_norm(norms, TOKENS)
    assert len(fig.data) == H and np.allclose(fig.data[2].y, norms[:, 2].numpy())


def test_implicit_attention_heatmap_alone_and_beside_a_softmax_map():
    A = torch.randn(T, T).tril()
    fig = viz.implicit_attention_heatmap(A, TOKENS)
    assert len(fig.data) == 1
    z = np.array(fig.data[0].z, dtype=float)
    assert np.isnan(z[0, 1]) and z[1, 0] == pytest.approx(A[1, 0].item())   # causal: blank above the diagonal
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax

    softmax = torch.softmax(torch.randn(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9), -1)
    both = viz.implicit_attention_heatmap(A, TOKENS, softmax_map=softmax)
    assert len(both.data) == 2 and both.data[1].coloraxis == "coloraxis2"
    assert list(both.data[1].x) == [f"{t}·w{t}" for t in range(T)]


@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_transition_spectrum_computes_one_minus_beta_along_k(allow_neg_eigval):
    generator = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(T, K, generator=generator), dim=-1)
    sigmoid_beta = torch.rand(T, generator=generator)
    beta = 2 * sigmoid_beta if allow_neg_eigval else sigmoid_beta
    fig = viz.transition_spectrum(k, beta, allow_neg_eigval, TOKENS)
    assert len(fig.data) == 4
    smallest_without, largest_without, smallest_with, largest_with = (np.array(t.y) for t in fig.data)
    assert np.allclose(smallest_without, 1 - sigmoid_beta.numpy(), atol=1e-5)
    assert np.allclose(smallest_with, 1 - 2 * sigmoid_beta.numpy(), atol=1e-5)
    assert np.allclose(largest_without, 1, atol=1e-5) and np.allclose(largest_with, 1, atol=1e-5)
    assert (smallest_with < 0).any() and (smallest_without > 0).all()


def test_training_curves_from_records_and_from_columns():
    records = [{"step": 0, "train_loss": 3.0}, {"step": 10, "train_loss": 2.5, "val_loss": 2.7, "val_acc": 0.3},
               {"step": 20, "train_loss": 2.0, "val_loss": 2.2, "val_acc": 0.4, "val_ppl": 9.0, "lr": 1e-3}]
    fig = viz.training_curves(records)
    assert [trace.name for trace in fig.data] == ["train", "val", "val", "val"]
    assert list(fig.data[1].x) == [10, 20] and list(fig.data[1].y) == [2.7, 2.2]   # gaps dropped
    assert fig.layout.yaxis3.type == "log"                                            # perplexity row
    columns = viz.training_curves({"step": [0, 1], "train_loss": [2.0, 1.0], "val_loss": [2.1, 1.1]})
    assert len(columns.data) == 2
    with pytest.raises(ValueError, match="'step'"):
        viz.training_curves([{"train_loss": 1.0}])


def test_line_plot_draws_a_trace_per_series():
    fig = viz.line_plot({"gdn": ([16, 32], [1.0, 0.9]), "attn": ([16, 32], [1.0, 1.0])}, "seq len", "accuracy",
                        log_x=True)
    assert [trace.name for trace in fig.data] == ["gdn", "attn"] and fig.layout.xaxis.type == "log"


def test_saved_memory_bars_group_the_modules_of_every_model():
    saved = {"gdn": {"model.layers.*.attn": 2048.0, "": 1024.0}, "transformer": {"model.layers.*.mlp": 512.0}}
    fig = viz.saved_memory_bars(saved, title="kept")
    assert [t.name for t in fig.data] == ["gdn", "transformer"] and fig.layout.barmode == "group"
    labels = ["model.layers.*.attn", "model (loss, logits)", "model.layers.*.mlp"]
    assert list(fig.data[0].x) == list(fig.data[1].x) == labels
    assert list(fig.data[0].y) == [2.0, 1.0, 0.0] and list(fig.data[1].y) == [0.0, 0.0, 0.5]  # KiB; 0 where absent


def test_passkey_heatmap_has_a_depth_by_length_panel_per_model():
    records = [{"context_len": n, "depth": d, "accuracy": n / 1000 + d} for n in (256, 128) for d in (0.5, 0.0)]
    fig = viz.passkey_heatmap({"gdn": records, "transformer": records[1:]}, title="passkey")
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and fig.layout.title.text == "passkey"
    assert list(fig.data[0].x) == ["128", "256"] and list(fig.data[0].y) == ["0.00", "0.50"]
    assert [list(row) for row in fig.data[0].z] == [[0.128, 0.256], [0.628, 0.756]]
    assert math.isnan(fig.data[1].z[1][1])  # (256, 0.5) is missing from the second table
    assert [t.showscale for t in fig.data] == [False, True]  # one colour scale, on the last panel


def _sweep_run(name: str, layout: str, lr: float, loss: float, seed: int = 0) -> VariantResult:
    curve = [{"step": step, "tokens": 100 * step, "val_loss": loss + 1 / step} for step in (1, 2, 3)]
    return VariantResult(name=name, attn_layers=tuple(i for i, c in enumerate(layout) if c == "A"), layout=layout,
                         attention_ratio=layout.count("A") / len(layout), lr=lr, params=1, status="ok", seed=seed,
                         final_val_loss=curve[-1]["val_loss"], tokens_per_second=1000.0, train_seconds=2.0,
                         curve=curve)


def test_sweep_figures_have_a_trace_per_variant():
    result = SweepResult([_sweep_run("gdn", "GG", 1e-3, 2.0), _sweep_run("gdn", "GG", 2e-3, 2.5),
                          _sweep_run("late", "GA", 1e-3, 1.5), _sweep_run("late", "GA", 1e-3, 1.7, seed=1)], {})
    figures = viz.sweep_figures(result)
    assert result.ranking() == ["late", "gdn"]
    assert [t.name for t in figures["val_loss"].data] == ["late", "gdn"]
    assert list(figures["val_loss"].data[1].y) == [r["val_loss"] for r in result["gdn"].curve]
    assert list(figures["val_loss"].data[0].y) == pytest.approx([1.6 + 1 / step for step in (1, 2, 3)])  # 2 seeds
    assert [list(t.x) for t in figures["lr_grid"].data] == [[1e-3], [1e-3, 2e-3]]  # first seed's grid
    scatter, layout = figures["placement"].data
    assert list(scatter.x) == [50.0, 0.0] and list(scatter.y) == pytest.approx([1.6 + 1 / 3, 2.0 + 1 / 3])
    assert [list(row) for row in layout.z] == [[0.0, 1.0], [0.0, 0.0]]
    assert [t.type for t in figures["throughput"].data] == ["bar", "bar"]
    assert figures["throughput"].layout.annotations[1].text == "training seconds"  # no GPU memory on the CPU


def test_scaling_figure_draws_each_fit_across_its_measured_sizes():
    sizes = [1e6, 2e6, 4e6, 8e6]
    rows = [{"arch": arch, "params": n, "flops": 6 * n * 1e5, "mean": loss, "min": loss - 0.01,
             "max": loss + 0.01, "n": 2, "values": [loss - 0.01, loss + 0.01]}
            for arch, scale in (("gdn", 10.0), ("transformer", 12.0)) for n in sizes
            for loss in [2.0 + scale * (n / 1e6) ** -0.5 / 10]]
    fits = scaling.fit_architectures(rows, samples=20)
    fits["transformer"] = {"sizes": sizes, "error": "too few sizes"}
    fig = viz.scaling_figure(rows, fits, x="flops", title="scaling")
    fit = scaling.fit_of(fits["gdn"])
    assert [t.name for t in fig.data] == ["gdn", "transformer", f"gdn fit: alpha {fit.alpha:.2f}, c {fit.c:.2f}"]
    line = fig.data[2]
    assert line.x[0] == pytest.approx(6e11) and line.x[-1] == pytest.approx(4.8e12)  # mapped onto FLOPs
    assert line.y[0] == pytest.approx(rows[0]["mean"], abs=1e-3) and fig.layout.xaxis.type == "log"


def test_save_html_shares_one_plotly_js_per_folder(tmp_path, gates):
    first = viz.save_html(viz.gate_traces(*gates, TOKENS), tmp_path / "figs" / "gates.html")
    viz.save_html(viz.state_norm(torch.rand(T, H), TOKENS), tmp_path / "figs" / "norm.html")
    html = first.read_text()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in html
    assert len(html) < 200_000                                  # the page does not embed plotly.js
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["gates.html", "norm.html", "plotly.min.js"]


def test_run_folders_share_one_plotly_js(tmp_path, monkeypatch):
    """Figures in many folders (a sweep's run directories) link one cached plotly.js, not a copy each."""
    import plotly

    from gdn_lab.viz import save_html

    monkeypatch.setenv("GDN_LAB_CACHE", str(tmp_path / "cache"))
    figure = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    pages = [save_html(figure, tmp_path / f"run{i}" / "curves.html") for i in range(3)]
    scripts = [page.parent / "plotly.min.js" for page in pages]
    cached = tmp_path / "cache" / f"plotly-{plotly.__version__}.min.js"
    assert cached.stat().st_size > 1_000_000
    assert {script.stat().st_ino for script in scripts} == {cached.stat().st_ino}
    assert all('src="plotly.min.js"' in page.read_text() for page in pages)
