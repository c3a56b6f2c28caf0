"""Experiment grids and seed statistics: expansion, resumable runs, best-of-lr, mean and spread, ties."""
import doctest
import functools
import json
import math
import pathlib

import pytest

from gdn_lab import grid, recall, stats
from gdn_lab.config import ConfigError, ModelConfig, TrainConfig
from gdn_lab.tasks import TaskData

TINY = ModelConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, head_dim=8, backend="torch")
TRAIN = TrainConfig(steps=3, batch_size=4, seq_len=16, warmup_steps=0, eval_every=0, eval_batches=1, device="cpu")
SCORE = functools.partial(recall.evaluate_task, batch_size=8, num_batches=1)


def _points():
    data = TaskData("mqar", vocab_size=16, seq_len=16, seed=0, num_kv_pairs=2)
    return [({"model": "GDN", "pairs": 2}, TINY, data),
            ({"model": "Transformer", "pairs": 2}, TINY.replace(attn_layers="transformer"), data)]


def test_stats_doctests_and_summaries():
    assert doctest.testmod(stats).failed == 0
    summary = stats.summarize([1.0, 3.0, None, float("nan")])
    assert (summary["mean"], summary["min"], summary["max"], summary["spread"]) == (2.0, 1.0, 3.0, 2.0)
    assert summary["std"] == pytest.approx(2 ** 0.5) and (summary["n"], summary["failed"]) == (2, 2)
    assert stats.summarize([None])["mean"] is None
    high, low = stats.summarize([0.9, 0.95]), stats.summarize([0.5, 0.52])
    assert stats.compare(high, low) == "better" and stats.compare(low, high) == "worse"
    assert stats.compare(low, high, higher_is_better=False) == "better"
    assert stats.compare(high, stats.summarize([0.93, 0.7])) == "tie"  # the gap is inside the second's range
    assert stats.format_summary(high) == "0.925 ± 0.035 (2 seeds)"


def test_expand_nests_points_seeds_and_rates():
    trials = grid.expand(_points(), TRAIN, learning_rates=[1e-3, 3e-3], seeds=[0, 1])
    assert len(trials) == 8
    assert [(t.labels["model"], t.train_config.seed, t.train_config.lr) for t in trials[:4]] == [
        ("GDN", 0, 1e-3), ("GDN", 0, 3e-3), ("GDN", 1, 1e-3), ("GDN", 1, 3e-3)]
    assert trials[2].data.seed == 1 and trials[0].data.seed == 0  # the seed moves the data stream too
    assert trials[1].folder == "model-GDN_pairs-2/lr0.003_seed0"
    assert grid.expand(_points(), TRAIN)[0].train_config.lr == TRAIN.lr


def test_run_records_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    trials = grid.expand(_points(), TRAIN, learning_rates=[1e-3, 3e-2], seeds=[0])
    records = grid.run(trials, tmp_path, score=SCORE)
    assert [(r["model"], r["lr"]) for r in records] == [("GDN", 1e-3), ("GDN", 3e-2), ("Transformer", 1e-3),
                                                        ("Transformer", 3e-2)]
    assert all(r["status"] == "ok" and r["steps"] == 3 and 0 <= r["accuracy"] <= 1 for r in records)
    assert json.loads((tmp_path / trials[0].folder / grid.TRIAL_FILE).read_text()) == records[0]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(grid, "train", no_training)
    assert grid.run(trials, tmp_path, score=SCORE) == records
    other = grid.expand(_points(), TRAIN.replace(steps=4), learning_rates=[1e-3], seeds=[0])
    with pytest.raises(ConfigError, match="steps=3, not 4"):
        grid.run(other, tmp_path, score=SCORE)
    model = grid.load_model(records[0])
    assert model.num_params() == records[0]["num_params"] and not model.training
    final = tmp_path / trials[0].folder / "checkpoints" / "final.pt"
    final.write_bytes(final.read_bytes()[:-10])  # truncated: refused in one line that names it
    with pytest.raises(ConfigError, match="final.pt is truncated"):
        grid.load_model(records[0])


