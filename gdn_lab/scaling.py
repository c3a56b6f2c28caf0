"""Scaling: validation loss against model size, a power law fitted to it, and training FLOPs.

    L(N) = a * N^-alpha + c        (N: non-embedding parameters; c: the loss no size removes)

`fit_power_law` fits it by variable projection: for a fixed alpha the model is linear in (a, c),
solved exactly by least squares (c kept >= 0), so only alpha is searched (a log grid, then golden
section).
With `irreducible=False` it fits Kaplan et al.'s form L = a N^-alpha (c = 0) as a straight line
in log-log. Uncertainty two ways: `PowerLawFit.stderr` from the fit's covariance (residual
variance x (J^T J)^-1 at the optimum; needs more points than parameters) and `bootstrap_fit`,
which resamples the seeds of every size and refits (needs two seeds or more per size).

    fit = fit_power_law([1e6, 2e6, 4e6, 8e6], [3.1, 2.8, 2.6, 2.45])
    fit.alpha, fit.c, fit.predict(16e6)      # the exponent, the floor, the loss extrapolated to 16M

FLOPs (`flops_per_token`, `training_flops`): 6 N D for the parameters (Kaplan et al. 2020: a
multiply-add is 2 FLOPs, the backward pass twice the forward), plus the output head's matmul,
plus each token mixer's own work beyond its projections, times 3 for forward and backward:
  GDN layer: 8 H K V per token (the recurrence: read S^T k, the rank-1 update, the decay and the
             addition, the read-out S^T q: four K x V operations of 2 FLOPs per element).
  attention: 2 (T + 1) d per token (causal q k^T and the weighted sum of values, 2 FLOPs per
             multiply-add, each over (T + 1) / 2 keys on average at context T; d = hidden size).
  sliding-window attention (window W): 4 d times the mean over positions of min(t + 1, W) keys,
             which is the line above when W >= T.
FLA's chunked kernels also do intra-chunk work of order C (K + V) per token (C = 64), left out.

Published exponents to compare (`KAPLAN_2020`, `CHINCHILLA_2022`): they are fits at other data,
tokenizers, sizes (10^6 to 10^10 parameters) and token budgets; only the rough size compares.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from . import stats
from .config import ConfigError, ModelConfig, TrainConfig
from .models import count_params, embedding_params

# Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv 2001.08361), eq. 1.1: at
# convergence, L(N) = (N_c / N)^alpha_N with N non-embedding parameters (WebText2, BPE, nats per token).
KAPLAN_2020 = {"alpha_N": 0.076, "N_c": 8.8e13, "source": "Kaplan et al. 2020, arXiv 2001.08361, eq. 1.1"}
# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla, arXiv 2203.15556),
# approach 3: L(N, D) = E + A / N^alpha + B / D^beta (MassiveText, nats per token); compute-optimal at
# about 20 tokens per parameter.
CHINCHILLA_2022 = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "tokens_per_param": 20,
                   "source": "Hoffmann et al. 2022, arXiv 2203.15556, approach 3 (eq. 10)"}
# The GDN paper's language models (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464): its ablations at
# 400M parameters on 15B tokens, its main results at 1.3B on 100B (both FineWeb-Edu; no fitted exponent).
GDN_PAPER_SIZES = [{"params": 4e8, "tokens": 15e9}, {"params": 1.3e9, "tokens": 100e9}]
ALPHA_BOUNDS = (1e-3, 3.0)


# ----------------------------------------------------------------------------- the fit


@dataclass
class PowerLawFit:
    """L(N) = a * N^-alpha + c fitted to `n` points. `a_ref` is the amplitude at N = `n_ref` (the
    geometric mean of the sizes: a = a_ref * n_ref^alpha, which can be a huge number); `c` >= 0 (held
    at 0 where the points would put it below: then the fit is a pure power law in linear space);
    `rmse` the root mean squared residual; `stderr` {"a_ref", "alpha", "c"} from the covariance of
    the free parameters (c's is 0 when it is held; None when there are no more points than free
    parameters); `at_bound`: alpha stopped at a search bound (the points do not bend the way the form
    needs: read alpha as unresolved)."""

    alpha: float
    a_ref: float
    c: float
    n_ref: float
    rmse: float
    n: int
    irreducible: bool
    stderr: dict | None = None
    at_bound: bool = False

    @property
    def a(self) -> float:
        return self.a_ref * self.n_ref ** self.alpha

    def predict(self, n: float | Sequence[float]) -> float | list[float]:
        """L at size(s) `n`."""
        if isinstance(n, Sequence | np.ndarray):
            return [self.predict(float(x)) for x in n]
        return self.a_ref * (n / self.n_ref) ** -self.alpha + self.c

    def to_dict(self) -> dict:
        return {**asdict(self), "a": self.a}


def _linear_part(u: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(a_ref, c, rss) of the least-squares fit y ~ a_ref u^-alpha + c at fixed alpha, with c >= 0 (a
    loss below zero is impossible: where the free fit wants c < 0, c is held at 0)."""
    power = u ** -alpha
    design = np.stack([power, np.ones_like(u)], axis=1)
    (a_ref, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    if c < 0:
        a_ref, c = float(power @ y / (power @ power)), 0.0
    residual = y - a_ref * power - c
    return float(a_ref), float(c), float(residual @ residual)


def fit_power_law(n: Sequence[float], loss: Sequence[float], irreducible: bool = True,
                  alpha_bounds: tuple[float, float] = ALPHA_BOUNDS) -> PowerLawFit:
    """Least-squares fit of L(N) = a N^-alpha + c with c >= 0 (`irreducible`) or a N^-alpha (c = 0, in
    log-log) to sizes `n` and losses `loss` (means over seeds, say). Needs 3 distinct sizes (2 without c)."""
    x, y = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ConfigError(f"n and loss must be two lists of the same length, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (x > 0).all()):
        raise ConfigError("n must be positive and n, loss finite; leave out sizes whose runs all diverged")
    needed = 3 if irreducible else 2
    if len(np.unique(x)) < needed:
        raise ConfigError(f"{len(np.unique(x))} distinct sizes; the {'3' if irreducible else '2'}-parameter fit "
                          f"needs at least {needed}")
    n_ref = float(np.exp(np.log(x).mean()))
    u = x / n_ref
    if not irreducible:
        if not (y > 0).all():
            raise ConfigError("the c = 0 fit takes logarithms: every loss must be positive")
        slope, intercept = np.polyfit(np.log(u), np.log(y), 1)
        alpha, a_ref = float(-slope), float(np.exp(intercept))
        fitted = a_ref * u ** -alpha
        dof = len(x) - 2
        stderr = None
        if dof > 0:
            residual = np.log(y) - np.log(fitted)
            s2 = float(residual @ residual) / dof
            spread = float(((np.log(u) - np.log(u).mean()) ** 2).sum())
            stderr = {"alpha": math.sqrt(s2 / spread), "a_ref": a_ref * math.sqrt(s2 / len(x)), "c": 0.0}
        return PowerLawFit(alpha, a_ref, 0.0, n_ref, float(np.sqrt(((y - fitted) ** 2).mean())), len(x), False,
                           stderr)

    low, high = math.log(alpha_bounds[0]), math.log(alpha_bounds[1])
    grid = np.linspace(low, high, 400)
    rss = [_linear_part(u, y, math.exp(g))[2] for g in grid]
    i = int(np.argmin(rss))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(80):  # golden-section search on log alpha between the grid neighbours of the best point
        c1, c2 = b - golden * (b - a), a + golden * (b - a)
        if _linear_part(u, y, math.exp(c1))[2] <= _linear_part(u, y, math.exp(c2))[2]:
            b = c2
        else:
            a = c1
    alpha = math.exp((a + b) / 2)
    a_ref, c, rss_best = _linear_part(u, y, alpha)
    at_bound = i in (0, len(grid) - 1)
    stderr = None
    free = ("a_ref", "alpha", "c") if c > 0 else ("a_ref", "alpha")  # c held at 0 is not a free parameter
    dof = len(x) - len(free)
    if dof > 0:
        power = u ** -alpha
        columns = [power, -a_ref * power * np.log(u), np.ones_like(u)][:len(free)]
        jacobian = np.stack(columns, axis=1)
        covariance = rss_best / dof * np.linalg.pinv(jacobian.T @ jacobian)
        stderr = {"c": 0.0, **dict(zip(free, np.sqrt(np.clip(np.diag(covariance), 0, None)).tolist()))}
    return PowerLawFit(alpha, a_ref, c, n_ref, math.sqrt(rss_best / len(x)), len(x), True, stderr, at_bound)


def bootstrap_fit(n: Sequence[float], losses: Sequence[Sequence[float]], irreducible: bool = True,
                  samples: int = 500, level: float = 0.9, seed: int = 0) -> dict:
    """Seed bootstrap of `fit_power_law`: `losses[i]` holds the losses of size `n[i]` over its seeds.
    Each sample draws every size's seeds with replacement, averages them and refits.

    Returns {"fit" (to the means, as a dict), "alpha", "c" (the central `level` interval of the
    samples, [low, high]), "samples" (fits that succeeded), "resampled" (False when no size has two
    seeds: every sample is the same fit and the interval has zero width, i.e. no seed uncertainty
    is measured)}."""
    if len(n) != len(losses):
        raise ConfigError(f"{len(n)} sizes but {len(losses)} lists of losses; give one list per size")
    clean = [[float(v) for v in values if v is not None and math.isfinite(v)] for values in losses]
    kept = [(size, values) for size, values in zip(n, clean) if values]
    sizes = [size for size, _ in kept]
    means = [sum(values) / len(values) for _, values in kept]
    fit = fit_power_law(sizes, means, irreducible)
    resampled = any(len(values) > 1 for _, values in kept)
    rng = np.random.default_rng(seed)
    alphas, cs = [], []
    for _ in range(samples if resampled else 1):
        drawn = [float(np.mean(rng.choice(values, size=len(values)))) for _, values in kept]
        try:
            refit = fit_power_law(sizes, drawn, irreducible)
        except ConfigError:
            continue
        alphas.append(refit.alpha)
        cs.append(refit.c)
    return {"fit": fit.to_dict(), "alpha": list(stats.interval(alphas, level)) if alphas else None,
            "c": list(stats.interval(cs, level)) if cs else None, "level": level, "samples": len(alphas),
            "resampled": resampled}


def crossings(fit_a: PowerLawFit, fit_b: PowerLawFit, low: float, high: float, points: int = 2000) -> list[float]:
    """The sizes in [low, high] where the two fitted curves cross (sign changes of their difference on
    a log grid, each refined by interpolation); [] when one stays below the other throughout."""
    grid = np.exp(np.linspace(math.log(low), math.log(high), points))
    gap = np.array(fit_a.predict(grid)) - np.array(fit_b.predict(grid))
    found = []
    for i in np.nonzero(np.sign(gap[:-1]) * np.sign(gap[1:]) < 0)[0]:
        t = gap[i] / (gap[i] - gap[i + 1])
        found.append(float(math.exp(math.log(grid[i]) + t * (math.log(grid[i + 1]) - math.log(grid[i])))))
    return found


def chinchilla_loss(params: float, tokens: float, law: Mapping = CHINCHILLA_2022) -> float:
    """Chinchilla's L(N, D) = E + A N^-alpha + B D^-beta (nats per token of its data and tokenizer)."""
    return law["E"] + law["A"] * params ** -law["alpha"] + law["B"] * tokens ** -law["beta"]


def chinchilla_exponent(sizes: Sequence[float], tokens_per_param: float, law: Mapping = CHINCHILLA_2022) -> float:
    """The alpha a fit of L = a N^-alpha + c finds on Chinchilla's law at these sizes when every size
    trains `tokens_per_param` tokens per parameter (D = r N): between its beta (0.28) and alpha (0.34)."""
    losses = [chinchilla_loss(n, tokens_per_param * n, law) for n in sizes]
    return fit_power_law(sizes, losses).alpha


# ----------------------------------------------------------------------------- sizes, budgets, FLOPs


def non_embedding_params(config: ModelConfig) -> int:
    """N of the scaling laws (Kaplan et al.): every parameter but the embedding and output head."""
    return count_params(config) - embedding_params(config)


def mixer_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the token mixers' own work beyond their projections (module
    docstring): 8 H K V per GDN layer, 4 hidden_size x (keys a query sees, on average over the
    sequence) per attention layer: (seq_len + 1) / 2 for full attention, fewer in a window."""
    gdn = 8 * config.num_heads * config.head_dim * config.head_v_dim
    full = 4 * config.hidden_size * mean_keys_attended(seq_len)
    window = 4 * config.hidden_size * mean_keys_attended(seq_len, config.swa_window)
    return float(config.num_gdn_layers * gdn + config.num_attn_layers * full + config.num_swa_layers * window)


def mean_keys_attended(seq_len: int, window: int | None = None) -> float:
    """The mean over positions t = 0 .. seq_len-1 of the keys a causal query sees, min(t + 1, window):
    (seq_len + 1) / 2 without a window."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (non-embedding parameters) + 6 d V (the output head's matmul;
    the embedding lookup costs nothing) + 3 x the mixers' forward work (`mixer_flops_per_token`)."""
    head = config.hidden_size * config.vocab_size
    return 6.0 * non_embedding_params(config) + 6.0 * head + 3.0 * mixer_flops_per_token(config, seq_len)


