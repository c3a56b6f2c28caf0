"""CPU: the timing logic of benchmarks/train_throughput.py (rounds in rotated order, median round)."""
from __future__ import annotations

import json
import pathlib

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("train_throughput")


def cell(model, context, ms, round_index, status="ok", peak=None):
    return {"model": model, "context": context, "batch": 1, "tokens_per_step": 1000, "world_size": 1,
            "status": status, "ms_per_step": ms if status == "ok" else None,
            "tokens_per_s": 1000 / ms * 1e3 if status == "ok" else None, "peak_mib": peak, "round": round_index}


def test_every_round_starts_with_another_model(throughput):
    names = ["gdn", "fla", "transformer"]
    orders = [throughput.rotated(names, r) for r in range(4)]
    assert [order[0] for order in orders] == ["gdn", "fla", "transformer", "gdn"]
    assert all(sorted(order) == sorted(names) for order in orders)


def test_a_cell_reports_its_median_round(throughput):
    cells = [cell("gdn", 64, ms, r, peak=p) for r, (ms, p) in enumerate([(10.0, 5), (30.0, 7), (12.0, 6)])]
    cells += [cell("fla", 64, 11.0, 0), cell("fla", 64, 0, 1, status="oom"), cell("fla", 64, 11.0, 2)]
    gdn, fla = throughput.median_records(cells, ["gdn", "fla"], (64,))
    assert gdn["ms_per_step"] == 12.0 and gdn["tokens_per_s"] == pytest.approx(1000 / 12.0 * 1e3)
    assert gdn["peak_mib"] == 7 and len(gdn["rounds"]) == 3 and "round" not in gdn
    assert fla["status"] == "oom" and fla["tokens_per_s"] is None  # one failed round fails the cell


def test_smoke_run_times_each_cell_in_every_round(throughput, tmp_path):
    models = ["gdn", "transformer", "gdn_v64", "gdn_recompute", "gdn_recompute_core"]
    results = throughput.main(["--smoke", "--device", "cpu", "--models", *models, "--contexts", "32", "--rounds", "2",
                               "--out", str(tmp_path / "t.json")])
    records = results["records"]
    assert [(r["model"], r["context"]) for r in records] == [("gdn", 32), ("transformer", 32), ("gdn_v64", 32),
                                                             ("gdn_recompute", 32), ("gdn_recompute_core", 32)]
    gdn, _, gdn_v64 = (results["parameters"][name] for name in ("gdn", "transformer", "gdn_v64"))
    assert gdn_v64 < gdn  # value dim 64 instead of 128
    recorded = json.loads((tmp_path / "t.json").read_text())["config"]["models"]
    assert list(recorded) == ["gdn", "transformer", "gdn_v64", "gdn_recompute", "gdn_recompute_core"]
    assert recorded["gdn_recompute"] == {**recorded["gdn"], "recompute_gdn": "mixer"}
    assert recorded["gdn_recompute_core"] == {**recorded["gdn"], "recompute_gdn": "core"}
    assert recorded["gdn_v64"]["expand_v"] == 1.0 and recorded["gdn"]["expand_v"] == 2.0
    for r in records:
        assert r["status"] == "ok" and len(r["rounds"]) == 2
        assert min(r["rounds"]) <= r["tokens_per_s"] <= max(r["rounds"])
    assert results["ratios"]["gdn_over_transformer"]["32"] == pytest.approx(
        records[0]["tokens_per_s"] / records[1]["tokens_per_s"])
    saved = results["saved_bytes_per_token"]  # gdn_lab.memory's breakdown, summed over layers
    assert list(saved) == ["gdn", "transformer", "gdn_v64", "gdn_recompute", "gdn_recompute_core"]
    kept = {name: sum(v for k, v in parts.items() if k.startswith("model.layers.*.attn.") or k == "model.layers.*.attn")
            for name, parts in saved.items()}  # by each mixer and its submodules
    assert 0 < kept["gdn_recompute"] < kept["gdn_recompute_core"] < kept["gdn"] / 4
    for parts in saved.values():
        assert parts["model.layers.*.attn"] > 0 and parts["model.layers.*.mlp"] > 0
    assert saved["gdn_v64"]["model.layers.*.attn"] < saved["gdn"]["model.layers.*.attn"]  # half the value dim
    assert saved["gdn"]["model.layers.*.mlp"] == saved["transformer"]["model.layers.*.mlp"]  # the same MLP
    assert results["ratios"]["gdn_v64_over_transformer"]["32"] == pytest.approx(
        records[2]["tokens_per_s"] / records[1]["tokens_per_s"])
    assert results["ratios"]["gdn_recompute_over_gdn"]["32"] == pytest.approx(
        records[3]["tokens_per_s"] / records[0]["tokens_per_s"])
    assert [t["ratio"] for t in results["targets"]] == [  # no peak memory on the CPU: no memory targets
        "gdn_over_fla", "gdn_over_fla", "gdn_over_transformer", "gdn_recompute_over_gdn", "gdn_recompute_core_over_gdn"]


