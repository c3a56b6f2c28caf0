"""The widgets import without a display or ipywidgets, edit configs, and redraw the probe explorer."""
import os
import subprocess
import sys

import pytest
import torch

from gdn_lab.config import ConfigError, ModelConfig, TrainConfig
from gdn_lab.models import build_model
from gdn_lab.probe import capture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_widgets_module_imports_without_a_display_or_ipywidgets():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    code = ("import sys; sys.modules['ipywidgets'] = None\n"      # any `import ipywidgets` now fails
            "import gdn_lab.widgets as w\n"
            "assert callable(w.config_panel) and callable(w.probe_explorer)\n"
            "try:\n    w.config_panel(w.BACKENDS)\nexcept ImportError:\n    print('lazy')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy"


def test_config_panel_round_trips_a_model_config():
    from gdn_lab.widgets import config_panel

    config = ModelConfig(hidden_size=64, num_layers=4, attn_layers=(3,))
    panel = config_panel(config)
    assert panel.value == config and panel.error.value == ""
    assert {c.description for c in panel.controls.values()} == set(panel.controls)   # stable descriptions
    assert type(panel.controls["use_gate"]).__name__ == "Checkbox"
    assert panel.controls["backend"].options == ("auto", "fla", "torch")

    panel.controls["num_layers"].value = 12
    panel.controls["attn_layers"].value = "sparse"
    panel.controls["attn_num_kv_heads"].value = "2"
    panel.controls["expand_v"].value = 1.0
    assert panel.value == config.replace(num_layers=12, attn_layers=(5, 11), attn_num_kv_heads=2, expand_v=1.0)
    assert panel.error.value == ""


def test_config_panel_shows_the_config_error_line():
    from gdn_lab.widgets import config_panel

    panel = config_panel(TrainConfig(), fields=["steps", "batch_size", "grad_accum"])
    assert list(panel.controls) == ["steps", "batch_size", "grad_accum"]
    panel.controls["grad_accum"].value = 3
    assert "batch_size=8 is not divisible by grad_accum=3" in panel.error.value
    with pytest.raises(ConfigError, match="grad_accum=3"):
        panel.build()
    panel.controls["batch_size"].value = 9
    assert panel.error.value == "" and panel.value.batch_size == 9
    with pytest.raises(ConfigError, match="no fields"):
        config_panel(TrainConfig(), fields=["learning_rate"])


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=2, head_dim=8,
                                    backend="torch")).eval()
    return capture(model, torch.randint(0, 32, (1, 24), generator=torch.Generator().manual_seed(0)),
                   state_steps=[5, 23])


def test_probe_explorer_redraws_on_every_control(probe):
    from gdn_lab.widgets import EXPLORER_VIEWS, probe_explorer

    tokens = [f"tok{t}" for t in range(24)]
    explorer = probe_explorer(probe, tokens)
    assert [c.description for c in (explorer.layer, explorer.head, explorer.time, explorer.view)] == \
        ["layer", "head", "time", "view"]
    assert explorer.view.options == EXPLORER_VIEWS and explorer.time.options == (5, 23)
    shown = [explorer.figure.to_json()]
    for control, value in ((explorer.view, "state S_t"), (explorer.head, 1), (explorer.time, 5),
                           (explorer.layer, 1), (explorer.view, "implicit attention"), (explorer.view, "state norm")):
        control.value = value
        assert explorer.figure.to_json() not in shown, f"{control.description}={value} did not change the figure"
        shown.append(explorer.figure.to_json())
        assert explorer.figure.layout.title.text.startswith(f"layer {explorer.layer.value}")


def test_probe_explorer_callbacks_do_not_swallow_errors(probe, monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from gdn_lab.widgets import probe_explorer

    explorer = probe_explorer(probe)

    def broken():
        raise RuntimeError("figure builder failed")

    monkeypatch.setattr(explorer, "build_figure", broken)
    monkeypatch.setattr("ipywidgets.widgets.widget_output.get_ipython", lambda: None)
    with pytest.raises(RuntimeError, match="figure builder failed"):        # outside IPython: raised
        explorer.head.value = 1
    monkeypatch.setattr("ipywidgets.widgets.widget_output.get_ipython", InteractiveShell.instance)
    explorer.head.value = 0                                                  # in IPython: traceback shown
    shown = capsys.readouterr().out
    assert "RuntimeError" in shown and "figure builder failed" in shown