def training_flops(config: ModelConfig, tokens: float, seq_len: int) -> float:
    """C = tokens x `flops_per_token`: 6 N D plus the head and the mixers' own cost."""
    return float(tokens) * flops_per_token(config, seq_len)


def size_ladder(base: ModelConfig, shapes: Sequence[Sequence[int]], patterns: Mapping[str, str],
                head_dim: int = 64) -> list[tuple[dict, ModelConfig]]:
    """One config per (architecture, shape): `base` at every (hidden_size, num_layers) of `shapes`,
    with hidden_size // head_dim heads of `head_dim` (GDN and attention alike), attention layers
    from each pattern ({"gdn": "gdn", "transformer": "transformer", "sparse": "sparse"}: see
    `gdn_lab.config.hybrid_layers`). Labels: {"arch", "shape" ("256x8"), "params" (non-embedding)}."""
    ladder = []
    for hidden, layers in shapes:
        if hidden % head_dim:
            raise ConfigError(f"hidden_size {hidden} is not a multiple of head_dim {head_dim}; pick shapes in "
                              f"multiples of {head_dim} or another head_dim")
        heads = hidden // head_dim
        for arch, pattern in patterns.items():
            config = base.replace(hidden_size=hidden, num_layers=layers, num_heads=heads, head_dim=head_dim,
                                  attn_num_heads=heads, attn_layers=pattern)
            ladder.append(({"arch": arch, "shape": f"{hidden}x{layers}", "params": non_embedding_params(config)},
                           config))
    return ladder