@pytest.fixture(scope="module")
def hybrids():
    return load_benchmark("hybrids")


def test_hybrids_defaults_are_the_notebooks(hybrids):
    """benchmarks/hybrids.py runs notebook 04's protocol: the same defaults, or the two would disagree."""
    import ast

    import papermill
    from conftest import NOTEBOOKS_DIR

    params = {name: ast.literal_eval(p["default"])
              for name, p in papermill.inspect_notebook(str(NOTEBOOKS_DIR / "04_hybrids.ipynb")).items()
              if name not in ("run_dir", "device", "interactive", "results_json")}
    args = vars(hybrids.parse_args([]))
    renamed = {"tokenizer_name": "tokenizer"}
    shared = {name: value for name, value in params.items() if renamed.get(name, name) in args}
    assert {name: args[renamed.get(name, name)] for name in shared} == shared
    assert {"patterns", "hidden_size", "steps", "batch_size", "learning_rates", "seeds", "seeded"} <= set(shared)


def test_hybrids_smoke_trains_the_grid_and_seeds(hybrids, tmp_path):
    results = hybrids.main(["--smoke", "--device", "cpu", "--sweep-dir", str(tmp_path / "runs"),
                            "--out", str(tmp_path / "h.json")])
    smoke = hybrids.SMOKE
    runs = results["runs"]
    assert len(runs) == 2 * len(smoke["learning_rates"]) + smoke["seeded"] * (smoke["seeds"] - 1)
    best = results["ranking"][0] if results["summary"][results["ranking"][0]]["n"] > 1 else results["ranking"][1]
    assert sorted(r["seed"] for r in runs if r["name"] == best) == [0, 0, 1]
    assert results["stability"]["steps"] == [5, 6]
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved["results"]["comparison"]["seed_order"] == ["gdn", "transformer"]
    assert saved["config"]["learning_rates"] == smoke["learning_rates"]


def test_cpu_train_step_compares_the_same_model_on_two_recurrences(monkeypatch, tmp_path):
    from gdn_lab import ops

    cpu_step = load_benchmark("cpu_train_step")
    monkeypatch.setattr(ops, "chunk_gated_delta_rule", ops.chunk_gated_delta_rule)  # restored after the swap
    small = ["--steps", "2", "--warmup", "0", "--seq-len", "70", "--batch-size", "2", "--threads", "1"]
    ours = cpu_step.main([*small, "--recurrence", "gdn_lab", "--out", str(tmp_path / "ours.json")])
    assert ops.chunk_gated_delta_rule is not cpu_step.fla_naive_chunk
    naive = cpu_step.main([*small, "--recurrence", "fla-naive"])
    assert ops.chunk_gated_delta_rule is cpu_step.fla_naive_chunk
    # the same weights and batch through two implementations of one recurrence: the same losses
    assert naive["last_loss"] == pytest.approx(ours["last_loss"], rel=1e-4)
    assert ours["tokens_per_second"] > 0 and json.loads((tmp_path / "ours.json").read_text())["results"] == ours