def test_ensure_checkpoints_trains_again_only_the_selected_trials_without_weights(tmp_path, monkeypatch):
    """Finished trials read back without checkpoints (a pack of finished trials) are trained again
    only where `select` needs their weights; on the CPU the records come back the same."""
    import shutil

    trials = grid.expand(_points(), TRAIN, learning_rates=[1e-3, 3e-2], seeds=[0])
    records = grid.run(trials, tmp_path, score=SCORE)
    for record in records:
        shutil.rmtree(pathlib.Path(record["run_dir"]) / "checkpoints")
    with pytest.raises(ConfigError, match="no final checkpoint"):
        grid.load_model(records[0])

    def best(rows):
        return grid.best_over_lr(rows, "accuracy")

    trained, real_train = [], grid.train
    monkeypatch.setattr(grid, "train", lambda *args, **kwargs: trained.append(args[3]) or real_train(*args, **kwargs))
    again = grid.ensure_checkpoints(trials, tmp_path, records, best, score=SCORE)
    assert sorted(map(str, trained)) == sorted(r["run_dir"] for r in best(records))  # one per point, no more
    assert all(grid.has_weights(r) for r in best(again))
    assert [{**r, "train_seconds": 0} for r in again] == [{**r, "train_seconds": 0} for r in records]
    assert grid.load_model(best(again)[0]).config == TINY
    assert grid.ensure_checkpoints(trials, tmp_path, again, best, score=SCORE) == again and len(trained) == 2


def test_ensure_checkpoints_asks_select_again_when_a_retrained_score_moves(tmp_path, monkeypatch):
    """On a GPU a trial trained again may score otherwise (nondeterministic kernels) and hand the best
    rate to another trial without weights: that one is trained too, and the loop ends there."""
    import shutil

    trials = grid.expand(_points()[:1], TRAIN, learning_rates=[1e-3, 3e-2], seeds=[0])
    records = grid.run(trials, tmp_path, score=SCORE)
    records = [{**r, "accuracy": a} for r, a in zip(records, [0.9, 0.5], strict=True)]  # 1e-3 is the best
    for record in records:
        shutil.rmtree(pathlib.Path(record["run_dir"]) / "checkpoints")
    real_run_one, trained = grid._run_one, []

    def run_one(trial, folder, score, progress):
        trained.append(trial.train_config.lr)
        record = real_run_one(trial, folder, score, progress)
        return {**record, "accuracy": 0.1 if trial.train_config.lr == 1e-3 else 0.5}  # now 3e-2 is the best

    monkeypatch.setattr(grid, "_run_one", run_one)
    again = grid.ensure_checkpoints(trials, tmp_path, records, lambda rows: grid.best_over_lr(rows, "accuracy"),
                                    score=SCORE)
    assert trained == [1e-3, 3e-2] and [r["accuracy"] for r in again] == [0.1, 0.5]
    assert all(grid.has_weights(r) for r in again)


def test_rates_at_the_grid_edge():
    assert doctest.testmod(grid).failed == 0
    records = [{"model": "m", "lr": lr, "seed": seed, "status": "ok", "accuracy": acc, "final_val_loss": 1.0}
               for seed, scores in enumerate([(0.9, 0.5, 0.1), (0.2, 0.3, 0.4), (0.1, 0.6, 0.2)])
               for lr, acc in zip([1e-4 / 3, 1e-3, 3e-3], scores)]
    edges = grid.at_grid_edge(grid.best_over_lr(records, "accuracy"))
    assert [(r["seed"], r["lr"]) for r in edges["lowest"]] == [(0, 1e-4 / 3)]  # 3.33e-05 though keys hold 6 digits
    assert [(r["seed"], r["lr"]) for r in edges["highest"]] == [(1, 3e-3)]
    best = grid.best_over_lr(records, "accuracy")
    assert grid.at_grid_edge(best, "accuracy", solved=0.9)["lowest"] == []  # seed 0 solved it at 0.9
    two_rates = grid.best_over_lr([r for r in records if r["lr"] != 1e-3], "accuracy")
    assert grid.at_grid_edge(two_rates) == {"lowest": [], "highest": []}  # two rates: every choice is an edge


