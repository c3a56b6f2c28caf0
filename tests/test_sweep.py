"""gdn_lab.sweep on the CPU: runs per (variant, lr, seed), finished runs read back, interrupted ones resumed,
the learning-rate grid and seeds, ties, ranking stability, the seed's rules."""
import dataclasses
import json
import math

import pytest

from gdn_lab import sweep as sweep_module
from gdn_lab.config import ConfigError, ModelConfig, TrainConfig
from gdn_lab.data import lm_data
from gdn_lab.models import build_model
from gdn_lab.sweep import (
    SEED_EXP10,
    SEED_PATTERNS,
    SweepResult,
    VariantResult,
    budget_train_config,
    compare_with_seed,
    gap_over_steps,
    hybrid_variants,
    layout,
    rank_stability,
    run_folder,
    run_sweep,
    seed_learning_rate,
    steps_within,
    still_closing,
)

BASE = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, attn_num_heads=2,
                   backend="torch")
CONFIG = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3, eval_batches=2, save_every=3)
SEED_12 = ModelConfig(num_layers=12, hidden_size=64, num_heads=2, head_dim=16, attn_num_heads=2)


@pytest.fixture(scope="module")
def data():
    return lm_data("pydoc", "byte", seq_len=32, max_chars=60_000)


@pytest.fixture(scope="module")
def variants():
    return hybrid_variants(BASE, ["gdn", "late"])  # late at 2 layers: attention in layer 1


@pytest.fixture(scope="module")
def reference(data, variants, tmp_path_factory):
    """An uninterrupted sweep of the two tiny variants."""
    sweep_dir = tmp_path_factory.mktemp("reference")
    return run_sweep(variants, CONFIG, data, sweep_dir, progress=False), sweep_dir


class InterruptOnce:
    """A batch source that raises KeyboardInterrupt (as Ctrl-C would) the `nth` time it is asked for `step`."""

    def __init__(self, data, step: int, nth: int):
        self.data, self.step, self.remaining = data, step, nth

    def train_batch(self, step, *args):
        if step == self.step:
            self.remaining -= 1
            if self.remaining == 0:
                raise KeyboardInterrupt
        return self.data.train_batch(step, *args)

    def __getattr__(self, name):
        return getattr(self.data, name)


def test_two_variants_give_one_row_each(reference, variants):
    result, sweep_dir = reference
    assert result.names == ["gdn", "late"]
    tokens = CONFIG.steps * CONFIG.batch_size * CONFIG.seq_len
    assert [(row.name, row.seed) for row in result.runs] == [("gdn", 0), ("late", 0)]
    for row in result.runs:
        assert row.status == "ok" and not row.reused
        assert math.isfinite(row.final_val_loss) and row.best_val_loss <= row.final_val_loss
        # an untrained byte model scores ln 256 = 5.55; six steps must already have moved it down
        assert row.final_val_loss < math.log(256) - 0.05, row.final_val_loss
        assert row.tokens == tokens, "every variant gets the same token budget"
        assert row.tokens_per_second > 0 and row.wall_seconds > 0 and row.peak_memory_mib is None
        assert row.params == build_model(variants[row.name]).num_params()
        assert [r["step"] for r in row.curve] == [3, 6]
        assert row.curve[-1]["val_loss"] == row.final_val_loss
        assert (run_folder(sweep_dir, row.name, row.lr, 0) / "metrics.json").exists()
        assert run_folder(sweep_dir, row.name, row.lr, 0).name == f"lr{row.lr:g}_seed0"
    assert result["gdn"].layout == "GG" and result["late"].layout == "GA"
    assert result["gdn"].attention_ratio == 0 and result["late"].attention_ratio == 0.5
    assert (result["gdn"].lr, result["late"].lr) == (1e-3, 2e-3)
    assert sorted(result.ranking()) == ["gdn", "late"]
    assert [line.split()[1] for line in result.table().splitlines()[1:]] == ["gdn", "late"]