def _tiny_mqar():
    """(model config, train config, MQAR data) small enough for a grid of trials in seconds on the CPU."""
    from gdn_lab.config import ModelConfig, TrainConfig
    from gdn_lab.tasks import TaskData

    return (ModelConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, head_dim=8, backend="torch"),
            TrainConfig(steps=2, batch_size=4, seq_len=16, warmup_steps=0, eval_every=0, eval_batches=1,
                        device="cpu"),
            TaskData("mqar", vocab_size=16, seq_len=16, seed=0, num_kv_pairs=2))


def test_partial_results_summarise_and_resume_an_interrupted_grid(tmp_path, monkeypatch):
    """benchmarks/partial_results.py: a grid that finished some trials is summarised (complete points
    flagged), packed without checkpoints, and `grid.run` reads the pack back without training it."""
    import functools
    import tarfile

    from gdn_lab import grid, recall

    partial = load_benchmark("partial_results")
    config, train, data = _tiny_mqar()
    points = [({"model": "GDN"}, config, data),
              ({"model": "Transformer"}, config.replace(attn_layers="transformer"), data)]
    trials = grid.expand(points, train, learning_rates=[1e-3, 3e-3], seeds=[0, 1])
    score = functools.partial(recall.evaluate_task, batch_size=4, num_batches=1)
    finished = grid.run(trials[:5], tmp_path / "run" / "mqar", score=score)  # GDN complete, one Transformer trial

    out, packed = tmp_path / "partial.json", tmp_path / "finished.tar.xz"
    partial.main([str(tmp_path / "run"), "--grid", "mqar:accuracy,exact_match:2", "--learning-rates", "1e-3", "3e-3",
                  "--source", "test", "--out", str(out), "--pack", str(packed)])
    summary = json.loads(out.read_text())["results"]["mqar"]
    by_model = {p["model"]: p for p in summary["points"]}
    assert summary["trials"] == 5
    assert (by_model["GDN"]["complete"], by_model["Transformer"]["complete"]) == (True, False)
    assert by_model["Transformer"]["finished_trials"] == 1 and by_model["GDN"]["accuracy"]["seeds"] == [0, 1]
    gdn_best = [max((r for r in finished if r["model"] == "GDN" and r["seed"] == s), key=lambda r: r["accuracy"])
                for s in (0, 1)]
    assert by_model["GDN"]["accuracy"]["values"] == [r["accuracy"] for r in gdn_best]
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert len(names) == 10 and not any(name.endswith(".pt") for name in names)

    fresh = tmp_path / "fresh"
    with tarfile.open(packed) as tar:
        tar.extractall(fresh, filter="data")

    def no_training(*args, **kwargs):
        raise AssertionError("a packed trial was trained again")

    monkeypatch.setattr(grid, "train", no_training)
    moved = grid.run(trials[:5], fresh / "mqar", score=score)
    assert [{**r, "run_dir": None} for r in moved] == [{**r, "run_dir": None} for r in finished]
    assert all(pathlib.Path(r["run_dir"]).parent.parent == fresh / "mqar" for r in moved)  # where they are now
    with pytest.raises(AssertionError, match="trained again"):  # the rest still trains
        grid.run(trials, fresh / "mqar", score=score)


def test_partial_results_pack_the_runs_of_several_sweeps(tmp_path):
    """`--sweep runs --sweep longer` packs the finished runs of both sweep folders (notebook 04's grid
    and its longer runs), without checkpoints, and leaves unfinished runs out."""
    import tarfile

    partial = load_benchmark("partial_results")
    for run in ("runs/gdn/lr0.004_seed0", "longer/gdn/lr0.004_seed0", "longer/transformer/lr0.002_seed0"):
        folder = tmp_path / run
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "final.pt").write_bytes(b"weights")
        for name in ("config.json", "training_results.json", "variant.json") + (
                ("metrics.json",) if "transformer" not in run else ()):  # the transformer has not finished
            (folder / name).write_text("{}")
    packed = tmp_path / "finished.tar.xz"
    partial.main([str(tmp_path), "--sweep", "runs", "--sweep", "longer", "--pack", str(packed)])
    with tarfile.open(packed) as tar:
        names = sorted(tar.getnames())
    assert {name.rsplit("/", 1)[0] for name in names} == {"runs/gdn/lr0.004_seed0", "longer/gdn/lr0.004_seed0"}
    assert not any(name.endswith(".pt") for name in names) and len(names) == 8