def test_extend_at_edges_brackets_each_best_rate(tmp_path, monkeypatch):
    """One more trial beyond the edge where the best rate is there and beat its neighbour; none where the
    grid is flat (a tie-break), solved, or peaked inside; again next round while the edge keeps winning."""
    peak = {0: 1e-5, 1: None, 2: 1e-3, 3: 1e-1}  # seed -> the rate this fake task likes best (None: flat)
    trained = []

    def run_one(trial, folder, score, progress):
        lr, seed = trial.train_config.lr, trial.train_config.seed
        trained.append((seed, lr))
        accuracy = 0.5 if peak[seed] is None else 0.9 - 0.1 * abs(math.log10(lr / peak[seed]))
        record = {**trial.labels, "lr": lr, "seed": seed, "run_dir": str(folder), "status": "ok",
                  "final_val_loss": 1.0, "accuracy": accuracy}
        grid.write_json(folder / grid.TRIAL_FILE, record)
        return record

    monkeypatch.setattr(grid, "_run_one", run_one)
    trials = grid.expand(_points()[:1], TRAIN, learning_rates=[3e-4, 1e-3, 3e-3], seeds=[0, 1, 2, 3])
    records = grid.run(trials, tmp_path)
    trained.clear()
    trials, records = grid.extend_at_edges(trials, tmp_path, records, "accuracy", rounds=2)
    assert trained == [(0, 1e-4), (3, 1e-2), (0, 3e-5), (3, 3e-2)]
    assert len(trials) == len(records) == 16 and [t.train_config.lr for t in trials[12:]] == [1e-4, 1e-2, 3e-5, 3e-2]
    best = {r["seed"]: r["lr"] for r in grid.best_over_lr(records, "accuracy")}
    assert best[0] == 3e-5 and best[2] == 1e-3 and best[3] == 3e-2
    trained.clear()  # a second call reads every trial back and adds none beyond the two rounds it may take
    again_trials, again = grid.extend_at_edges(trials[:12], tmp_path, records[:12], "accuracy", rounds=2)
    assert trained == [] and again == records
    _, solved = grid.extend_at_edges(trials[:12], tmp_path, records[:12], "accuracy", solved=0.75, rounds=1)
    assert trained == [] and len(solved) == 13  # seed 0 reached 0.752 at 3e-4: solved; seed 3 0.748 at 3e-3
    _, losses = grid.extend_at_edges(trials[:12], tmp_path, [{**r, "loss": -r["accuracy"]} for r in records[:12]],
                                     "loss", higher_is_better=False, rounds=1)
    assert len(losses) == 14  # the same two edges, read as a loss to minimise
    stopped = [{**r, "stopped_early": r["seed"] == 0} for r in records[:12]]
    _, kept = grid.extend_at_edges(trials[:12], tmp_path, stopped, "accuracy", rounds=1)
    assert [(r["seed"], r["lr"]) for r in kept[12:]] == [(3, 1e-2)]  # seed 0 reached its training target
    with pytest.raises(ConfigError, match="solved=None"):
        grid.extend_at_edges(trials[:12], tmp_path, records[:12], "final_val_loss", higher_is_better=False, solved=1.0)
    pair = [t for t in trials[:12] if t.train_config.lr != 1e-3]  # a grid of two rates grows toward the better
    _, grown = grid.extend_at_edges(pair, tmp_path, [r for r in records[:12] if r["lr"] != 1e-3], "accuracy")
    assert sorted((r["seed"], r["lr"]) for r in grown[8:]) == [(0, 3e-5), (2, 3e-2), (3, 3e-2)]  # a step of 10x


def test_best_over_lr_and_over_seeds():
    def record(model, seed, lr, accuracy, loss=1.0):
        return {"model": model, "lr": lr, "seed": seed, "accuracy": accuracy, "final_val_loss": loss}

    records = [record("GDN", 0, 1e-3, 0.5), record("GDN", 0, 3e-3, 0.9), record("GDN", 1, 1e-3, 0.7),
               record("GDN", 1, 3e-3, None),  # diverged: the worst
               record("TF", 0, 1e-3, 1.0, loss=0.2), record("TF", 0, 3e-3, 1.0, loss=0.1)]
    best = grid.best_over_lr(records, "accuracy")
    assert [(r["model"], r["seed"], r["lr"]) for r in best] == [("GDN", 0, 3e-3), ("GDN", 1, 1e-3), ("TF", 0, 3e-3)]
    assert best[1]["lr_scores"] == {"0.001": 0.7, "0.003": None}
    lowest = grid.best_over_lr(records, "final_val_loss", higher_is_better=False)
    assert lowest[2]["lr"] == 3e-3
    rows = grid.over_seeds(best, "accuracy")
    gdn = grid.find_row(rows, model="GDN")
    assert (gdn["mean"], gdn["spread"], gdn["n"], gdn["seeds"], gdn["lrs"]) == (0.8, pytest.approx(0.2), 2, [0, 1],
                                                                               [3e-3, 1e-3])
    assert grid.find_row(rows, model="TF")["std"] == 0.0
    with pytest.raises(ConfigError, match="0 rows match"):
        grid.find_row(rows, model="DeltaNet")


def test_diverged_trial_is_recorded(tmp_path):
    trials = grid.expand(_points()[:1], TRAIN.replace(grad_clip=0.0), learning_rates=[1e6])
    (record,) = grid.run(trials, tmp_path, score=SCORE)
    assert record["status"] == "diverged" and "accuracy" not in record
    assert grid.best_over_lr([record], "accuracy")[0]["lr_scores"] == {"1e+06": None}


def test_workers_give_the_records_of_one_process(tmp_path):
    trials = grid.expand(_points()[:1], TRAIN, learning_rates=[1e-3, 3e-3])
    serial = grid.run(trials, tmp_path / "serial", score=SCORE)
    parallel = grid.run(trials, tmp_path / "parallel", score=SCORE, workers=2)
    drop = ("run_dir", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in parallel] == \
        [{k: v for k, v in r.items() if k not in drop} for r in serial]
