"""Plotly figure builders: each returns a `go.Figure` and never shows it.

The notebook shows a figure with `fig.show()` (Jupyter, Colab) and `save_html` writes it as a
static page that renders offline: every page in a folder shares one local `plotly.min.js`.
Arrays go in as float32 numpy, which plotly stores as base64, so a 40-frame state slider stays
around a megabyte.

Inputs are plain tensors (or numpy arrays) in gdn_lab's layout: gates [B, T, H] or [T, H],
states [B, S, H, K, V] or [S, H, K, V] (S kept time steps), one head's keys [T, K]. Batched
inputs take `batch_index` (default 0). `tokens` is a list of T strings shown as hover text and
axis labels (None: positions).

Builders of experiment results take the records their module returns and shape them with that
module's functions: `passkey_heatmap` (`gdn_lab.longctx`), `sweep_figures` (`gdn_lab.sweep`),
`scaling_figure` (`gdn_lab.scaling`).
"""
from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .longctx import passkey_grid
from .scaling import fit_of

_COLORS = qualitative.Plotly


def _numpy(x, batch_dims: int, batch_index: int) -> np.ndarray:
    """A float32 array with the batch axis removed when `x` has `batch_dims` + 1 dimensions."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == batch_dims + 1:
        x = x[batch_index]
    if x.ndim != batch_dims:
        raise ValueError(f"expected {batch_dims} dimensions (or {batch_dims + 1} with a batch axis); "
                         f"got shape {x.shape}")
    return x


def _token_labels(tokens: Sequence[str] | None, length: int) -> list[str]:
    """One unique label per position, "t·token", for hover text and categorical axes."""
    if tokens is None:
        return [str(t) for t in range(length)]
    if len(tokens) != length:
        raise ValueError(f"got {len(tokens)} tokens for {length} time steps; pass one string per step")
    return [f"{t}·{tok}" for t, tok in enumerate(tokens)]


def _color(head: int) -> str:
    return _COLORS[head % len(_COLORS)]


def subsample_steps(num_steps: int, max_frames: int) -> list[int]:
    """At most `max_frames` indices into `num_steps` items, evenly spaced, first and last included."""
    if num_steps <= max_frames:
        return list(range(num_steps))
    return sorted({int(round(i)) for i in np.linspace(0, num_steps - 1, max_frames)})


def state_heatmap(states, tokens: Sequence[str] | None, head: int, steps: Sequence[int] | None = None,
                  batch_index: int = 0, max_frames: int = 40) -> go.Figure:
    """The state S_t [K, V] of one head as a heatmap, with a slider over the kept time steps.

    Args: states [B, S, H, K, V] or [S, H, K, V]; tokens: T strings (or None); head; steps: the
    time index of each of the S states (the probe's `state_steps`; default 0..S-1); at most
    `max_frames` evenly spaced frames are kept. The colour scale is fixed across frames and
    centred on zero, so colours compare across time.
    """
    states = _numpy(states, 4, batch_index)[:, head]                          # [S, K, V]
    steps = list(range(states.shape[0])) if steps is None else [int(t) for t in steps]
    if len(steps) != states.shape[0]:
        raise ValueError(f"steps has {len(steps)} entries for {states.shape[0]} states; pass one time index per state")
    if tokens is not None and max(steps) >= len(tokens):
        raise ValueError(f"state step {max(steps)} is past the {len(tokens)} tokens given; pass one string per step")
    kept = subsample_steps(len(steps), max_frames)
    bound = float(np.abs(states[kept]).max()) or 1.0

    def heatmap(i: int) -> go.Heatmap:
        return go.Heatmap(z=states[i], zmin=-bound, zmax=bound, colorscale="RdBu", reversescale=True,
                          colorbar={"title": "S[k, v]"},
                          hovertemplate="k=%{y}, v=%{x}<br>S=%{z:.4f}<extra></extra>")

    def title(i: int) -> str:
        t = steps[i]
        return f"S_t, head {head}, t = {t}" + (f" ({tokens[t]!r})" if tokens is not None else "")

    last = kept[-1]
    fig = go.Figure(heatmap(last))
    fig.update_layout(title=title(last), xaxis_title="value dim v", yaxis_title="key dim k",
                      yaxis_autorange="reversed")
    if len(kept) > 1:
        fig.frames = [go.Frame(data=[heatmap(i)], name=str(steps[i]), layout={"title": title(i)}) for i in kept]
        fig.update_layout(sliders=[{
            "active": len(kept) - 1,
            "currentvalue": {"prefix": "t = "},
            "steps": [{"label": str(steps[i]), "method": "animate",
                       "args": [[str(steps[i])], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                                   "transition": {"duration": 0}}]}
                      for i in kept],
        }])
    return fig


def gate_traces(alpha, beta, tokens: Sequence[str] | None, batch_index: int = 0) -> go.Figure:
    """alpha_t (decay, top) and beta_t (write strength, bottom) over tokens, one line per head.

    Args: alpha, beta [B, T, H] or [T, H]; tokens: T strings (hover text) or None.
    Traces: 2 * H (alpha of each head, then beta of each head).
    """
    alpha, beta = _numpy(alpha, 2, batch_index), _numpy(beta, 2, batch_index)
    T, H = alpha.shape
    labels = _token_labels(tokens, T)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("alpha_t = exp(g_t): how much of the state is kept",
                                        "beta_t: how strongly k_t -> v_t is written"))
    for row, (name, values) in enumerate((("alpha", alpha), ("beta", beta)), start=1):
        for h in range(H):
            fig.add_trace(go.Scatter(x=np.arange(T), y=values[:, h], text=labels, mode="lines",
                                     name=f"head {h}", legendgroup=f"head {h}", showlegend=row == 1,
                                     line={"color": _color(h)},
                                     hovertemplate=f"%{{text}}<br>{name}=%{{y:.3f}}<extra>head {h}</extra>"),
                          row=row, col=1)
    fig.update_xaxes(title_text="t", row=2, col=1)
    fig.update_yaxes(title_text="alpha", row=1, col=1)
    fig.update_yaxes(title_text="beta", row=2, col=1)
    fig.update_layout(title="Gates over tokens", hovermode="x unified")
    return fig


def state_norm(norms, tokens: Sequence[str] | None, batch_index: int = 0) -> go.Figure:
    """||S_t||_F over tokens, one line per head. norms [B, T, H] or [T, H]. Traces: H."""
    norms = _numpy(norms, 2, batch_index)
    T, H = norms.shape
    labels = _token_labels(tokens, T)
    fig = go.Figure([go.Scatter(x=np.arange(T), y=norms[:, h], text=labels, mode="lines", name=f"head {h}",
                                line={"color": _color(h)},
                                hovertemplate="%{text}<br>||S||=%{y:.3f}<extra>head " + str(h) + "</extra>")
                     for h in range(H)])
    fig.update_layout(title="State norm ||S_t||_F", xaxis_title="t", yaxis_title="||S_t||_F", hovermode="x unified")
    return fig


def _causal(matrix: np.ndarray) -> np.ndarray:
    """Blank (NaN) above the diagonal: those entries are zero by causality, not learned."""
    matrix = matrix.copy()
    matrix[np.triu_indices_from(matrix, k=1)] = np.nan
    return matrix


def implicit_attention_heatmap(A, tokens: Sequence[str] | None, softmax_map=None,
                               titles: tuple[str, str] = ("Gated DeltaNet head (implicit)", "softmax head")
                               ) -> go.Figure:
    """The token-to-token weights of a GDN head, beside a softmax head's map when given.

    Args: A [T, T] with o_t = sum_i A[t, i] v_i (rows: query t, columns: key i; entries can be
    negative: the delta rule subtracts); softmax_map [T, T] (rows sum to 1) or None.
    Traces: 1, or 2 with the softmax map. The GDN map is centred on zero (red +, blue -).
    """
    A = _numpy(A, 2, 0)
    T = A.shape[0]
    labels = _token_labels(tokens, T)
    panels = [(A, titles[0])] + ([(_numpy(softmax_map, 2, 0), titles[1])] if softmax_map is not None else [])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels], horizontal_spacing=0.12)
    bound = float(np.nanmax(np.abs(A))) or 1.0
    for col, (matrix, _) in enumerate(panels, start=1):
        is_gdn = col == 1
        fig.add_trace(go.Heatmap(z=_causal(matrix), x=labels, y=labels, coloraxis=f"coloraxis{'' if is_gdn else 2}",
                                 hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.4f}<extra></extra>"),
                      row=1, col=col)
        fig.update_yaxes(autorange="reversed", title_text="query t" if is_gdn else None, row=1, col=col)
        fig.update_xaxes(title_text="key i", row=1, col=col)
    fig.update_layout(coloraxis={"colorscale": "RdBu", "reversescale": True, "cmin": -bound, "cmax": bound,
                                 "colorbar": {"title": "A[t, i]", "x": 0.44 if len(panels) > 1 else 1.02}},
                      title="Implicit attention: o_t = sum_i A[t, i] v_i")
    if len(panels) > 1:
        fig.update_layout(coloraxis2={"colorscale": "Viridis", "cmin": 0.0, "cmax": 1.0,
                                      "colorbar": {"title": "softmax", "x": 1.02}})
    return fig


def transition_spectrum(k, beta, allow_neg_eigval: bool, tokens: Sequence[str] | None = None) -> go.Figure:
    """Eigenvalues of the transition I - beta_t k_t k_t^T of one head, without and with negative eigenvalues.

    Args: k [T, K] (one head, L2-normalised), beta [T] as the layer produced it; allow_neg_eigval:
    whether that beta is 2 * sigmoid (range (0, 2)) or sigmoid (range (0, 1)). The figure shows
    both settings for the same write strengths: beta = sigmoid(b) and beta = 2 sigmoid(b).
    For a unit k the spectrum is 1 - beta_t (along k_t) and 1 (K - 1 times); the eigenvalues are
    computed, not assumed. Traces: 4 (smallest and largest eigenvalue per token, per setting).
    """
    k = torch.as_tensor(np.asarray(_numpy(k, 2, 0)))
    beta = torch.as_tensor(np.asarray(_numpy(beta, 1, 0)))
    if k.shape[0] != beta.shape[0]:
        raise ValueError(f"k has {k.shape[0]} steps and beta {beta.shape[0]}; pass one head's k [T, K] and beta [T]")
    T, K = k.shape
    labels = _token_labels(tokens, T)
    sigmoid_beta = beta / 2 if allow_neg_eigval else beta
    settings = (("allow_neg_eigval=False: beta in (0, 1)", sigmoid_beta),
                ("allow_neg_eigval=True: beta in (0, 2)", 2 * sigmoid_beta))
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[s[0] for s in settings])
    outer = k[:, :, None] * k[:, None, :]                                      # [T, K, K]
    for col, (_, b) in enumerate(settings, start=1):
        eigenvalues = torch.linalg.eigvalsh(torch.eye(K) - b[:, None, None] * outer).numpy()  # [T, K] ascending
        for name, values, color in (("smallest", eigenvalues[:, 0], _COLORS[0]),
                                    ("largest", eigenvalues[:, -1], _COLORS[1])):
            fig.add_trace(go.Scatter(x=np.arange(T), y=values, text=labels, mode="markers", name=f"{name} eigenvalue",
                                     legendgroup=name, showlegend=col == 1, marker={"color": color, "size": 5},
                                     hovertemplate="%{text}<br>eigenvalue %{y:.3f}<extra></extra>"),
                          row=1, col=col)
        for level in (-1.0, 0.0, 1.0):
            fig.add_hline(y=level, line={"dash": "dot", "width": 1, "color": "gray"}, row=1, col=col)
        fig.update_xaxes(title_text="t", row=1, col=col)
    fig.update_yaxes(title_text="eigenvalue of I - beta k k^T", range=[-1.1, 1.1], row=1, col=1)
    fig.update_layout(title="Transition spectrum: negative eigenvalues need beta > 1")
    return fig


def _history_columns(history) -> dict[str, list]:
    """A training history as columns: accepts a list of per-eval records or a dict of lists."""
    if isinstance(history, Mapping):
        return {key: list(values) for key, values in history.items()}
    columns: dict[str, list] = {}
    for i, record in enumerate(history):
        for key, value in record.items():
            columns.setdefault(key, [None] * i).append(value)
        for key in columns.keys() - record.keys():
            columns[key].append(None)
    return columns


_CURVE_KINDS = (("loss", ("loss",)), ("accuracy", ("acc", "accuracy")), ("perplexity", ("ppl", "perplexity")))


def training_curves(history, title: str = "Training curves") -> go.Figure:
    """Loss, accuracy and perplexity against step, train and val, one row per quantity present.

    `history`: a list of records such as {"step": 100, "train_loss": 2.1, "val_loss": 2.3,
    "val_acc": 0.41, "val_ppl": 9.9} (missing keys are gaps), or a dict of equal-length lists.
    A column belongs to a row when its name, without a "train_"/"val_" prefix, is one of
    loss | acc | accuracy | ppl | perplexity. Traces: one per such column.
    """
    columns = _history_columns(history)
    if "step" not in columns:
        raise ValueError(f"history needs a 'step' entry; got keys {sorted(columns)}")
    steps = columns["step"]
    split_names = {key: key.split("_", 1) for key in columns if key.startswith(("train_", "val_"))}
    rows = []
    for kind, suffixes in _CURVE_KINDS:
        names = [key for key, (_, quantity) in split_names.items() if quantity in suffixes]
        if names:
            rows.append((kind, sorted(names, key=lambda key: key.startswith("val"))))
    if not rows:
        raise ValueError(f"history has no train_/val_ loss, acc or ppl columns; got keys {sorted(columns)}")
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[kind for kind, _ in rows])
    for row, (kind, names) in enumerate(rows, start=1):
        for name in names:
            split = name.split("_", 1)[0]
            pairs = [(s, v) for s, v in zip(steps, columns[name], strict=True) if v is not None]
            fig.add_trace(go.Scatter(x=[s for s, _ in pairs], y=[v for _, v in pairs], name=split,
                                     legendgroup=split, showlegend=row == 1,
                                     mode="lines" if split == "train" else "lines+markers",
                                     line={"color": _COLORS[0] if split == "train" else _COLORS[1]},
                                     hovertemplate=f"step %{{x}}<br>{name}=%{{y:.4f}}<extra></extra>"),
                          row=row, col=1)
        fig.update_yaxes(title_text=kind, type="log" if kind == "perplexity" else None, row=row, col=1)
    fig.update_xaxes(title_text="step", row=len(rows), col=1)
    fig.update_layout(title=title, height=250 + 200 * len(rows))
    return fig


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], x_title: str, y_title: str,
              title: str = "", log_x: bool = False, markers: bool = True) -> go.Figure:
    """One line per named series: {"GDN": (xs, ys), "transformer": (xs, ys)} -> Figure (a trace each).

    The generic helper for accuracy against sequence length, state size, step, and the like.
    """
    fig = go.Figure([go.Scatter(x=list(xs), y=list(ys), name=name, mode="lines+markers" if markers else "lines",
                                line={"color": _color(i)})
                     for i, (name, (xs, ys)) in enumerate(series.items())])
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, xaxis_type="log" if log_x else None)
    return fig


def saved_memory_bars(saved: Mapping[str, Mapping[str, float]], title: str = "") -> go.Figure:
    """Bytes kept for the backward per token, by module, one bar group per module and a bar per model:
    {"gdn": {"model.layers.*.attn": 9816.0, ...}, "transformer": {...}} (`gdn_lab.memory.over_layers` of
    `bytes_per_token`; train_throughput's "saved_bytes_per_token"), in KiB; the model's own forward
    ("": the loss and the logits) is labelled "model (loss, logits)"."""
    parts = list(dict.fromkeys(part for per_model in saved.values() for part in per_model))
    labels = [part or "model (loss, logits)" for part in parts]
    fig = go.Figure([go.Bar(x=labels, y=[per_model.get(part, 0.0) / 1024 for part in parts], name=name,
                            marker_color=_color(i)) for i, (name, per_model) in enumerate(saved.items())])
    fig.update_layout(title=title, barmode="group", xaxis_title="module (summed over layers)",
                      yaxis_title="KiB per token kept for the backward")
    return fig


def seed_summary_plot(rows: Sequence[Mapping], x: str, x_title: str, y_title: str, by: str = "model",
                      title: str = "", log_x: bool = False) -> go.Figure:
    """Rows of `gdn_lab.grid.over_seeds` (one per point: labels, "mean", "min", "max", "n") as one
    line per `rows[by]`: the mean over seeds at each `x`, with bars from the worst to the best seed
    (a bar that overlaps another line's point is a tie at that x)."""
    groups: dict[str, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(str(row[by]), []).append(row)
    fig = go.Figure()
    for i, (name, group) in enumerate(groups.items()):
        group = sorted((r for r in group if r["mean"] is not None), key=lambda r: r[x])
        fig.add_trace(go.Scatter(
            x=[r[x] for r in group], y=[r["mean"] for r in group], name=name, mode="lines+markers",
            line={"color": _color(i)}, customdata=[[r["n"], r["min"], r["max"]] for r in group],
            error_y={"type": "data", "symmetric": False, "array": [r["max"] - r["mean"] for r in group],
                     "arrayminus": [r["mean"] - r["min"] for r in group]},
            hovertemplate="%{y:.3f} (seeds: %{customdata[0]}, range %{customdata[1]:.3f} to %{customdata[2]:.3f})"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, xaxis_type="log" if log_x else None)
    return fig


def passkey_heatmap(tables: Mapping[str, Sequence[dict]], value: str = "accuracy",
                    title: str = "Passkey retrieval") -> go.Figure:
    """Accuracy heatmaps (needle depth x context length), one panel per model, one colour scale.

    `tables`: {model name: `gdn_lab.longctx.passkey_accuracy` records}, shaped by
    `longctx.passkey_grid` (a missing cell is blank). Traces: one Heatmap per model.
    """
    fig = make_subplots(rows=1, cols=len(tables), subplot_titles=list(tables), shared_yaxes=True,
                        horizontal_spacing=0.04)
    for column, (name, records) in enumerate(tables.items(), start=1):
        lengths, depths, grid = passkey_grid(records, value)
        fig.add_heatmap(x=[str(n) for n in lengths], y=[f"{d:.2f}" for d in depths], z=grid, zmin=0, zmax=1,
                        colorscale="Viridis", showscale=column == len(tables), name=name,
                        text=[[f"{v:.2f}" for v in row] for row in grid], texttemplate="%{text}",
                        hovertemplate="length %{x}<br>depth %{y}<br>" + value + " %{z:.2f}<extra>" + name + "</extra>",
                        row=1, col=column)
        fig.update_xaxes(title_text="context length (tokens)", type="category", row=1, col=column)
    fig.update_yaxes(title_text="needle depth", row=1, col=1)
    fig.update_layout(title=title, height=380, width=max(500, 420 * len(tables)))
    return fig


def sweep_figures(result, window: float = 0.3) -> dict[str, go.Figure]:
    """Figures of a `gdn_lab.sweep.SweepResult` (variants that finished): {"val_loss": validation
    loss against training tokens, one line per variant (mean over its seeds at the chosen rate; the
    last `window` of training shaded, where `sweep.rank_stability` looks); "lr_grid": final
    validation loss against learning rate at the first seed, one line per variant; "placement":
    mean final loss (bars: worst to best seed) against attention share beside the layer layout of
    every variant, best first; "throughput": training tokens/s and peak GPU memory (training
    seconds on the CPU) per variant, of its representative run}."""
    summaries = result.summaries()
    names = result.ranking()
    ranked = [result[name] for name in names]
    means = [summaries[name]["mean"] for name in names]
    mean_curves = {name: result.mean_curve(name) for name in names}
    curves = line_plot({name: ([r["tokens"] for r in curve], [r["val_loss"] for r in curve])
                        for name, curve in mean_curves.items()},
                       "training tokens", "validation loss",
                       title="Validation loss at equal tokens (mean over seeds, each variant at its best rate)")
    last = max((r["tokens"] for curve in mean_curves.values() for r in curve), default=0)
    if last:
        curves.add_vrect(x0=(1 - window) * last, x1=last, fillcolor="grey", opacity=0.12, line_width=0,
                         annotation_text=f"last {window:.0%}", annotation_position="top left")

    first_seed = min((run.seed for run in result.runs), default=0)
    grid_lines = {}
    for name in names:
        points = sorted((run.lr, run.final_val_loss) for run in result.runs_of(name)
                        if run.seed == first_seed and run.status == "ok")
        grid_lines[name] = ([lr for lr, _ in points], [loss for _, loss in points])
    lr_grid = line_plot(grid_lines, "peak learning rate", "final validation loss", log_x=True,
                        title="Learning-rate grid (first seed; a missing point diverged)")

    placement = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.15,
                              subplot_titles=("final validation loss vs attention share",
                                              "layer layout, best first (dark: attention; mid: window)"))
    placement.add_trace(go.Scatter(
        x=[100 * v.attention_ratio for v in ranked], y=means, mode="markers+text",
        error_y={"type": "data", "symmetric": False,
                 "array": [summaries[n]["max"] - summaries[n]["mean"] for n in names],
                 "arrayminus": [summaries[n]["mean"] - summaries[n]["min"] for n in names]},
        text=names, textposition="top center", customdata=[f"{v.layout}, {summaries[v.name]['n']} seed(s)"
                                                           for v in ranked],
        hovertemplate="%{text} %{customdata}<br>%{x:.0f}% attention<br>val loss %{y:.4f}<extra></extra>",
        showlegend=False), row=1, col=1)
    depth = max((len(v.layout) for v in ranked), default=0)
    placement.add_trace(go.Heatmap(
        z=[[{"A": 1.0, "S": 0.5}.get(c, 0.0) for c in v.layout] + [None] * (depth - len(v.layout)) for v in ranked],
        x=list(range(depth)), y=[f"{v.name} ({mean:.3f})" for v, mean in zip(ranked, means)],
        colorscale=[[0.0, "#dbe7f3"], [1.0, "#1f3b73"]], zmin=0, zmax=1, showscale=False, xgap=2, ygap=2,
        hovertemplate="%{y}<br>layer %{x}<extra></extra>"), row=1, col=2)
    placement.update_xaxes(title_text="attention layers (%)", row=1, col=1)
    placement.update_yaxes(title_text="final validation loss", row=1, col=1)
    placement.update_xaxes(title_text="layer", dtick=1, row=1, col=2)
    placement.update_yaxes(autorange="reversed", row=1, col=2)
    placement.update_layout(title="Where attention goes and what it buys", height=420 + 12 * len(ranked))

    on_gpu = any(v.peak_memory_mib is not None for v in ranked)
    second = ("peak GPU memory (MiB)", "peak_memory_mib") if on_gpu else ("training seconds", "train_seconds")
    throughput = make_subplots(rows=1, cols=2, subplot_titles=("training tokens/s", second[0]))
    throughput.add_trace(go.Bar(x=names, y=[v.tokens_per_second for v in ranked], showlegend=False), row=1, col=1)
    throughput.add_trace(go.Bar(x=names, y=[getattr(v, second[1]) for v in ranked], showlegend=False), row=1, col=2)
    throughput.update_layout(title="Throughput and memory per variant (best loss first)")
    return {"val_loss": curves, "lr_grid": lr_grid, "placement": placement, "throughput": throughput}


def scaling_figure(rows: Sequence[Mapping], fits: Mapping[str, dict], x: str = "params", x_title: str = "",
                   title: str = "", by: str = "arch") -> go.Figure:
    """Mean validation loss over seeds against `x` (log axis; bars: worst to best seed), one line per
    architecture (`seed_summary_plot` of `gdn_lab.scaling.add_flops` rows), with its saturating fit
    (`scaling.fit_architectures`) drawn dotted across the measured range. Traces: one line per
    architecture, then one fit per architecture whose fit succeeded."""
    figure = seed_summary_plot(rows, x, x_title or x, "final validation loss", by=by, title=title, log_x=True)
    for i, arch in enumerate(dict.fromkeys(str(row[by]) for row in rows)):
        entry = fits.get(arch, {})
        if "error" in entry or not entry:
            continue
        fit = fit_of(entry)
        mine = sorted((r for r in rows if str(r[by]) == arch and r["mean"] is not None), key=lambda r: r["params"])
        # the fit is in parameters; x may be FLOPs: map a log grid of sizes onto x through the measured points
        params = np.exp(np.linspace(math.log(mine[0]["params"]), math.log(mine[-1]["params"]), 50))
        xs = np.exp(np.interp(np.log(params), np.log([r["params"] for r in mine]), np.log([r[x] for r in mine])))
        figure.add_trace(go.Scatter(
            x=xs.tolist(), y=fit.predict(params.tolist()), mode="lines", hoverinfo="skip",
            line={"dash": "dot", "color": _color(i)}, name=f"{arch} fit: alpha {fit.alpha:.2f}, c {fit.c:.2f}"))
    return figure


def plotly_cache_dir() -> pathlib.Path:
    """Where the one shared copy of plotly.js lives: $GDN_LAB_CACHE, else ~/.cache/gdn_lab."""
    return pathlib.Path(os.environ.get("GDN_LAB_CACHE") or pathlib.Path.home() / ".cache" / "gdn_lab")


def _link_plotly_js(folder: pathlib.Path) -> None:
    """Put `plotly.min.js` (~4.8 MB) in `folder` as a hard link to one cached copy per plotly version,
    so a sweep of many run folders stores plotly.js once. Where linking fails (another filesystem, no
    writable cache) the folder stays without it and `write_html` writes its own copy, as before."""
    import plotly
    from plotly.offline import get_plotlyjs

    from .results import atomic_path

    target = folder / "plotly.min.js"
    if target.exists():
        return
    cached = plotly_cache_dir() / f"plotly-{plotly.__version__}.min.js"
    try:
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cached) as tmp:
                tmp.write_text(get_plotlyjs(), encoding="utf-8")
        os.link(cached, target)
    except OSError:
        pass


def save_html(fig: go.Figure, path: str | os.PathLike) -> pathlib.Path:
    """Write `fig` as a static HTML page that loads `plotly.min.js` from its own folder.

    Every page in a folder shares that one file, and every folder links the same cached copy
    (`_link_plotly_js`), so figures render offline without a copy of plotly.js per page or per run.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _link_plotly_js(path.parent)
    fig.write_html(path, include_plotlyjs="directory", full_html=True, auto_play=False)
    return path