def test_memory_breakdown_counts_parameters_state_and_gradients(throughput, tmp_path):
    """benchmarks/common.memory_breakdown: parameters, AdamW's two moments and the gradients come from
    the tensors; the rest of resident and peak memory is split as its docstring says."""
    import torch

    from benchmarks.common import memory_breakdown

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))  # 544 + 264 fp32 parameters
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    params = 808 * 4
    steps = sum(4 if t.dim() == 0 and t.dtype == torch.float32 else 0
                for s in optimizer.state.values() for t in s.values())  # AdamW's step counters
    mib = 2 ** 20
    got = memory_breakdown(model, optimizer, resident_bytes=3 * params + 1000, peak_bytes=10 * mib,
                           logits_elements=4 * 8)
    assert got["parameters_mib"] * mib == params == got["gradients_mib"] * mib
    assert got["optimizer_state_mib"] * mib == 2 * params + steps
    assert got["other_resident_mib"] * mib == 1000 - steps
    assert got["step_above_resident_and_gradients_mib"] * mib == 10 * mib - (3 * params + 1000) - params
    assert got["logits_mib"] * mib == 64 and got["peak_mib"] == 10
    assert memory_breakdown(model, optimizer, None, None, 1) is None
    results = throughput.main(["--smoke", "--device", "cpu", "--models", "gdn", "--contexts", "32", "--rounds", "1",
                               "--out", str(tmp_path / "t.json")])
    assert results["records"][0]["memory"] is None  # no memory counters on the CPU


def test_readme_tables_are_the_committed_results():
    """README's research tables equal what benchmarks/results_tables.py writes from benchmarks/results:
    after a new result JSON, run `python3 benchmarks/results_tables.py --write`."""
    tables = load_benchmark("results_tables")
    block = tables.readme_block(tables.README.read_text())
    assert block is not None, "README.md lost its results-tables markers"
    assert block == tables.block(), "README's tables differ from the JSON: python3 benchmarks/results_tables.py --write"
    assert "| GDN | 1.000 [1.000, 1.000] |" in block  # a complete MQAR point, read from partial_protocol_h200.json


def test_partial_results_of_a_tuned_grid_keep_the_lowest_loss(tmp_path):
    """A `protocol.tune_then_seed` grid (notebooks 07, 08): 'tuned' expects rates + seeds - 1 trials per
    point, 'lower' keeps the rate with the lowest loss (a loss is not an accuracy)."""
    import argparse

    from gdn_lab import protocol

    partial = load_benchmark("partial_results")
    config, train, data = _tiny_mqar()
    result = protocol.tune_then_seed([({"variant": "GDN"}, config, data)], train, tmp_path / "run" / "lm",
                                     learning_rates=[1e-3, 3e-2], seeds=[0, 1, 2], metric="final_val_loss",
                                     higher_is_better=False)
    spec = partial.parse_grid("lm:final_val_loss:3:tuned,lower")
    assert (spec.tuned, spec.higher_is_better, spec.expected_trials([1e-3, 3e-2])) == (True, False, 4)
    point = partial.summarise_grid(tmp_path / "run" / "lm", spec, [1e-3, 3e-2])["points"][0]
    assert point["complete"] and point["finished_trials"] == 4
    assert point["final_val_loss"]["values"] == result.table[0]["values"]  # the protocol's own summary
    first_seed = [r["final_val_loss"] for r in result.records if r["seed"] == 0]
    assert point["final_val_loss"]["values"][0] == min(first_seed)
    with pytest.raises(argparse.ArgumentTypeError, match="tuned,lower"):
        partial.parse_grid("lm:final_val_loss:3:fast")