def test_result_round_trips_through_json(reference, tmp_path):
    result, sweep_dir = reference
    written = SweepResult.from_json(sweep_dir / "sweep.json")  # rewritten after every variant
    assert written == result
    assert json.loads(json.dumps(written.to_dict())) == json.loads(json.dumps(result.to_dict()))
    path = result.to_json(tmp_path / "hybrids.json")
    payload = json.loads(path.read_text())
    assert {"environment", "config", "seed", "results"} <= set(payload)
    assert SweepResult.from_json(path).ranking() == result.ranking()
    with pytest.raises(ConfigError, match="no sweep result"):
        SweepResult.from_json(tmp_path / "missing.json")


def test_second_call_reads_finished_runs_back(reference, variants, data, monkeypatch):
    result, sweep_dir = reference
    checkpoints = {path: path.stat().st_mtime_ns for path in sweep_dir.glob("*/*/checkpoints/*.pt")}
    assert checkpoints

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(sweep_module, "train", no_training)
    again = run_sweep(variants, CONFIG, data, sweep_dir, progress=False)
    assert all(row.reused for row in again.runs)
    for old, new in zip(result.runs, again.runs):
        assert (new.final_val_loss, new.tokens, new.curve) == (old.final_val_loss, old.tokens, old.curve)
        assert new.wall_seconds == old.wall_seconds
    assert {path: path.stat().st_mtime_ns for path in sweep_dir.glob("*/*/checkpoints/*.pt")} == checkpoints


def test_interrupted_variant_resumes_and_matches(reference, variants, data, tmp_path):
    result, _ = reference
    # the first variant asks for step 4 once and finishes; the second is stopped there (checkpoint step_4.pt)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(variants, CONFIG, InterruptOnce(data, step=4, nth=2), tmp_path, progress=False)
    gdn, late = run_folder(tmp_path, "gdn", 1e-3, 0), run_folder(tmp_path, "late", 2e-3, 0)
    assert (gdn / "metrics.json").exists() and not (late / "metrics.json").exists()
    assert (late / "checkpoints" / "step_4.pt").exists()
    resumed = run_sweep(variants, CONFIG, data, tmp_path, progress=False)
    assert [row.reused for row in resumed.runs] == [True, False]
    late = resumed["late"]
    assert late.tokens == result["late"].tokens
    # resume is exact on the CPU with one thread (tests/test_train.py); allow float noise only
    assert late.final_val_loss == pytest.approx(result["late"].final_val_loss, rel=1e-6, abs=0)
    assert [r["val_loss"] for r in late.curve] == pytest.approx([r["val_loss"] for r in result["late"].curve],
                                                                rel=1e-6, abs=0)


def test_changed_settings_stop_before_training(reference, variants, data, monkeypatch):
    _, sweep_dir = reference
    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("trained despite a settings mismatch"))
    with pytest.raises(ConfigError, match="steps=6, not 8") as err:
        run_sweep(variants, CONFIG.replace(steps=8), data, sweep_dir, progress=False)
    assert "\n" not in str(err.value) and "another sweep_dir" in str(err.value)
    with pytest.raises(ConfigError, match="eval_every=3, not 2"):
        run_sweep(variants, CONFIG.replace(eval_every=2), data, sweep_dir, learning_rates=[1e-3, 5e-3],
                  progress=False)
    with pytest.raises(ConfigError, match="not both"):
        run_sweep(variants, CONFIG, data, sweep_dir, lr_by_variant={"gdn": 1e-3, "late": 2e-3},
                  learning_rates=[1e-3], progress=False)
    with pytest.raises(ConfigError, match="seeds=0"):
        run_sweep(variants, CONFIG, data, sweep_dir, seeds=0, progress=False)


