"""table=length: do the gaps close, hold or widen when training runs to plateau? length.methods
on the first control for length.steps steps validated every length.val_every, every seed
(length.two_seeds: methods cut to two); each run longer than the schedule continues its
plain cell from its last validation (continued_cell). Per method: the final figure, steps to 50 % and 80 %
of the best final score of all methods (as table=convergence) and of its own final gain (its
own final figure at the seed, counted from the seed's base figure), and where its mean curve
flattens (the first validation after which it never gains more than PLATEAU of its own gain
again). The gaps of length.pairs at each step of length.at, decided with reproduce.stats
(Holm over the table).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.reproduce import controllable, convergence, stats
from orthodiff.reproduce.cells import run_all, run_cell, step_checkpoint
from orthodiff.reproduce.report import (
    coft_note,
    control_settings,
    final_figure,
    finite_mean,
    higher_is_better,
    markdown_table,
    out_dir,
    write_csv,
    write_report,
)

PLATEAU = 0.05  # a curve has flattened once it never again gains 5 % of its own final gain


def seeds(cfg: DictConfig, method: str) -> list[int]:
    return list(cfg.seeds)[:2] if method in cfg.length.two_seeds else list(cfg.seeds)


def cells(cfg: DictConfig) -> list[tuple]:
    """continued_cell's arguments beyond the schedule's length; run_cell's otherwise (at the
    schedule's own length and validations, the plain cells)."""
    n = cfg.length
    if n.steps > cfg.schedule.steps:
        return [(m, s) for m in n.methods for s in seeds(cfg, m)]
    if (n.steps, n.val_every) == (cfg.schedule.steps, cfg.schedule.val_every):
        return [(m, cfg.controls[0], s) for m in n.methods for s in seeds(cfg, m)]
    return [(m, cfg.controls[0], s, [], f"-len{n.steps}", n.steps, True, True, n.val_every)
            for m in n.methods for s in seeds(cfg, m)]


def continued_cell(cfg: DictConfig, method: str, seed: int, cached_only: bool = False,
                   archived: bool = True) -> dict | None:
    """The method's plain cell (table=frontier's, trained here if absent) continued from its last
    validation to length.steps, validated every length.val_every: a run's path depends on neither its
    length nor its validations (no lr schedule; validation samples from its own generator), so this
    is the long run itself, up to the plain cell's finer validations before schedule.steps."""
    control, n = cfg.controls[0], cfg.length
    plain = run_cell(cfg, method, control, seed, cached_only=cached_only, archived=archived)
    if plain is None or "planned" in plain:  # plan=true: the plain cell comes first
        return plain
    longer = (cfg, method, control, seed, [], f"-len{n.steps}", n.steps, True, True, n.val_every)
    start = step_checkpoint(plain["run_dir"], cfg.schedule.steps)
    if not start.is_file():  # the plain cell came from cells_archive, without its checkpoints
        done = run_cell(*longer, cached_only=True, start_from=start, archived=archived)
        if done or cached_only:
            return done
        plain = run_cell(cfg, method, control, seed, archived=False)  # trained again here for its checkpoint
        if "planned" in plain:
            return plain
        start = step_checkpoint(plain["run_dir"], cfg.schedule.steps)
    return run_cell(*longer, cached_only=cached_only, start_from=start, archived=archived)


def length_cell(cfg: DictConfig, *args, cached_only: bool = False, archived: bool = True) -> dict | None:
    """The run of one of cells(cfg)'s entries (cached_only: never train; table=claims)."""
    cell = continued_cell if cfg.length.steps > cfg.schedule.steps else run_cell
    return cell(cfg, *args, cached_only=cached_only, archived=archived)


def figure_at(run: dict, key: str, step: int) -> float:
    """The validation figure at `step` (NaN if the run has none there)."""
    return next((float(h.get(key, math.nan)) for h in run.get("history", []) if int(h["step"]) == step), math.nan)


def own_gain_steps(run: dict, key: str, fraction: float, higher: bool) -> int | None:
    """Steps to `fraction` of the run's own gain, from its step-0 figure to its final one."""
    base, final = run.get("step0", {}).get(key, math.nan), final_figure(run, key)
    if math.isnan(base) or math.isnan(final) or not (final > base if higher else final < base):
        return None
    return convergence.steps_to_reach(run.get("history", []), key, base + fraction * (final - base), higher)


