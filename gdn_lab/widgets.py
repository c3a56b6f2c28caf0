"""ipywidgets panels: explore a probe (layer, head, time, view) and edit a config dataclass.

`ipywidgets` is imported inside the functions, so `import gdn_lab.widgets` works on a machine
without it and without a display. Every control carries a stable `description` (what a browser
test looks for), and callbacks never swallow exceptions: inside a notebook an error in a
callback shows its traceback in the panel's output area.

    panel = config_panel(ModelConfig())          # display(panel) in a notebook cell
    model_config = panel.value                   # a new ModelConfig, or ConfigError

    explorer = probe_explorer(probe, tokens)     # display(explorer); explorer.figure is what it shows
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from . import viz
from .config import BACKENDS, ConfigError, parse_literal
from .probe import Probe, implicit_attention

EXPLORER_VIEWS = ("gates", "state norm", "state S_t", "implicit attention")


class _Panel:
    """A widget tree that displays itself: `display(panel)` or a panel as a cell's last line."""

    widget: Any

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _type_name(annotation) -> str:
    """'int' for both `int` and the string annotation "int" (modules with postponed annotations)."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


class ConfigPanel(_Panel):
    """Widgets for the fields of a config dataclass; `.value` builds the edited config.

    One control per field, its `description` the field name: Checkbox for bool, IntText for int,
    FloatText for float, Dropdown where `choices` names the options, Text for the rest (a Python
    literal such as `(1, 3)` or `None`, or a bare word such as `sparse`). The `error` line under
    the controls shows the ConfigError of the current values, or is empty when they are valid;
    any other exception while checking shows its traceback in the output area below.
    """

    def __init__(self, config, fields: Sequence[str] | None = None, choices: Mapping[str, Sequence] | None = None):
        import ipywidgets

        if not dataclasses.is_dataclass(config) or isinstance(config, type):
            raise TypeError(f"config_panel needs a config instance such as ModelConfig(); got {config!r}")
        self.config = config
        known = {f.name: f for f in dataclasses.fields(config)}
        fields = list(known) if fields is None else list(fields)
        unknown = [name for name in fields if name not in known]
        if unknown:
            raise ConfigError(f"{type(config).__name__} has no fields {unknown}; choose from {list(known)}")
        choices = dict(choices or ({"backend": BACKENDS} if "backend" in known else {}))
        style = {"description_width": "initial"}
        self.controls: dict[str, Any] = {}
        self._literal_fields: set[str] = set()
        for name in fields:
            value, kind = getattr(config, name), _type_name(known[name].type)
            if name in choices:
                control = ipywidgets.Dropdown(options=list(choices[name]), value=value, description=name, style=style)
            elif kind == "bool":
                control = ipywidgets.Checkbox(value=value, description=name, style=style, indent=False)
            elif kind == "int":
                control = ipywidgets.IntText(value=value, description=name, style=style)
            elif kind == "float":
                control = ipywidgets.FloatText(value=value, description=name, style=style)
            elif kind == "str":
                control = ipywidgets.Text(value=value, description=name, style=style)
            else:
                control = ipywidgets.Text(value=repr(value), description=name, style=style)
                self._literal_fields.add(name)
            control.observe(self._refresh, names="value")
            self.controls[name] = control
        self.error = ipywidgets.HTML(value="", description="error", style=style)
        self.output = ipywidgets.Output()
        self.widget = ipywidgets.VBox([ipywidgets.Label(type(config).__name__), *self.controls.values(), self.error,
                                       self.output])

    def _field_value(self, name: str) -> Any:
        value = self.controls[name].value
        return parse_literal(value) if name in self._literal_fields else value

    def build(self):
        """The config with the panel's values (validated by the dataclass): raises ConfigError when invalid."""
        return dataclasses.replace(self.config, **{name: self._field_value(name) for name in self.controls})

    @property
    def value(self):
        """`build()`: the edited config."""
        return self.build()

    def check(self) -> str:
        """The ConfigError line of the current values, or "" when they make a valid config."""
        try:
            self.build()
        except ConfigError as error:
            return str(error)
        return ""

    def _refresh(self, change=None) -> None:
        with self.output:
            message = self.check()
            self.error.value = f"<span style='color:#b00020'>{message}</span>" if message else ""


