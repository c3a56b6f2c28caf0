"""gdn_lab.ablations (the variants, the paper's table, the comparison) and gdn_lab.protocol (a rate
tuned at the first seed, the other seeds at that rate) on tiny CPU runs."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from gdn_lab import ablations, recall, stats, tasks
from gdn_lab.config import ConfigError, ModelConfig, TrainConfig
from gdn_lab.data import lm_data
from gdn_lab.protocol import lr_grid, total, tune_then_seed

BASE = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, expand_v=1.0,
                   backend="torch")


def changed_fields(a: ModelConfig, b: ModelConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)}


def test_each_variant_changes_one_component():
    variants = ablations.ablation_variants(BASE, fixed_beta=0.5)
    expected = {"no decay (DeltaNet)": {"use_decay"}, "no short conv": {"use_short_conv"},
                "no output gate": {"use_gate"}, "negative eigenvalues": {"allow_neg_eigval"},
                "head_dim x0.5": {"head_dim", "num_heads"}, "head_dim x2": {"head_dim", "num_heads"},
                "expand_v x2": {"expand_v"}, "slow decay init": {"dt_min", "dt_max"},
                "fixed beta 0.5": {"fixed_beta"}}
    assert list(variants)[0] == ablations.BASE and set(variants) == {ablations.BASE, *expected}
    for name, fields in expected.items():
        assert changed_fields(BASE, variants[name]) == fields, name
    # the head-dim variants keep num_heads x head_dim (the projections) and halve / double the state
    for name, factor in (("head_dim x0.5", 0.5), ("head_dim x2", 2)):
        config = variants[name]
        assert config.num_heads * config.head_dim == BASE.num_heads * BASE.head_dim
        assert ablations.state_size(config) == factor * ablations.state_size(BASE)
    assert ablations.state_size(variants["expand_v x2"]) == 2 * ablations.state_size(BASE)


def test_only_keeps_the_base_and_names_unknown_variants():
    variants = ablations.ablation_variants(BASE, only=["no short conv"])
    assert list(variants) == [ablations.BASE, "no short conv"]
    with pytest.raises(ConfigError, match="no variants named"):
        ablations.ablation_variants(BASE, only=["no such thing"])
    with pytest.raises(ConfigError, match="pure GDN"):
        ablations.ablation_variants(BASE.replace(attn_layers=(1,)))


def test_paper_table_as_transcribed():
    table = ablations.GDN_PAPER_ABLATIONS
    assert table["reference"] == (27.35, 47.26)
    assert table["rows"]["w. naive Delta Rule"] == (30.87, 45.12)
    assert table["rows"]["w/o. Short Conv"] == (28.95, 46.16) and table["rows"]["w/o. Output Gate"] == (29.12, 45.46)
    assert table["rows"]["w. Head Dim 64"] == (28.31, 46.35) and table["rows"]["w. Head Dim 256"] == (27.13, 47.38)
    assert set(ablations.PAPER_ROW.values()) <= set(table["rows"])


def row(variant: str, values: list[float]) -> dict:
    return {"variant": variant, **stats.summarize(values), "chosen_lr": 1e-3}


def test_compare_with_paper_reads_directions_and_ties():
    lm = [row("GDN", [2.00, 2.02]), row("no decay (DeltaNet)", [2.30, 2.31]), row("no short conv", [2.01, 2.03]),
          row("head_dim x2", [1.80, 1.81]), row("head_dim x0.5", [1.70, 1.71]), row("slow decay init", [2.5, 2.6])]
    mqar = [row("GDN", [0.5, 0.6]), row("no decay (DeltaNet)", [0.9, 0.95])]
    rows = {r["variant"]: r for r in ablations.compare_with_paper(lm, mqar)}
    assert set(rows) == {"no decay (DeltaNet)", "no short conv", "head_dim x2", "head_dim x0.5", "slow decay init"}
    no_decay = rows["no decay (DeltaNet)"]
    assert no_decay["paper_row"] == "w. naive Delta Rule" and no_decay["paper_delta_ppl"] == pytest.approx(3.52)
    assert no_decay["paper_log_ppl_ratio"] == pytest.approx(math.log(30.87 / 27.35))
    assert no_decay["lm_delta"] == pytest.approx(0.295) and no_decay["lm_verdict"] == "worse"
    assert no_decay["agrees"] is True and no_decay["mqar_verdict"] == "better"
    assert rows["no short conv"]["lm_verdict"] == "tie" and rows["no short conv"]["agrees"] is None
    assert rows["head_dim x2"]["agrees"] is True  # the paper's head dim 256 beats its 128: better here too
    assert rows["head_dim x0.5"]["agrees"] is False  # the paper's head dim 64 is worse: better here
    assert rows["slow decay init"]["paper_row"] is None and rows["slow decay init"]["agrees"] is None
    text = ablations.comparison_markdown(list(rows.values())) + ablations.findings_markdown(list(rows.values()))
    assert "w. naive Delta Rule" in text and "not ablated" in text and "same direction for 2" in text


def test_tune_then_seed_on_mqar(tmp_path):
    data = tasks.TaskData("mqar", vocab_size=32, seq_len=16, num_kv_pairs=2)
    config = BASE.replace(vocab_size=32)
    points = [({"variant": "GDN"}, config, data), ({"variant": "no decay"}, config.replace(use_decay=False), data)]
    train_config = TrainConfig(steps=3, batch_size=4, warmup_steps=1, eval_every=3, eval_batches=1, device="cpu")
    score = recall.evaluate_task
    result = tune_then_seed(points, train_config, tmp_path, [1e-3, 3e-3], [0, 1], metric="accuracy", score=score)
    assert len(result.records) == 2 * 2 + 2 * 1  # the grid at seed 0, then one more seed at the chosen rate
    for point in ("GDN", "no decay"):
        grid_runs = {r["lr"]: r["accuracy"] for r in result.records if r["variant"] == point and r["seed"] == 0}
        chosen = result.row(variant=point)["chosen_lr"]
        assert grid_runs[chosen] == max(grid_runs.values())
        (extra,) = [r for r in result.records if r["variant"] == point and r["seed"] == 1]
        assert extra["lr"] == chosen
        assert result.row(variant=point)["seeds"] == [0, 1] and result.row(variant=point)["n"] == 2
    saved = json.loads(next(tmp_path.glob("variant-GDN/lr*_seed1/config.json")).read_text())
    assert saved["data"]["seed"] == 1  # the extra seed draws other task batches
    assert set(lr_grid(result, "variant")) == {"GDN", "no decay"} and total(result, "tokens") > 0
    again = tune_then_seed(points, train_config, tmp_path, [1e-3, 3e-3], [0, 1], metric="accuracy", score=score)
    assert again.table == result.table  # finished trials are read back, not retrained


def test_tune_then_seed_extends_the_first_seeds_grid_past_its_better_edge(tmp_path):
    data = tasks.TaskData("mqar", vocab_size=32, seq_len=16, num_kv_pairs=2)
    points = [({"variant": "GDN"}, BASE.replace(vocab_size=32), data)]
    train_config = TrainConfig(steps=3, batch_size=4, warmup_steps=1, eval_every=3, eval_batches=1, device="cpu")
    result = tune_then_seed(points, train_config, tmp_path, [1e-3, 3e-3], [0, 1], metric="final_val_loss",
                            higher_is_better=False, extend_grid=1)
    losses = {r["lr"]: r["final_val_loss"] for r in result.records if r["seed"] == 0}
    better = min((1e-3, 3e-3), key=losses.get)  # a loss never ties: one edge always wins
    assert set(losses) == {1e-3, 3e-3, 3e-4 if better == 1e-3 else 1e-2}
    chosen = result.row(variant="GDN")["chosen_lr"]
    assert losses[chosen] == min(losses.values())
    assert [r["lr"] for r in result.records if r["seed"] == 1] == [chosen]


def test_tune_then_seed_moves_the_text_shuffle_and_takes_a_train_config_per_point(tmp_path):
    data = lm_data("pydoc", "byte", seq_len=16, max_chars=20_000)
    config = BASE.replace(vocab_size=256)
    short = TrainConfig(steps=2, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1, device="cpu")
    points = [({"size": "a"}, config, data, short), ({"size": "b"}, config.replace(hidden_size=48), data,
                                                     short.replace(steps=3))]
    result = tune_then_seed(points, short, tmp_path, [1e-3], [5, 6], metric="final_val_loss",
                            higher_is_better=False)
    assert {r["size"]: r["steps"] for r in result.records if r["seed"] == 5} == {"a": 2, "b": 3}
    saved = json.loads(next(tmp_path.glob("size-a/lr*_seed6/config.json")).read_text())
    assert saved["data"]["seed"] == data.seed + 1  # the second seed reads the windows in another order
    with pytest.raises(ConfigError, match="same label names"):
        tune_then_seed([points[0], ({"other": "x"}, config, data)], short, tmp_path, [1e-3], [0], "final_val_loss")