def token_budget(config: ModelConfig, train_config: TrainConfig, tokens_per_param: float, evaluations: int = 4,
                 min_steps: int = 2) -> TrainConfig:
    """`train_config` for `tokens_per_param` x N training tokens (N non-embedding): steps = round(tokens /
    (batch_size x seq_len)), warmup a tenth of them, `evaluations` evaluations spread over the run.
    Where that gives fewer than `min_steps` steps, the batch shrinks (in multiples of grad_accum) until
    the run takes `min_steps`: a run of a few dozen steps would measure its warmup more than its size."""
    tokens = tokens_per_param * non_embedding_params(config)
    batch, accum = train_config.batch_size, train_config.grad_accum
    steps = round(tokens / (batch * train_config.seq_len))
    if steps < min_steps:
        batch = max(accum, int(tokens // (min_steps * train_config.seq_len)) // accum * accum)
        steps = max(min_steps, round(tokens / (batch * train_config.seq_len)))
    return train_config.replace(steps=steps, batch_size=batch, warmup_steps=max(1, steps // 10),
                                eval_every=max(1, steps // max(1, evaluations)))


def add_flops(rows: Sequence[dict], points: Sequence[tuple], key: Sequence[str] = ("arch", "shape")) -> list[dict]:
    """`rows` (one per point) with the point's "steps", "batch_size", "tokens" (steps x batch x seq_len)
    and "flops" (`training_flops`) added; `points`: the (labels, config, data, train_config) that ran."""
    budget = {}
    for labels, config, _, train_config in points:
        tokens = train_config.steps * train_config.batch_size * train_config.seq_len
        budget[tuple(labels[k] for k in key)] = {
            "steps": train_config.steps, "batch_size": train_config.batch_size, "tokens": tokens,
            "flops": training_flops(config, tokens, train_config.seq_len)}
    return [{**row, **budget[tuple(row[k] for k in key)]} for row in rows]


# ----------------------------------------------------------------------------- reading the result


def fit_architectures(rows: Sequence[dict], x: str = "params", by: str = "arch", samples: int = 500,
                      level: float = 0.9, seed: int = 0) -> dict[str, dict]:
    """Per architecture (`rows[by]`; rows of `grid.over_seeds`, one per (arch, size), "values" over
    seeds): the saturating fit with its seed bootstrap (`bootstrap_fit`), the pure power law (c = 0)
    with its bootstrap, and the sizes used. Architectures with fewer than 3 finished sizes get
    {"error": ...} instead."""
    fits = {}
    for arch in dict.fromkeys(row[by] for row in rows):
        mine = sorted((r for r in rows if r[by] == arch and r["mean"] is not None), key=lambda r: r[x])
        sizes, losses = [r[x] for r in mine], [r["values"] for r in mine]
        try:
            fits[arch] = {"sizes": sizes, "means": [r["mean"] for r in mine],
                          "saturating": bootstrap_fit(sizes, losses, True, samples, level, seed),
                          "pure": bootstrap_fit(sizes, losses, False, samples, level, seed)}
        except ConfigError as err:
            fits[arch] = {"sizes": sizes, "error": str(err)}
    return fits


def fit_of(entry: dict, kind: str = "saturating") -> PowerLawFit:
    """The PowerLawFit stored in a `fit_architectures` entry (`kind`: 'saturating' or 'pure')."""
    saved = dict(entry[kind]["fit"])
    saved.pop("a", None)
    return PowerLawFit(**saved)


def winners(rows: Sequence[dict], archs: Sequence[str], by: str = "arch", at: str = "shape") -> list[dict]:
    """Per shape (in the rows' order): the architecture with the lowest mean loss, and the ones tied
    with it (`stats.compare`, lower is better): [{"shape", "best", "tied": [...], "means": {arch: mean}}]."""
    out = []
    for shape in dict.fromkeys(row[at] for row in rows):
        here = {r[by]: r for r in rows if r[at] == shape and r[by] in archs and r["mean"] is not None}
        if not here:
            continue
        best = min(here, key=lambda name: here[name]["mean"])
        tied = [name for name in here if name != best
                and stats.compare(here[name], here[best], higher_is_better=False) == "tie"]
        out.append({"shape": shape, "best": best, "tied": tied, "means": {n: r["mean"] for n, r in here.items()}})
    return out


def _interval_text(entry: dict) -> str:
    if not entry["resampled"]:
        return "no seed interval (one seed per size)"
    low, high = entry["alpha"]
    return f"[{low:.3f}, {high:.3f}] ({entry['level']:.0%} seed bootstrap)"


def fit_markdown(fits: Mapping[str, dict]) -> str:
    """One row per architecture: the saturating fit (alpha with its bootstrap interval and covariance
    standard error, c, rmse) and the pure power law's alpha (c = 0, Kaplan's form)."""
    lines = ["| architecture | sizes (non-embedding) | alpha (L = a N^-alpha + c) | ± stderr | c | rmse | "
             "alpha with c = 0 |", "|---|---|---|---|---|---|---|"]
    for arch, entry in fits.items():
        if "error" in entry:
            lines.append(f"| {arch} | {len(entry['sizes'])} sizes | {entry['error']} | | | | |")
            continue
        fit, pure = entry["saturating"]["fit"], entry["pure"]["fit"]
        stderr = f"{fit['stderr']['alpha']:.3f}" if fit["stderr"] else "- (no spare degree of freedom)"
        bound = " (at the search bound)" if fit["at_bound"] else ""
        lines.append(
            f"| {arch} | {min(entry['sizes']) / 1e6:.2f}M-{max(entry['sizes']) / 1e6:.2f}M ({len(entry['sizes'])}) | "
            f"{fit['alpha']:.3f}{bound} {_interval_text(entry['saturating'])} | {stderr} | "
            f"{fit['c']:.3f}{' (held at 0)' if fit['c'] == 0 else ''} | "
            f"{fit['rmse']:.4f} | {pure['alpha']:.3f} {_interval_text(entry['pure'])} |")
    return "\n".join(lines)


def findings_markdown(rows: Sequence[dict], fits: Mapping[str, dict], tokens_per_param: float) -> str:
    """Sentences read from the run: who wins at each shape (ties by the seed range), whether the fitted
    curves cross inside the measured sizes, the exponents beside Kaplan's and Chinchilla's, and what
    a budget of `tokens_per_param` tokens per parameter at these sizes cannot show."""
    archs = list(dict.fromkeys(row["arch"] for row in rows))
    lines = []
    for win in winners(rows, archs):
        tied = f" (tied with {', '.join(win['tied'])})" if win["tied"] else ""
        means = ", ".join(f"{name} {mean:.4f}" for name, mean in win["means"].items())
        lines.append(f"- **{win['shape']}**: lowest loss {win['best']}{tied}; means {means}.")
    fitted = {arch: fit_of(entry) for arch, entry in fits.items() if "error" not in entry}
    for i, a in enumerate(fitted):
        for b in list(fitted)[i + 1:]:
            low = max(min(fits[a]["sizes"]), min(fits[b]["sizes"]))
            high = min(max(fits[a]["sizes"]), max(fits[b]["sizes"]))
            found = crossings(fitted[a], fitted[b], low, high) if low < high else []
            where = (f"cross at {', '.join(f'{n / 1e6:.2f}M' for n in found)} parameters" if found
                     else "do not cross")
            lines.append(f"- **{a} vs {b}**: the fitted curves {where} between {low / 1e6:.2f}M and "
                         f"{high / 1e6:.2f}M.")
    sizes = sorted({row["params"] for row in rows})
    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    if fitted:
        pure = ", ".join(f"{arch} {fits[arch]['pure']['fit']['alpha']:.3f}" for arch in fitted)
        saturating = ", ".join(f"{arch} {fitted[arch].alpha:.3f}" for arch in fitted)
        chinchilla = chinchilla_exponent(sizes, tokens_per_param) if len(sizes) >= 3 else None
        lines += [
            f"- **Exponents beside the published ones.** Kaplan et al. (2020) fit L = (N_c/N)^alpha_N with "
            f"alpha_N = {KAPLAN_2020['alpha_N']} for models trained to convergence; the c = 0 fits here give {pure}. "
            f"Chinchilla (Hoffmann et al. 2022) fits L = E + A N^-{CHINCHILLA_2022['alpha']} + "
            f"B D^-{CHINCHILLA_2022['beta']}; at {tokens_per_param:g} tokens per parameter over these sizes its "
            f"law behaves like alpha = " + (f"{chinchilla:.3f}" if chinchilla is not None else "n/a")
            + f" in the saturating form, against {saturating} here.",
            f"- **What this budget cannot show.** {tokens_per_param:g} tokens per parameter, against Chinchilla's "
            f"compute-optimal ~{CHINCHILLA_2022['tokens_per_param']} and the GDN paper's "
            f"{GDN_PAPER_SIZES[0]['tokens'] / GDN_PAPER_SIZES[0]['params']:.1f} (400M on 15B tokens) and "
            f"{GDN_PAPER_SIZES[1]['tokens'] / GDN_PAPER_SIZES[1]['params']:.0f} (1.3B on 100B): every point here is "
            f"far from convergence, so the slope mixes how fast a size learns with how far it can go. "
            f"{len(shapes)} sizes from {sizes[0] / 1e6:.2f}M to {sizes[-1] / 1e6:.2f}M parameters "
            f"({sizes[-1] / sizes[0]:.0f}x) against 10^8-10^9 in the papers; a 3-parameter fit to {len(shapes)} "
            f"points has {max(0, len(shapes) - 3)} spare degree(s) of freedom, so c and alpha trade off (read the "
            "interval, not the point); byte-level tokens of Python source, not subword tokens of web text, so loss "
            "values do not compare, only slopes roughly do; a small learning-rate grid per size.",
        ]
    return "\n".join(lines)


def by_arch(rows: Sequence[dict], key: str | None = None) -> dict[str, dict]:
    """{arch: {shape: row[key]}} (the whole row when `key` is None), in the rows' order."""
    out: dict[str, dict] = {}
    for row in rows:
        out.setdefault(row["arch"], {})[row["shape"]] = row if key is None else row[key]
    return out
