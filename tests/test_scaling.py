"""gdn_lab.scaling: the power-law fit recovers known exponents, its uncertainty, the FLOPs formula,
the size ladder and token budget; and the interval helpers of gdn_lab.stats it uses."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gdn_lab import scaling, stats
from gdn_lab.config import ConfigError, ModelConfig, TrainConfig, get_preset
from gdn_lab.models import build_model

SIZES = [1e6, 2e6, 4e6, 8e6, 16e6, 32e6]


def saturating(n, a=50.0, alpha=0.3, c=1.5):
    return a * n ** -alpha + c


def test_fit_recovers_a_known_exponent_from_noisy_points():
    rng = np.random.default_rng(0)
    losses = [[saturating(n) + rng.normal(0, 0.003) for _ in range(3)] for n in SIZES]
    result = scaling.bootstrap_fit(SIZES, losses, samples=300, seed=0)
    fit = result["fit"]
    assert abs(fit["alpha"] - 0.3) < 0.03 and abs(fit["c"] - 1.5) < 0.05, fit
    low, high = result["alpha"]
    assert result["resampled"] and result["samples"] == 300
    assert low <= fit["alpha"] <= high and low < 0.3 < high + 0.02  # the interval sits on the truth
    assert fit["stderr"]["alpha"] > 0 and not fit["at_bound"]
    assert abs(scaling.PowerLawFit(**{k: v for k, v in fit.items() if k != "a"}).predict(64e6)
               - saturating(64e6)) < 0.02


def test_fit_is_exact_on_noiseless_points_and_predicts():
    fit = scaling.fit_power_law(SIZES[:4], [saturating(n, a=10.0, alpha=0.5, c=2.0) for n in SIZES[:4]])
    assert fit.alpha == pytest.approx(0.5, abs=1e-4) and fit.c == pytest.approx(2.0, abs=1e-4)
    assert fit.a == pytest.approx(10.0, rel=1e-3) and fit.rmse < 1e-8
    assert fit.predict(5e6) == pytest.approx(saturating(5e6, a=10.0, alpha=0.5, c=2.0), abs=1e-6)
    assert fit.predict([1e6, 2e6]) == pytest.approx([saturating(1e6, 10.0, 0.5, 2.0), saturating(2e6, 10.0, 0.5, 2.0)])


def test_pure_power_law_recovers_kaplans_exponent():
    rng = np.random.default_rng(1)
    losses = [(8.8e13 / n) ** 0.076 * math.exp(rng.normal(0, 0.002)) for n in SIZES]
    fit = scaling.fit_power_law(SIZES, losses, irreducible=False)
    assert abs(fit.alpha - 0.076) < 0.005 and fit.c == 0.0 and fit.stderr["alpha"] < 0.005


def test_three_points_fit_without_a_standard_error_and_one_seed_without_an_interval():
    fit = scaling.fit_power_law(SIZES[:3], [saturating(n) for n in SIZES[:3]])
    assert fit.stderr is None  # 3 points, 3 parameters: no spare degree of freedom
    one_seed = scaling.bootstrap_fit(SIZES[:4], [[saturating(n)] for n in SIZES[:4]])
    assert not one_seed["resampled"] and one_seed["alpha"][0] == one_seed["alpha"][1]


def test_fit_refuses_too_few_sizes_and_bad_values():
    with pytest.raises(ConfigError, match="distinct sizes"):
        scaling.fit_power_law([1e6, 1e6, 2e6], [3.0, 3.1, 2.9])
    with pytest.raises(ConfigError, match="positive"):
        scaling.fit_power_law([0, 1e6, 2e6], [3.0, 2.0, 1.0])


def test_crossings_inside_the_range_only():
    a = scaling.fit_power_law(SIZES, [saturating(n, a=50.0, alpha=0.3, c=1.5) for n in SIZES])
    b = scaling.fit_power_law(SIZES, [saturating(n, a=5.0, alpha=0.2, c=1.95) for n in SIZES])
    found = scaling.crossings(a, b, SIZES[0], SIZES[-1])
    assert len(found) == 1
    assert a.predict(found[0]) == pytest.approx(b.predict(found[0]), abs=1e-3)
    assert scaling.crossings(a, b, SIZES[0], found[0] / 2) == []


def test_chinchilla_exponent_lies_between_its_two_exponents():
    alpha = scaling.chinchilla_exponent([1e6, 3e6, 7e6, 15e6], tokens_per_param=4)
    assert scaling.CHINCHILLA_2022["beta"] - 0.01 < alpha < scaling.CHINCHILLA_2022["alpha"] + 0.01


def test_flops_formula_on_a_known_config():
    config = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, attn_layers=(1,), num_heads=2, head_dim=16,
                         expand_v=2.0, attn_num_heads=4, backend="torch")
    n = build_model(config).num_params() - 2 * 256 * 64  # untied: embedding and output head
    assert scaling.non_embedding_params(config) == n
    # one GDN layer: 8 H K V = 8 * 2 * 16 * 32; one attention layer at T = 128: 2 * 129 * 64
    assert scaling.mixer_flops_per_token(config, 128) == 8 * 2 * 16 * 32 + 2 * 129 * 64 == 24704
    per_token = 6 * n + 6 * 64 * 256 + 3 * 24704
    assert scaling.flops_per_token(config, 128) == per_token
    assert scaling.training_flops(config, 1000, 128) == 1000 * per_token
    # sliding-window attention: a query at position t sees min(t + 1, W) keys; by brute force over t
    swa = config.replace(attn_layers=(), swa_layers=(1,), swa_window=32)
    keys = sum(min(t + 1, 32) for t in range(128)) / 128
    assert scaling.mean_keys_attended(128, 32) == keys and scaling.mean_keys_attended(128, 512) == 129 / 2
    assert scaling.mixer_flops_per_token(swa, 128) == 8 * 2 * 16 * 32 + 4 * 64 * keys < 24704


def test_size_ladder_and_token_budget():
    base = get_preset("h100").model.replace(vocab_size=256, backend="torch")
    ladder = scaling.size_ladder(base, [[128, 4], [256, 8]], {"gdn": "gdn", "sparse": "sparse"})
    assert [labels["shape"] for labels, _ in ladder] == ["128x4", "128x4", "256x8", "256x8"]
    (gdn_labels, gdn), (_, sparse) = ladder[:2]
    assert gdn.num_heads == gdn.attn_num_heads == 2 and gdn.head_dim == 64 and gdn.attn_layers == ()
    assert sparse.attn_layers == (1, 3) and gdn_labels["params"] == scaling.non_embedding_params(gdn)
    budget = scaling.token_budget(gdn, TrainConfig(batch_size=8, seq_len=64), tokens_per_param=2.0, evaluations=4)
    assert budget.steps == round(2.0 * gdn_labels["params"] / (8 * 64))
    assert budget.warmup_steps == budget.steps // 10 and budget.eval_every == budget.steps // 4
    few = scaling.token_budget(gdn, TrainConfig(batch_size=64, seq_len=64, grad_accum=2), tokens_per_param=2.0,
                               min_steps=2000)
    assert few.steps >= 2000 and few.batch_size < 64 and few.batch_size % 2 == 0  # the batch shrinks instead
    assert abs(few.steps * few.batch_size * 64 - 2.0 * gdn_labels["params"]) <= few.batch_size * 64 / 2
    with pytest.raises(ConfigError, match="multiple of head_dim"):
        scaling.size_ladder(base, [[100, 2]], {"gdn": "gdn"})


def test_winners_call_ties_by_the_seed_range():
    def row(arch, shape, values):
        return {"arch": arch, "shape": shape, **stats.summarize(values)}

    rows = [row("gdn", "a", [3.0, 3.1]), row("transformer", "a", [3.05, 3.2]),
            row("gdn", "b", [2.5, 2.51]), row("transformer", "b", [2.8, 2.81])]
    assert scaling.winners(rows, ["gdn", "transformer"]) == [
        {"shape": "a", "best": "gdn", "tied": ["transformer"], "means": {"gdn": 3.05, "transformer": 3.125}},
        {"shape": "b", "best": "gdn", "tied": [], "means": {"gdn": 2.505, "transformer": pytest.approx(2.805)}}]


def test_stats_percentile_interval_and_difference():
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5 and stats.percentile([5], 90) == 5.0
    assert stats.interval(list(range(101)), 0.9) == (pytest.approx(5.0), pytest.approx(95.0))
    a, b = stats.summarize([1.0, 1.1]), stats.summarize([2.0, 2.05])
    assert stats.difference(a, b, higher_is_better=False) == {"delta": pytest.approx(-0.975),
                                                              "margin": pytest.approx(0.1), "verdict": "better"}
    assert stats.difference(a, stats.summarize([None]))["verdict"] == "tie"