def plateau_step(steps: np.ndarray, mean: np.ndarray, higher: bool) -> int | None:
    """The first validated step after which the mean curve never gains more than PLATEAU of
    its own gain (final - first) again; None without a gain."""
    signed = mean if higher else -mean
    gain = signed[-1] - signed[0]
    if not gain > 0:
        return None
    later_best = np.maximum.accumulate(signed[::-1])[::-1]  # the best from each step on
    return int(steps[np.argmax(later_best - signed <= PLATEAU * gain)])


def table(cfg: DictConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    control, n = cfg.controls[0], cfg.length
    key, higher = headline_metric(control), higher_is_better(control)
    results = iter(run_all(cfg, cells(cfg), "length", cell=length_cell))
    runs = {m: [next(results) for _ in seeds(cfg, m)] for m in n.methods}
    base = finite_mean([r.get("step0", {}).get(key, math.nan) for rs in runs.values() for r in rs])
    finals = {m: finite_mean([final_figure(r, key) for r in rs]) for m, rs in runs.items()}
    best = (max if higher else min)((v for v in finals.values() if not math.isnan(v)), default=math.nan)
    targets = convergence.thresholds(base, best, higher) or {}
    rows = []
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for method, rs in runs.items():
        histories = [{int(h["step"]): h.get(key, math.nan) for h in r.get("history", [])} for r in rs]
        steps = np.array(sorted(set().union(*histories)))
        values = np.array([[h.get(s, math.nan) for s in steps] for h in histories], dtype=float)
        mean = np.nanmean(values, 0)
        row = {"method": method, "seeds": len(rs), f"final {key} [95 % CI]": stats.mean_ci_text([final_figure(r, key)
                                                                                                for r in rs])}
        for f in convergence.FRACTIONS:
            offset = [r.get("step0", {}).get(key, base) - base for r in rs]
            reached = [convergence.steps_to_reach(r.get("history", []), key, targets[f] + o, higher) if targets else None
                       for r, o in zip(rs, offset)]
            row[f"steps to {f:.0%} of the best"] = convergence.reached(reached, 1, n.steps)
            row[f"steps to {f:.0%} of its own gain"] = convergence.reached(
                [own_gain_steps(r, key, f, higher) for r in rs], 1, n.steps)
        flat = plateau_step(steps, mean, higher)
        row["flattens at step"] = "no gain" if flat is None else flat
        rows.append(row)
        line, = ax.plot(steps, mean, marker="o", markersize=2, label=method)
        if len(rs) > 1:
            std = np.nanstd(values, 0, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.axhline(base, color="grey", linestyle=":", linewidth=1, label="base model (step 0)")
    ax.set_xlabel(f"training step (batch {cfg.schedule.batch_size})")
    ax.set_ylabel(key)
    ax.set_title(f"{control} to {n.steps} steps: mean ± std over seeds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out_dir(cfg) / "length.png", dpi=100)
    plt.close(fig)
    at = {(a, b, step): ([figure_at(r, key, step) for r in runs[a]], [figure_at(r, key, step) for r in runs[b]])
          for a, b in n.pairs for step in n.at}
    margin = controllable.equivalence_margin_of(cfg, [r for rs in runs.values() for r in rs], key)
    comparisons = stats.comparison_rows([(a, va, b, vb) for (a, b, _), (va, vb) in at.items()], higher, margin)
    for row, (_, _, step) in zip(comparisons, at):
        row["at step"] = step
    write_csv(cfg, "length_comparisons", comparisons)
    validated = f"every {n.val_every} steps"
    if n.steps > cfg.schedule.steps:
        validated = (f"every {cfg.schedule.val_every} steps to step {cfg.schedule.steps} (the plain cell each run "
                     f"continues: the same run, table=frontier's) and every {n.val_every} after")
    notes = [f"{control}, {n.steps} steps of batch {cfg.schedule.batch_size}, validated {validated} "
             f"on the first {cfg.schedule.val_items} validation scenes; seeds {list(cfg.seeds)} (two for "
             f"length.two_seeds: {list(n.two_seeds) or 'none cut'}); each method at its own lr.",
             f"'of the best': from the base model ({base:.4f}, step 0, mean) to the best final mean ({best:.4f}), as in "
             "table=convergence; 'of its own gain': from the seed's own step-0 figure to its own final one. Flattens: "
             f"the first validation after which the mean curve never gains more than {PLATEAU:.0%} of its own gain.",
             *coft_note([rs[0] for rs in runs.values()]),
             "", f"Gaps at steps {list(n.at)} ({key}; length_comparisons.csv): do they close, hold or widen?", "",
             *markdown_table(comparisons), "", *stats.notes(margin, key)]
    return write_report(cfg, "length", f"Runs to plateau ({control}, {n.steps} steps)", rows, notes, ["length.png"],
                        settings=control_settings(cfg))