def test_diverged_variant_is_recorded_and_not_retrained(variants, data, tmp_path, monkeypatch):
    rates = {"gdn": 1e-3, "late": 1e6}  # lr 1e6 blows the weights up within a step or two
    result = run_sweep(variants, CONFIG.replace(grad_clip=0.0), data, tmp_path, lr_by_variant=rates, progress=False)
    assert result["gdn"].status == "ok" and result["late"].status == "diverged"
    assert "lower lr" in result["late"].error and result["late"].final_val_loss is None
    assert result.ranking() == ["gdn"]
    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("a diverged variant was trained again"))
    again = run_sweep(variants, CONFIG.replace(grad_clip=0.0), data, tmp_path, lr_by_variant=rates, progress=False)
    assert again["late"].status == "diverged" and again["late"].reused


def test_each_variant_can_have_a_grid_of_its_own(variants, data, tmp_path):
    rates = {"gdn": [1e-3, 5e-3], "late": [2e-3]}
    result = run_sweep(variants, CONFIG, data, tmp_path, lr_by_variant=rates, progress=False)
    assert sorted((run.name, run.lr) for run in result.runs) == [("gdn", 1e-3), ("gdn", 5e-3), ("late", 2e-3)]
    losses = {run.lr: run.final_val_loss for run in result.runs_of("gdn")}
    assert result.chosen_lr("gdn") == min(losses, key=losses.get) and result.chosen_lr("late") == 2e-3
    with pytest.raises(ConfigError, match=r"gives \['late'\] no rate"):
        run_sweep(variants, CONFIG, data, tmp_path, lr_by_variant={"gdn": [1e-3], "late": []}, progress=False)


def test_seed_learning_rate_rule(variants):
    seed = hybrid_variants(SEED_12)
    assert {name: seed_learning_rate(config) for name, config in seed.items()} == {
        "gdn": 1e-3, "transformer": 2e-3, "sparse": 2e-3, "alternating": 2e-3, "late": 2e-3,
        "ratio8": 2e-3, "ratio25": 2e-3, "ratio42": 2e-3}
    assert seed_learning_rate(seed["gdn"], gdn_lr=5e-4) == 5e-4
    assert seed_learning_rate(seed["sparse"], attention_lr=1e-3) == 1e-3
    with pytest.raises(ConfigError, match=r"no learning rate for \['late'\]"):
        run_sweep(variants, CONFIG, None, "unused", lr_by_variant={"gdn": 1e-3})
    with pytest.raises(ConfigError, match="folder names"):
        run_sweep({"a/b": BASE}, CONFIG, None, "unused")


def test_seed_patterns_give_the_seed_layers_at_12_layers():
    seed = hybrid_variants(SEED_12)
    assert list(seed) == ["gdn", "transformer", "sparse", "alternating", "late", "ratio8", "ratio25", "ratio42"]
    layers = {name: config.attn_layers for name, config in seed.items()}
    assert layers["gdn"] == () and layers["transformer"] == tuple(range(12))
    assert layers["sparse"] == (5, 11)
    assert layers["late"] == (8, 9, 10, 11)
    assert layers["alternating"] == (1, 3, 5, 7, 9, 11)
    # k/12 ratios: 1, 3, 5 attention layers, evenly spaced, the last one at the top
    assert layers["ratio8"] == (11,)
    assert layers["ratio25"] == (3, 7, 11)
    assert layers["ratio42"] == (1, 4, 6, 9, 11)
    assert [round(100 * seed[name].attention_ratio) for name in seed] == [0, 100, 17, 50, 33, 8, 25, 42]
    assert {name: c.attn_layers for name, c in hybrid_variants(SEED_12, ["1/12", "3/12", "5/12"]).items()} == {
        "1of12": layers["ratio8"], "3of12": layers["ratio25"], "5of12": layers["ratio42"]}
    assert hybrid_variants(SEED_12, {"mine": (0, 6)})["mine"].attn_layers == (0, 6)
    assert len(SEED_PATTERNS) == 8


