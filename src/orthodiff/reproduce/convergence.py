"""table=convergence: how fast each method's control appears, on the first control (the same
cells as table=controllable): per method over the seeds, the steps and images seen to reach
50 % and 80 % of the best final score, and the validation curves with their spread.

"x % of the best final score" is measured from the base model up: the base level is the
base model's figure (mean over seeds of cfg.methods[0]'s step-0 validations, the controllable
table's base row), the best final score the best method's mean final figure over seeds, and a
run reaches x % at its first validation at least base_s + x (best - base) (at most, for a
lower-is-better figure), base_s the base figure at the run's seed (the validation noise is the
seed's). From the base rather than from zero because the base model already
scores well above zero (Canny IoU ~0.035), and a lower-is-better figure has no zero to count
from. The validation grid (every schedule.val_every steps) is the resolution.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.reproduce import paper
from orthodiff.reproduce.cells import run_all
from orthodiff.reproduce.report import (
    coft_note,
    control_settings,
    final_figure,
    finite_mean,
    higher_is_better,
    mean_std,
    out_dir,
    write_report,
)

FRACTIONS = (0.5, 0.8)


def cells(cfg: DictConfig) -> list[tuple]:
    return [(m, cfg.controls[0], s) for m in cfg.methods for s in cfg.seeds]


def steps_to_reach(history: list[dict], key: str, threshold: float, higher: bool) -> int | None:
    """The first validated step whose figure reaches `threshold` (None: none does)."""
    for entry in sorted(history, key=lambda e: e["step"]):
        value = entry.get(key, math.nan)
        if value >= threshold if higher else value <= threshold:
            return int(entry["step"])
    return None


def thresholds(base: float, best: float, higher: bool) -> dict[float, float] | None:
    """{fraction: figure} at FRACTIONS of the way from base to best; None when best is no
    better than base (no method gained anything to take a fraction of)."""
    if not (best > base if higher else best < base):
        return None
    return {f: base + f * (best - base) for f in FRACTIONS}


def levels(cfg: DictConfig, runs: dict) -> tuple[float, float, str]:
    """(base level, best final score, the method that has it); runs: {(method, seed): run}."""
    key = headline_metric(cfg.controls[0])
    base = finite_mean([runs[(cfg.methods[0], s)].get("step0", {}).get(key, math.nan) for s in cfg.seeds])
    finals = {m: finite_mean([final_figure(runs[(m, s)], key) for s in cfg.seeds]) for m in cfg.methods}
    finals = {m: v for m, v in finals.items() if not math.isnan(v)}
    if not finals:
        return base, math.nan, "none"
    best = (max if higher_is_better(cfg.controls[0]) else min)(finals, key=finals.get)
    return base, finals[best], best


def reach(cfg: DictConfig, runs: dict) -> dict[str, dict[float, list[int | None]]] | None:
    """{method: {fraction: the step each seed reached it at (None: not within its run)}};
    None when no method beats the base model."""
    key, higher = headline_metric(cfg.controls[0]), higher_is_better(cfg.controls[0])
    base, best, _ = levels(cfg, runs)
    targets = thresholds(base, best, higher)
    if targets is None:
        return None
    # Each seed's validations share its noise: its levels count from its own base figure.
    offset = {s: runs[(cfg.methods[0], s)].get("step0", {}).get(key, base) - base for s in cfg.seeds}
    return {m: {f: [steps_to_reach(runs[(m, s)].get("history", []), key, t + offset[s], higher) for s in cfg.seeds]
                for f, t in targets.items()} for m in cfg.methods}


def reached(values: list[int | None], scale: int, limit: int) -> str:
    """mean ± std of the seeds that reached a level (x scale: images), and how many did."""
    done = [v * scale for v in values if v is not None]
    if not done:
        return f"not within {limit * scale}"
    text = f"{np.mean(done):.0f} ± {np.std(done, ddof=1):.0f}" if len(done) > 1 else f"{done[0]:.0f}"
    return text if len(done) == len(values) else f"{text} ({len(done)}/{len(values)} seeds; the others not within)"


def curves(cfg: DictConfig, runs: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{method: (steps, mean, std)} of the validation curves over seeds (NaN where a seed
    has no figure, e.g. after it diverged)."""
    key = headline_metric(cfg.controls[0])
    out = {}
    for method in cfg.methods:
        histories = [{h["step"]: h.get(key, math.nan) for h in runs[(method, s)].get("history", [])} for s in cfg.seeds]
        steps = np.array(sorted(set().union(*histories)))
        values = np.array([[h.get(step, math.nan) for step in steps] for h in histories], dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a step no seed reached, a one-seed std
            std = np.nanstd(values, 0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
            out[method] = (steps, np.nanmean(values, 0), std)
    return out


def table(cfg: DictConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    control, batch = cfg.controls[0], cfg.schedule.batch_size
    key = headline_metric(control)
    runs = {(m, s): run for (m, _, s), run in zip(cells(cfg), run_all(cfg, cells(cfg), "convergence"))}
    base, best, best_method = levels(cfg, runs)
    steps_reached = reach(cfg, runs)
    targets = thresholds(base, best, higher_is_better(control)) or {}
    rows, curve_rows = [], []
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for method, (steps, mean, std) in curves(cfg, runs).items():
        row = {"method": method, f"final {key}": mean_std([final_figure(runs[(method, s)], key) for s in cfg.seeds])}
        for f in FRACTIONS:
            values = steps_reached[method][f] if steps_reached else None
            no_gain = "n/a (no method beat the base model)"
            row[f"steps to {f:.0%}"] = reached(values, 1, cfg.schedule.steps) if values else no_gain
            row[f"images to {f:.0%}"] = reached(values, batch, cfg.schedule.steps) if values else no_gain
        rows.append(row)
        curve_rows += [{"method": method, "step": int(s), "images seen": int(s) * batch, f"{key} mean": m,
                        f"{key} std": d} for s, m, d in zip(steps, mean, std)]
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=method)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.axhline(base, color="grey", linestyle=":", linewidth=1, label="base model (step 0)")
    for f, level in targets.items():
        ax.axhline(level, color="black", linestyle="--", linewidth=0.8)
        ax.annotate(f"{f:.0%}", (0, level), fontsize=7, va="bottom")
    ax.set_xlabel(f"training step (x {batch} = images seen)")
    ax.set_ylabel(key)
    ax.set_title(f"{control}: mean ± std over seeds {list(cfg.seeds)}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the curves fill the axes
    fig.tight_layout()
    fig.savefig(out_dir(cfg) / "convergence.png", dpi=100)
    plt.close(fig)
    how = control_settings(cfg)
    write_report(cfg, "convergence_curves", f"Convergence curves ({control})", curve_rows,
                 [f"Mean and std over seeds {list(cfg.seeds)} at each validation."], settings=how)
    notes = [f"Validation on {cfg.schedule.val_items} fixed scenes every {cfg.schedule.val_every} steps (batch {batch}; "
             f"images seen = steps x {batch}), mean ± std over seeds {list(cfg.seeds)}; curves in "
             "convergence_curves.csv.",
             f"x % of the best final score, from the base model up: base level {base:.4f} (the base model's {key}, "
             f"step 0 of {cfg.methods[0]}, mean over seeds), best final score {best:.4f} ({best_method}'s mean "
             f"{key} at step {cfg.schedule.steps}); a run reaches x % at its first validation at or beyond "
             f"base_s + x (best - base), base_s the base figure at its seed (on average "
             f"{', '.join(f'{f:.0%} = {t:.4f}' for f, t in targets.items()) or 'none'}). "
             "Measured from the base because the base model already scores above zero; the validation grid "
             f"({cfg.schedule.val_every} steps) is the resolution. Mean ± std over the seeds that reach it.",
             f"Published (OFT paper): {paper.CONVERGENCE}.",
             *coft_note([runs[(m, cfg.seeds[0])] for m in cfg.methods])]
    return write_report(cfg, "convergence", f"Convergence ({control})", rows, notes, ["convergence.png"], settings=how)
