"""Ablations: Gated DeltaNet against itself with one component removed or changed at a time, and
the GDN paper's own ablation table to set the results beside.

    variants = ablation_variants(base)                # {name: ModelConfig}
    rows = compare_with_paper(lm_table)              # per variant: the paper's numbers beside this run's

The variants (`ablation_variants`), each `base` with one change:
  no decay (DeltaNet)   use_decay=False: alpha_t = 1, the delta rule alone (the paper's "naive Delta Rule")
  no short conv         use_short_conv=False: q, k, v straight from their projections
  no output gate        use_gate=False: y = o_proj(RMSNorm(o)), no SiLU(g_proj x) gate
  fixed beta            beta_t = `fixed_beta` for every token instead of sigmoid(b_proj x_t)
                        (needs ModelConfig.fixed_beta; left out, with the reason, where it is missing)
  negative eigenvalues  allow_neg_eigval=True: beta_t in (0, 2), so I - beta k k^T can flip a direction
  head_dim x0.5, x2     head_dim halved / doubled at the same num_heads x head_dim (same projections):
                        the state per layer (H K V = (H K) K expand_v) halves / doubles
  expand_v x2           twice the value dim per head: a larger state and larger v, g, o projections
  slow decay init       dt in [1e-4, 1e-3] instead of FLA's [1e-3, 0.1]: the state starts near alpha = 1

The paper (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464, appendix Table S.1) ablates the
block at 400M parameters on 15B tokens of FineWeb-Edu and reports the mean of two perplexities
(WikiText, LAMBADA) and a mean zero-shot commonsense accuracy. Its reference is GDN with head dim
128; it does not ablate a fixed beta, negative eigenvalues, expand_v or the decay init.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from . import stats
from .config import ConfigError, ModelConfig

BASE = "GDN"
# Table S.1 of arXiv 2412.06464 (appendix): (Avg-PPL, lower is better; Avg-Acc %, higher is better).
# "Avg-PPL": the mean of WikiText and LAMBADA perplexity; "Avg-Acc": commonsense reasoning, as its Table 3.
# Every number below equals two public transcriptions of the table found apart from the one first
# used (one with all twelve rows, one with the first five); the PDF itself was not read here.
GDN_PAPER_ABLATIONS = {
    "source": "Yang, Kautz, Hatamizadeh 2024 (arXiv 2412.06464), appendix Table S.1",
    "setting": "400M parameters, 15B tokens of FineWeb-Edu; reference: Gated DeltaNet with head dim 128",
    "reference": (27.35, 47.26),
    "rows": {
        "w. naive Delta Rule": (30.87, 45.12),
        "w/o. Short Conv": (28.95, 46.16),
        "w/o. Output Gate": (29.12, 45.46),
        "w/o. Output Norm": (27.55, 47.07),
        "w. L1-norm & ReLU": (30.79, 45.92),
        "w. L1-norm & 1+ELU": (30.34, 46.05),
        "w. L1-norm & SiLU": (30.18, 46.09),
        "w. L2-norm & ReLU": (27.67, 46.94),
        "w. L2-norm & 1+ELU": (27.58, 47.17),
        "w. Head Dim 64": (28.31, 46.35),
        "w. Head Dim 256": (27.13, 47.38),
    },
}
# Which row of the paper's table each variant matches (head dims: the paper halves and doubles 128).
PAPER_ROW = {"no decay (DeltaNet)": "w. naive Delta Rule", "no short conv": "w/o. Short Conv",
             "no output gate": "w/o. Output Gate", "head_dim x0.5": "w. Head Dim 64", "head_dim x2": "w. Head Dim 256"}


def ablation_variants(base: ModelConfig, fixed_beta: float = 0.5, slow_dt: Sequence[float] = (1e-4, 1e-3),
                      expand_v_factor: float = 2.0, only: Sequence[str] | None = None) -> dict[str, ModelConfig]:
    """{name: config}: `base` first (named 'GDN'), then each variant of
    the module docstring, or only those named in `only` (the base always). `base` must be pure GDN
    with an even head_dim; num_heads doubles for 'head_dim x0.5' and must be even for 'head_dim x2'."""
    if base.num_attn_layers:
        raise ConfigError(f"the ablation base must be pure GDN; it has attention at {base.attn_layers}")
    if base.head_dim % 2 or base.num_heads % 2:
        raise ConfigError(f"head_dim={base.head_dim}, num_heads={base.num_heads}: both must be even so head_dim "
                          f"can halve and double at the same num_heads x head_dim")
    variants = {
        BASE: base,
        "no decay (DeltaNet)": base.replace(use_decay=False),
        "no short conv": base.replace(use_short_conv=False),
        "no output gate": base.replace(use_gate=False),
        f"fixed beta {fixed_beta:g}": base.replace(fixed_beta=fixed_beta),
        "negative eigenvalues": base.replace(allow_neg_eigval=True),
        "head_dim x0.5": base.replace(head_dim=base.head_dim // 2, num_heads=base.num_heads * 2),
        "head_dim x2": base.replace(head_dim=base.head_dim * 2, num_heads=base.num_heads // 2),
        f"expand_v x{expand_v_factor:g}": base.replace(expand_v=base.expand_v * expand_v_factor),
        "slow decay init": base.replace(dt_min=float(slow_dt[0]), dt_max=float(slow_dt[1])),
    }
    if only:
        unknown = sorted(set(only) - set(variants))
        if unknown:
            raise ConfigError(f"no variants named {unknown}; the variants are {list(variants)}")
        variants = {name: config for name, config in variants.items() if name == BASE or name in only}
    return variants


def state_size(config: ModelConfig) -> int:
    """Numbers in one GDN layer's recurrent state per sequence: num_heads x head_dim x head_v_dim."""
    return config.num_heads * config.head_dim * config.head_v_dim