def test_sliding_window_variants_from_the_same_patterns(data, tmp_path):
    """mixer='swa' gives a pattern's layers to sliding-window attention (any attention layers of the
    base go back to GDN); such a variant counts as attention for the seed's rule, and trains."""
    base = SEED_12.replace(attn_layers=(0,), swa_window=64)
    swa = hybrid_variants(base, {"gdn+swa": "sparse", "alt": "alternating"}, mixer="swa")
    assert swa["gdn+swa"].swa_layers == (5, 11) and swa["gdn+swa"].attn_layers == ()
    assert layout(swa["gdn+swa"]) == "GGGGGSGGGGGS" and layout(swa["alt"]) == "GS" * 6
    assert hybrid_variants(swa["alt"], ["sparse"])["sparse"].swa_layers == ()   # back to attention only
    assert seed_learning_rate(swa["gdn+swa"]) == 2e-3 and swa["gdn+swa"].attention_ratio == 2 / 12
    with pytest.raises(ConfigError, match="mixer='mamba'"):
        hybrid_variants(base, ["sparse"], mixer="mamba")
    tiny = hybrid_variants(BASE.replace(swa_window=8), {"gdn+swa": "late"}, mixer="swa")
    result = run_sweep(tiny, CONFIG, data, tmp_path)
    assert result["gdn+swa"].layout == "GS" and math.isfinite(result["gdn+swa"].final_val_loss)
    assert result["gdn+swa"].final_val_loss < math.log(256)


def test_run_folders_saved_before_the_mixer_fields_still_match(tmp_path):
    """A config.json written before swa_layers, swa_window and fixed_beta existed holds a run with
    their defaults: it is the same run, while a changed value is still refused."""
    from gdn_lab.grid import check_run_dir

    saved = BASE.to_dict()
    for name in ("swa_layers", "swa_window", "fixed_beta"):
        del saved[name]
    (tmp_path / "config.json").write_text(json.dumps({"model": saved, "train": CONFIG.to_dict()}))
    check_run_dir(tmp_path, BASE, CONFIG, None)
    with pytest.raises(ConfigError, match="swa_layers=\\[\\], not \\[1\\]"):
        check_run_dir(tmp_path, BASE.replace(swa_layers=(1,)), CONFIG, None)


def _row(name: str, loss: float | None, status: str = "ok") -> VariantResult:
    return VariantResult(name=name, attn_layers=(), layout="GG", attention_ratio=0.0, lr=1e-3, params=1,
                         status=status, final_val_loss=loss)


def test_compare_with_seed_orders_and_pairs():
    agreeing = SweepResult([_row("transformer", 3.0), _row("gdn", 2.5), _row("sparse", 2.0)], {})
    same = compare_with_seed(agreeing)
    assert same["seed_order"] == ["sparse", "gdn", "transformer"] == same["run_order"]
    assert same["same_order"] and same["agreeing_pairs"] == 3 and same["missing"] == []
    assert same["pairs"][0] == {"better": "sparse", "worse": "gdn", "seed_gap": pytest.approx(0.341),
                                "run_gap": pytest.approx(0.5), "agrees": True, "tie": False, "verdict": "agrees"}
    flipped = compare_with_seed(SweepResult([_row("gdn", 2.0), _row("sparse", 2.1), _row("transformer", 3.0),
                                             _row("late", 1.0)], {}))
    assert flipped["run_order"] == ["gdn", "sparse", "transformer"] and not flipped["same_order"]
    assert [p["agrees"] for p in flipped["pairs"]] == [False, True, True] and flipped["agreeing_pairs"] == 2
    assert flipped["tied_pairs"] == 0  # one seed each and no seed range measured: no tie can be called
    partial = compare_with_seed(SweepResult([_row("gdn", 2.0), _row("transformer", None, "diverged")], {}))
    assert partial["seed_order"] == ["gdn"] and partial["pairs"] == []
    assert partial["missing"] == ["sparse", "transformer"]
    assert SEED_EXP10["tokens"] == SEED_EXP10["seq_len"] * SEED_EXP10["batch_size"] * SEED_EXP10["steps"]


