"""Every numbered notebook, executed at smoke size through the runner, judged by its metrics.json.

One runner call executes them all (session fixture); then one test per notebook asserts on the
numbers that notebook wrote. A notebook without an entry in CHECKS fails: running is not passing.
"""
from __future__ import annotations

import math

import pytest
import yaml
from conftest import NOTEBOOKS_DIR

from gdn_lab.runner import NOTEBOOK_GLOB, run_notebooks

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob(NOTEBOOK_GLOB))
SMOKE = yaml.safe_load((NOTEBOOKS_DIR / "ci_params.yml").read_text())

pytestmark = [pytest.mark.notebooks, pytest.mark.timeout(1800)]


def check_00_quickstart(m: dict) -> None:
    assert m["device"] == "cpu" and m["backend"] == "torch"
    assert m["logits_shape"] == [1, m["prompt_tokens"], m["vocab_size"]]
    # an untrained model predicts nearly uniformly: cross-entropy ~ ln(vocab)
    assert abs(m["loss_at_init"] - math.log(m["vocab_size"])) < 0.1, m["loss_at_init"]
    assert m["generated_tokens"] == SMOKE["00_quickstart"]["max_new_tokens"]
    assert m["greedy_matches_parallel"] is True
    family = m["family_params"]
    assert m["params"] == family["gdn"] > 0
    # per-layer parameter counts do not depend on position: a hybrid interpolates linearly
    layers, attn = m["num_layers"], m["hybrid_attn_layers"]
    assert 0 < attn < layers
    assert family["hybrid"] * layers == family["gdn"] * (layers - attn) + family["transformer"] * attn


CHECKS = {
    "00_quickstart": check_00_quickstart,
}


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """One runner call for every notebook that has smoke parameters (a missing entry fails its own test)."""
    runnable = [path for path in NOTEBOOKS if path.stem in SMOKE]
    runs = run_notebooks(runnable, "smoke", tmp_path_factory.mktemp("smoke"), progress=False) if runnable else []
    return {run.stem: run for run in runs}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_at_smoke_size(notebook, smoke_runs):
    assert notebook.stem in SMOKE, f"add {notebook.stem}'s tiny CPU parameters to notebooks/ci_params.yml"
    assert notebook.stem in CHECKS, f"add a CHECKS entry for {notebook.stem} to tests/test_notebooks.py"
    run = smoke_runs[notebook.stem]
    assert run.status == "ok", run.error
    CHECKS[notebook.stem](run.metrics)