def config_panel(config, fields: Sequence[str] | None = None, choices: Mapping[str, Sequence] | None = None
                 ) -> ConfigPanel:
    """A panel editing `config` (a ModelConfig, TrainConfig or any dataclass); `.value` -> new config.

    `fields`: which fields to show (default all); `choices`: {field: options} shown as dropdowns
    (default: `backend` from gdn_lab.config.BACKENDS when the config has one).
    """
    return ConfigPanel(config, fields=fields, choices=choices)


class ProbeExplorer(_Panel):
    """Pick layer, head, time and view of a Probe; the figure below redraws on every change.

    Controls (descriptions): `layer`, `head`, `time` (a kept state step, or any step when no
    states were kept), `view` (one of EXPLORER_VIEWS). `figure` is the go.Figure on display.
    Views: gates (alpha, beta of every head; the time marked), state norm (every head), state
    S_t (the chosen head at the chosen kept step), implicit attention (the chosen head; the
    row of the chosen time marked).
    """

    def __init__(self, probe: Probe, tokens: Sequence[str] | None = None, batch_index: int = 0):
        import ipywidgets

        self.probe, self.tokens, self.batch_index = probe, tokens, batch_index
        first = probe[min(probe.layers)]
        T, H = first.q.shape[1], first.q.shape[2]
        views = [v for v in EXPLORER_VIEWS if v != "state S_t" or first.state_steps]
        times = list(first.state_steps) if first.state_steps else list(range(T))
        style = {"description_width": "initial"}
        self.layer = ipywidgets.Dropdown(options=sorted(probe.layers), description="layer", style=style)
        self.head = ipywidgets.IntSlider(value=0, min=0, max=H - 1, description="head", style=style)
        self.time = ipywidgets.SelectionSlider(options=times, value=times[-1], description="time", style=style)
        self.view = ipywidgets.Dropdown(options=views, value=views[0], description="view", style=style)
        self.output = ipywidgets.Output()
        for control in (self.layer, self.head, self.time, self.view):
            control.observe(self.redraw, names="value")
        self.widget = ipywidgets.VBox([ipywidgets.HBox([self.layer, self.head, self.view]), self.time, self.output])
        self.figure = None
        self.redraw()

    def build_figure(self):
        """The go.Figure for the current layer, head, time and view."""
        p = self.probe[self.layer.value]
        head, t, view, b = self.head.value, self.time.value, self.view.value, self.batch_index
        if view == "state S_t":
            index = p.state_steps.index(t)
            fig = viz.state_heatmap(p.states[:, index:index + 1], self.tokens, head, steps=[t], batch_index=b)
        elif view == "implicit attention":
            fig = viz.implicit_attention_heatmap(implicit_attention(p, head, batch_index=b), self.tokens)
            fig.add_hline(y=t, line={"color": "black", "width": 1})
        elif view == "gates":
            fig = viz.gate_traces(p.alpha, p.beta, self.tokens, batch_index=b)
            fig.add_vline(x=t, row="all", col="all", line={"color": "black", "width": 1, "dash": "dot"})
        else:
            fig = viz.state_norm(p.state_norm, self.tokens, batch_index=b)
            fig.add_vline(x=t, line={"color": "black", "width": 1, "dash": "dot"})
        fig.update_layout(title=f"layer {p.layer}: {fig.layout.title.text}")
        return fig

    def redraw(self, change=None) -> None:
        """Rebuild the figure and show it in the output area. An exception is not caught: under
        IPython the output area shows its traceback (ipywidgets.Output), elsewhere it propagates."""
        from IPython.display import display

        self.output.clear_output(wait=True)
        with self.output:
            self.figure = self.build_figure()
            display(self.figure)


def probe_explorer(probe: Probe, tokens: Sequence[str] | None = None, batch_index: int = 0) -> ProbeExplorer:
    """An interactive view of `probe` (see ProbeExplorer); display it in a notebook cell."""
    return ProbeExplorer(probe, tokens, batch_index=batch_index)