def test_steps_within_budget_arithmetic():
    # two variants at 0.1 and 0.3 s/step, 1 s per run and per evaluation: 100 s, 4 evaluations
    # leave 100 - 5 * 2 = 90 s for 0.4 s of steps -> 225 steps
    assert steps_within(100.0, [0.1, 0.3], [1.0, 1.0], evaluations=4) == 225
    assert steps_within(5.0, [0.1, 0.3], [1.0, 1.0], evaluations=4) == 0


def test_budget_scales_steps_and_is_kept_for_resume(variants, data, tmp_path, monkeypatch):
    config = CONFIG.replace(steps=100_000, warmup_steps=1000, eval_every=20_000, save_every=0)
    plan = budget_train_config(variants, config, data, max_seconds=60.0, sweep_dir=tmp_path, min_steps=5)
    planned = plan.train_config
    assert 5 <= planned.steps < 100_000, planned.steps
    assert plan.calibration_seconds < 60.0 and set(plan.step_seconds) == {"gdn", "late"}
    assert plan.calibration_seconds + plan.estimated_seconds <= 60.0 + 1e-6
    assert planned.eval_every == max(1, round(20_000 * planned.steps / 100_000))
    assert planned.warmup_steps < planned.steps and planned.save_every == 0
    assert (planned.batch_size, planned.seq_len) == (config.batch_size, config.seq_len)
    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("calibrated again"))
    assert budget_train_config(variants, config, data, 60.0, sweep_dir=tmp_path, min_steps=5) == plan
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="raise max_seconds"):
        budget_train_config(variants, config, data, max_seconds=0.5, min_steps=5)


def test_grid_picks_each_variants_best_rate_and_seeds_the_best(variants, data, tmp_path, monkeypatch):
    rates = [1e-3, 2e-2]
    result = run_sweep(variants, CONFIG, data, tmp_path, learning_rates=rates, seeds=3, seeded=1, progress=False)
    first = {(run.name, run.lr): run.final_val_loss for run in result.runs if run.seed == 0}
    assert set(first) == {(name, lr) for name in ("gdn", "late") for lr in rates}  # the whole grid at seed 0
    chosen = {name: min(rates, key=lambda lr, n=name: first[(n, lr)]) for name in ("gdn", "late")}
    assert {name: result.chosen_lr(name) for name in chosen} == chosen
    best = min(chosen, key=lambda n: first[(n, chosen[n])])
    other = ({"gdn", "late"} - {best}).pop()
    extra = [(run.name, run.lr, run.seed) for run in result.runs if run.seed > 0]
    assert extra == [(best, chosen[best], 1), (best, chosen[best], 2)], "only the best variant, at its rate"
    summary = result.summaries()
    losses = [run.final_val_loss for run in result.runs_of(best) if run.lr == chosen[best]]
    assert summary[best]["n"] == 3 and summary[best]["mean"] == pytest.approx(sum(losses) / 3)
    assert summary[best]["spread"] == pytest.approx(max(losses) - min(losses)) and summary[best]["spread"] > 0
    assert summary[other]["n"] == 1 and summary[other]["lr_scores"] == {f"{lr:g}": first[(other, lr)] for lr in rates}
    assert result.noise == summary[best]["spread"]
    # a seed moves the data order too (the validation batches stay): seed 1's run records data seed 1
    saved = json.loads((run_folder(tmp_path, best, chosen[best], 1) / "config.json").read_text())
    assert saved["data"]["seed"] == 1 and saved["train"]["seed"] == 1
    assert result[best].seed == 0 and result[best].lr == chosen[best]
    assert result.mean_curve(best)[-1]["val_loss"] == pytest.approx(summary[best]["mean"])
    assert result.setup["protocol"] == {"learning_rates": rates, "seeds": 3, "seeded": 1}
    table = result.table().splitlines()
    assert "3 seeds" in next(line for line in table if f" {best} " in line)

    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = run_sweep(variants, CONFIG, data, tmp_path, learning_rates=rates, seeds=3, seeded=1, progress=False)
    assert all(run.reused for run in again.runs) and again.summaries() == result.summaries()
    assert SweepResult.from_json(tmp_path / "sweep.json").summaries() == result.summaries()