def against_base(table: Sequence[dict], higher_is_better: bool, base: str = BASE, by: str = "variant") -> dict:
    """{variant: `stats.difference` of its row against the base's} for rows of `grid.over_seeds`
    (one per variant): delta of the means, the margin a gap must exceed, and the verdict."""
    rows = {row[by]: row for row in table}
    if base not in rows:
        raise ConfigError(f"no row for the base variant {base!r}; the rows are {list(rows)}")
    return {name: stats.difference(row, rows[base], higher_is_better) for name, row in rows.items() if name != base}


def compare_with_paper(lm_table: Sequence[dict], mqar_table: Sequence[dict] | None = None,
                       base: str = BASE, by: str = "variant") -> list[dict]:
    """Number beside number, one entry per variant that ran (the base left out): the paper's row (None
    where it has none), its Avg-PPL and Avg-Acc and their change against its reference, ln of the
    perplexity ratio (a rough nats figure: the ratio of mean perplexities, not of exp(loss)); this
    run's change of validation loss against the base (nats per token) and `stats.compare`'s verdict
    (lower is better), the MQAR accuracy change and verdict when `mqar_table` is given; and "agrees":
    True when this run's LM verdict points the paper's way (its perplexity above the reference and a
    'worse' verdict here, or below and 'better'), False when it points the other way, None for a
    tie here or no paper row."""
    lm = against_base(lm_table, higher_is_better=False, base=base, by=by)
    mqar = against_base(mqar_table, higher_is_better=True, base=base, by=by) if mqar_table else {}
    ref_ppl, ref_acc = GDN_PAPER_ABLATIONS["reference"]
    out = []
    for name, ours in lm.items():
        paper = PAPER_ROW.get(name)
        ppl, acc = GDN_PAPER_ABLATIONS["rows"][paper] if paper else (None, None)
        paper_worse = None if ppl is None else ppl > ref_ppl
        agrees = None
        if paper_worse is not None and ours["verdict"] != "tie":
            agrees = (ours["verdict"] == "worse") == paper_worse
        out.append({
            "variant": name, "paper_row": paper, "paper_ppl": ppl, "paper_acc": acc,
            "paper_delta_ppl": None if ppl is None else ppl - ref_ppl,
            "paper_delta_acc": None if acc is None else acc - ref_acc,
            "paper_log_ppl_ratio": None if ppl is None else math.log(ppl / ref_ppl),
            "lm_delta": ours["delta"], "lm_margin": ours["margin"], "lm_verdict": ours["verdict"],
            "mqar_delta": mqar.get(name, {}).get("delta"), "mqar_verdict": mqar.get(name, {}).get("verdict"),
            "agrees": agrees})
    return out


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def comparison_markdown(rows: Sequence[dict]) -> str:
    """`compare_with_paper`'s rows as a markdown table, the paper's numbers beside this run's."""
    lines = ["| variant | paper row | paper Avg-PPL (Δ) | paper Avg-Acc (Δ) | paper ln PPL ratio | LM Δ loss here "
             "(margin) | LM verdict | MQAR Δ accuracy | MQAR verdict | same direction |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = (f"{r['paper_ppl']:.2f} ({r['paper_delta_ppl']:+.2f})" if r["paper_ppl"] is not None
                 else "not ablated")
        acc = f"{r['paper_acc']:.2f} ({r['paper_delta_acc']:+.2f})" if r["paper_acc"] is not None else "-"
        lm = f"{_number(r['lm_delta'], '+.4f')} ({_number(r['lm_margin'], '.4f')})"
        agrees = {True: "yes", False: "**no**", None: "-"}[r["agrees"]]
        lines.append(f"| {r['variant']} | {r['paper_row'] or '-'} | {paper} | {acc} | "
                     f"{_number(r['paper_log_ppl_ratio'], '+.3f')} | {lm} | {r['lm_verdict']} | "
                     f"{_number(r['mqar_delta'], '+.3f')} | {r['mqar_verdict'] or '-'} | {agrees} |")
    return "\n".join(lines)


