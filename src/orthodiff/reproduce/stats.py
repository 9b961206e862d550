"""Deciding "ours beats theirs" over seeds, in a way that sharpens as seeds are added.

Each claim is a Welch two-sample comparison of the two arms' seeds (no equal-variance
assumption): the difference of the means with its Welch CI and two-sided p-value. A table's
claims are one family: their p-values are Holm-adjusted together, and a claim holds (or does
not) when its adjusted p < alpha. Otherwise the two are equivalent when a TOST (two one-sided
Welch tests) shows |difference| < margin, ±5 % of the metric's base-to-ceiling range, again
Holm-adjusted across the family; else we cannot tell. Diverged seeds (NaN) are dropped, and an
arm with fewer than 2 seeds left has no spread, so its claim is never decided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

HOLDS, FAILS, EQUIVALENT, CANNOT = "holds", "does not hold", "equivalent", "cannot tell"
VERDICTS = (HOLDS, FAILS, EQUIVALENT, CANNOT)
Verdict = tuple[str, str]  # (label, one-line reason)


@dataclass(frozen=True)
class Comparison:
    difference: float  # mean ours - mean theirs (raw sign: see higher_is_better)
    ci: tuple[float, float]  # Welch CI of the difference at `level`
    n_ours: int
    n_theirs: int
    p: float  # two-sided Welch p-value, difference != 0
    p_equivalent: float  # TOST p-value, |difference| < margin (nan without a margin)
    margin: float | None
    higher_is_better: bool
    level: float = 0.95


def compare(ours: Sequence[float], theirs: Sequence[float], higher_is_better: bool, margin: float | None = None,
            alpha: float = 0.05) -> Comparison:
    """Welch's comparison of two arms of seeds, its CI at 1 - alpha. Two arms without spread (each
    arm's seeds all equal, e.g. steps on the validation grid) have no t statistic: p = 0 when the
    means differ and 1 when not, the CI is the point, and the TOST p is 0 or 1 by |difference| < margin."""
    a, b = (np.array([v for v in arm if math.isfinite(v)], dtype=float) for arm in (ours, theirs))
    nan = math.nan
    if len(a) < 2 or len(b) < 2:
        difference = float(a.mean() - b.mean()) if len(a) and len(b) else nan
        return Comparison(difference, (nan, nan), len(a), len(b), nan, nan, margin, higher_is_better, 1 - alpha)
    difference = float(a.mean() - b.mean())
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        p = float(difference == 0)
        p_equivalent = nan if margin is None else float(abs(difference) >= margin)
        return Comparison(difference, (difference, difference), len(a), len(b), p, p_equivalent, margin,
                          higher_is_better, 1 - alpha)
    welch = stats.ttest_ind(a, b, equal_var=False)
    ci = welch.confidence_interval(1 - alpha)
    p_equivalent = nan
    if margin is not None:  # shifting an arm moves the difference, not the spread
        above = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue  # difference > -margin
        below = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue  # difference < +margin
        p_equivalent = float(max(above, below))
    return Comparison(difference, (float(ci.low), float(ci.high)), len(a), len(b), float(welch.pvalue), p_equivalent,
                      margin, higher_is_better, 1 - alpha)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN and is
    not counted in the family size."""
    adjusted = [math.nan] * len(p_values)
    order = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def format_difference(c: Comparison, digits: int = 3) -> str:
    """"+0.041 [+0.020, +0.062]": the difference and its CI, for a table's cell (no CI below 2 seeds)."""
    if math.isnan(c.difference):
        return "n/a"
    if math.isnan(c.ci[0]):
        return signed(c.difference, digits)
    return f"{signed(c.difference, digits)} [{signed(c.ci[0], digits)}, {signed(c.ci[1], digits)}]"