def _run(name: str, lr: float, seed: int, losses: list[float] | None, status: str = "ok") -> VariantResult:
    """A finished run whose validation loss was `losses` at steps 10, 20, ... (None: diverged)."""
    curve = [{"step": 10 * (i + 1), "tokens": 100 * (i + 1), "train_loss": v, "val_loss": v}
             for i, v in enumerate(losses or [])]
    return VariantResult(name=name, attn_layers=(), layout="GG", attention_ratio=0.0, lr=lr, params=1,
                         status=status, seed=seed, final_val_loss=losses[-1] if losses else None, curve=curve)


def test_best_rate_ties_and_noise_floor():
    runs = [_run("a", 1e-3, 0, [3.0, 2.00]), _run("a", 2e-3, 0, [3.0, 1.90]), _run("a", 4e-3, 0, None, "diverged"),
            _run("a", 2e-3, 1, [3.0, 1.96]), _run("a", 2e-3, 2, [3.0, 1.93]),
            _run("b", 1e-3, 0, [3.0, 1.95]), _run("b", 2e-3, 0, [3.0, 2.10]), _run("b", 4e-3, 0, [3.0, 2.30]),
            _run("c", 1e-3, 0, [3.0, 2.50]), _run("c", 2e-3, 0, None, "diverged"), _run("c", 4e-3, 0, [3.0, 2.60])]
    result = SweepResult(runs, {})
    assert [result.chosen_lr(n) for n in "abc"] == [2e-3, 1e-3, 1e-3]  # a diverged rate is never chosen
    summary = result.summaries()
    assert summary["a"]["mean"] == pytest.approx(1.93) and summary["a"]["spread"] == pytest.approx(0.06)
    assert summary["a"]["lr_scores"] == {"0.001": 2.0, "0.002": 1.9, "0.004": None}
    assert result.ranking() == ["a", "b", "c"] and result.noise == pytest.approx(0.06)
    # b is 0.02 behind a: within a's seed range -> tie; c is 0.57 behind: not
    assert result.compare("a", "b") == result.compare("b", "a") == "tie"
    assert result.compare("a", "c") == "better" and result.compare("c", "a") == "worse"
    # b and c have one seed each: they borrow a's range (0.06); a gap of 0.55 is still no tie
    assert result.compare("b", "c") == "better"
    assert SweepResult(runs[5:8] + [_run("d", 1e-3, 0, [3.0, 1.99])], {}).compare("b", "d") == "better"
    with pytest.raises(KeyError, match="no variant 'z'"):
        result.runs_of("z")


def test_rank_stability_over_the_last_30_percent():
    # ten evaluations (steps 10..100); the window is steps >= 70: 70, 80, 90, 100
    early_swap = {"a": [5, 4, 3.0, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1, 2.0],
                  "b": [5, 3, 2.9, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1]}  # b leads until step 30, a from 40 on
    result = SweepResult([_run(n, 1e-3, 0, v) for n, v in early_swap.items()], {})
    stable = rank_stability(result)
    assert stable["steps"] == [70, 80, 90, 100] and stable["evaluations"] == 4
    assert stable["stable"] and stable["swapped"] == [] and stable["final_order"] == ["a", "b"]
    assert not rank_stability(result, window=0.8)["stable"]  # the early swap is inside a window of 80%
    late_swap = {"a": [5, 4, 3, 2.6, 2.5, 2.4, 2.3, 2.25, 2.15, 2.05],
                 "b": [5, 4, 3, 2.7, 2.6, 2.5, 2.35, 2.2, 2.1, 2.0],  # b passes a at step 80
                 "c": [5, 4, 3, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3]}
    swapped = rank_stability(SweepResult([_run(n, 1e-3, 0, v) for n, v in late_swap.items()], {}))
    assert not swapped["stable"] and swapped["swapped"] == [["a", "b"]]
    assert swapped["orders"][0] == ["a", "b", "c"] and swapped["final_order"] == ["b", "a", "c"]
    # the mean over seeds decides: a second seed of a that ends low keeps a ahead throughout
    seeded = [_run(n, 1e-3, 0, v) for n, v in late_swap.items()]
    seeded.append(_run("a", 1e-3, 1, [5, 4, 3, 2.6, 2.5, 2.4, 2.1, 2.0, 1.9, 1.8]))
    assert rank_stability(SweepResult(seeded, {}))["stable"]
    with pytest.raises(ConfigError, match="window"):
        rank_stability(result, window=0)