def variant_markdown(lm_table: Sequence[dict], mqar_table: Sequence[dict], base: str = BASE,
                     by: str = "variant") -> str:
    """One row per variant: LM final validation loss (mean ± std over seeds, range), its change against
    the base and the verdict; the same for MQAR accuracy; the rate each task chose."""
    lm, mqar = against_base(lm_table, False, base, by), against_base(mqar_table, True, base, by)
    rows = {row[by]: row for row in mqar_table}
    lines = ["| variant | LM val loss | LM range | Δ vs GDN | verdict | lr | MQAR accuracy | MQAR range | Δ vs GDN "
             "| verdict | lr |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in lm_table:
        name, other = row[by], rows.get(row[by])
        cells = [name, stats.format_summary(row, 4), _number(row["spread"], ".4f"),
                 _number(lm.get(name, {}).get("delta"), "+.4f"), lm.get(name, {}).get("verdict", "(base)"),
                 f"{row['chosen_lr']:.0e}"]
        if other is not None:
            cells += [stats.format_summary(other, 3), _number(other["spread"], ".3f"),
                      _number(mqar.get(name, {}).get("delta"), "+.3f"), mqar.get(name, {}).get("verdict", "(base)"),
                      f"{other['chosen_lr']:.0e}"]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings_markdown(paper_rows: Sequence[dict]) -> str:
    """Sentences read from `compare_with_paper`'s rows: which variants the LM and MQAR runs call worse,
    better or tied against the base, and how many of the paper's rows this run agrees with."""
    def names(key: str, verdict: str) -> str:
        found = [r["variant"] for r in paper_rows if r[key] == verdict]
        return ", ".join(found) if found else "none"

    compared = [r for r in paper_rows if r["paper_row"] is not None]
    agree = [r["variant"] for r in compared if r["agrees"] is True]
    disagree = [r["variant"] for r in compared if r["agrees"] is False]
    unresolved = [r["variant"] for r in compared if r["agrees"] is None]
    lines = [
        f"- **Language modelling** (lower loss is better; a gap inside the larger seed range is a tie): worse than "
        f"GDN: {names('lm_verdict', 'worse')}; better: {names('lm_verdict', 'better')}; tied: "
        f"{names('lm_verdict', 'tie')}.",
        f"- **MQAR** at the state bottleneck (higher accuracy is better): worse than GDN: "
        f"{names('mqar_verdict', 'worse')}; better: {names('mqar_verdict', 'better')}; tied: "
        f"{names('mqar_verdict', 'tie')}.",
        f"- **Against the paper's Table S.1** ({len(compared)} rows matched; direction of the LM loss against the "
        f"base here vs of the perplexity against the paper's reference): same direction for {len(agree)} "
        f"({', '.join(agree) or 'none'}), the opposite for {len(disagree)} ({', '.join(disagree) or 'none'}), "
        f"unresolved (a tie here) for {len(unresolved)} ({', '.join(unresolved) or 'none'}).",
    ]
    return "\n".join(lines)