def decide(comparisons: list[Comparison], alpha: float = 0.05) -> list[Verdict]:
    """The verdict on each comparison of one family (a table), Holm-adjusted across it."""
    p_holm = holm([c.p for c in comparisons])
    p_equivalent_holm = holm([c.p_equivalent for c in comparisons])
    m, m_equivalent = (sum(not math.isnan(p) for p in family) for family in (p_holm, p_equivalent_holm))
    verdicts = []
    for c, p, p_eq in zip(comparisons, p_holm, p_equivalent_holm):
        if c.n_ours < 2 or c.n_theirs < 2:
            verdicts.append((CANNOT, f"fewer than 2 seeds in an arm (n={c.n_ours}/{c.n_theirs})"))
            continue
        # 3 decimals (a metric in [0, 1]), fewer for larger figures: 5.2 px -> 2, 620 steps -> 0.
        scale = max(abs(c.difference), *map(abs, c.ci))
        digits = 3 if scale < 1 else max(0, 2 - math.floor(math.log10(scale)))
        found = (f"difference {signed(c.difference, digits)} [{c.level * 100:g} % CI {signed(c.ci[0], digits)}, "
                 f"{signed(c.ci[1], digits)}], n={c.n_ours}/{c.n_theirs}, p={c.p:.2g}, Holm p={p:.2g} over {m} "
                 f"comparison{'s' * (m != 1)}")
        if p < alpha:
            better = c.difference > 0 if c.higher_is_better else c.difference < 0
            verdicts.append((HOLDS if better else FAILS, f"{found}; ours is {'better' if better else 'worse'}"))
        elif math.isnan(p_eq):
            verdicts.append((CANNOT, f"{found}; no equivalence margin"))
        else:
            within = (f"; TOST for |difference| < {c.margin:.3g}: p={c.p_equivalent:.2g}, Holm p={p_eq:.2g} over "
                      f"{m_equivalent}")
            verdicts.append((EQUIVALENT, f"{found}{within}; equivalent") if p_eq < alpha else
                            (CANNOT, f"{found}{within}; neither different nor shown equivalent"))
    return verdicts


def equivalence_margin(base: float, ceiling: float, fraction: float = 0.05) -> float:
    """The equivalence margin: ±fraction of a metric's range from the base model to its ceiling."""
    return fraction * abs(ceiling - base)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of its t confidence interval) of the finite values; the half-width is
    NaN below two of them."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if len(finite) == 0:
        return math.nan, math.nan
    if len(finite) < 2:
        return float(finite[0]), math.nan
    sem = finite.std(ddof=1) / math.sqrt(len(finite))
    return float(finite.mean()), float(stats.t.ppf((1 + level) / 2, len(finite) - 1) * sem)


def mean_ci_text(values: Sequence[float], digits: int = 3) -> str:
    """"0.412 [0.398, 0.426]" (mean and 95 % CI over seeds); a missing value is counted, not dropped."""
    mean, half = mean_ci(values)
    if math.isnan(mean):
        return "n/a"
    missing = sum(not math.isfinite(v) for v in values)
    text = f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"
    return text + (f" ({missing} of {len(values)} n/a)" if missing else "")


def comparison_rows(arms: list[tuple[str, Sequence[float], str, Sequence[float]]], higher_is_better: bool,
                    margin: float | None) -> list[dict]:
    """One table's comparisons, (ours, its seeds' figures, theirs, theirs'), decided as one Holm family."""
    comparisons = [compare(a, b, higher_is_better, margin) for _, a, _, b in arms]
    return [{"ours": ours, "against": theirs, "difference [95 % CI]": format_difference(c), "n": f"{c.n_ours}/{c.n_theirs}",
             "p": c.p, "holm p": p, "verdict": label, "reason": reason}
            for (ours, _, theirs, _), c, p, (label, reason) in zip(arms, comparisons, holm([c.p for c in comparisons]),
                                                                    decide(comparisons))]


def notes(margin: float | None, key: str) -> list[str]:
    """The rule, as a report states it under its comparisons."""
    within = "no equivalence margin" if margin is None else f"equivalence margin ±{margin:.3g} {key}"
    return [f"Decided over seeds (reproduce.stats): Welch's 95 % CI of the difference of means, Holm across the "
            f"table's comparisons; holds / does not hold when the Holm p < 0.05, equivalent when a TOST shows "
            f"|difference| < the margin ({within}: 5 % of the range from the base model to the real images through "
            "the VAE), cannot tell otherwise; an arm with fewer than 2 seeds is never decided."]