def test_gap_over_steps_and_whether_it_is_still_closing():
    # steps 10..100; b trails a by 1.0, 0.8, ..., then the gap stops shrinking at step 90
    a = [5, 4, 3.5, 3.0, 2.8, 2.6, 2.5, 2.4, 2.3, 2.2]
    b = [6, 4.8, 4.1, 3.5, 3.2, 2.9, 2.75, 2.6, 2.5, 2.45]
    seeds = [_run("a", 1e-3, 0, a), _run("a", 1e-3, 1, [v + 0.2 for v in a]), _run("b", 1e-3, 0, b)]
    gaps = gap_over_steps(SweepResult(seeds, {}), "a", "b")  # a's mean over its two seeds is a + 0.1
    assert [g["step"] for g in gaps] == list(range(10, 101, 10))
    assert [round(g["gap"], 6) for g in gaps] == [round(y - x - 0.1, 6) for x, y in zip(a, b)]
    assert still_closing(gaps, [60, 70, 80])  # 0.2, 0.15, 0.1
    assert not still_closing(gaps, [70, 80, 90, 100])  # 0.1 at 80 and at 90, then 0.15
    assert not still_closing(gaps, [100])  # one evaluation shows no trend


def test_sweeps_saved_before_the_grid_read_back_as_one_seed():
    payload = {"variants": [dataclasses.asdict(_run("gdn", 1e-3, 0, [3.0, 2.0]))], "setup": {}, "ranking": ["gdn"]}
    del payload["variants"][0]["seed"]
    old = SweepResult.from_dict({"results": payload, "environment": {}})
    assert old.names == ["gdn"] and old["gdn"].seed == 0 and old.summaries()["gdn"]["n"] == 1
    assert old.noise is None and old.ranking() == ["gdn"]


def test_budget_counts_every_rate_and_extra_seed(variants, data, tmp_path):
    config = CONFIG.replace(steps=100_000, warmup_steps=1000, eval_every=20_000, save_every=0)
    one = budget_train_config(variants, config, data, max_seconds=60.0, min_steps=5)
    grid = budget_train_config(variants, config, data, max_seconds=60.0, min_steps=5,
                               learning_rates=[1e-3, 2e-3, 4e-3], seeds=3, seeded=1)
    costly = max(grid.step_seconds, key=grid.step_seconds.get)
    assert one.runs == {"gdn": 1, "late": 1}
    assert grid.runs == {name: 3 + 2 * (name == costly) for name in ("gdn", "late")}
    assert grid.train_config.steps < one.train_config.steps  # 8 runs where there was 2
    assert grid.calibration_seconds + grid.estimated_seconds <= 60.0 + 1e-6
    evaluations, steps = config.steps // config.eval_every, grid.train_config.steps
    assert grid.estimated_seconds == pytest.approx(sum(
        runs * (steps * grid.step_seconds[n] + (evaluations + 1) * grid.run_overhead_seconds[n])
        for n, runs in grid.runs.items()))
