"""table=radius: COFT along its radius. radius.method (COFT, paper convention) at every eps of
radius.eps and at the scale-matched eps (radius.matched: the eps at which the tiny model's
median per-plane rotation budget equals SD 1.5's at the paper's eps = 1e-3, orthodiff.oft.scale),
on the first control with its schedule, every seed; beside them the references (unconstrained
OFT, the hint encoder alone). Per row: the final figure with its 95 % CI over seeds, the
rotation budget per plane that eps allows (median over the adapted layers), and where training
left the blocks: the share on the radius and the median rotation angle per plane. Each COFT
row is compared with each reference (reproduce.stats: Welch CI, Holm over the table).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.reproduce import controllable, stats
from orthodiff.reproduce.cells import blocks_of, cell_config, method_setting, run_all
from orthodiff.reproduce.report import (
    coft_note,
    control_settings,
    final_figure,
    finite_mean,
    higher_is_better,
    markdown_table,
    write_csv,
    write_report,
)

log = logging.getLogger(__name__)


def arms(cfg: DictConfig) -> dict[str, tuple[str, list[str], str]]:
    """{row: (method, extra overrides, tag)}: the eps ladder (the method's own eps is its plain
    cell, shared with table=controllable), the scale-matched method, the references."""
    r = cfg.radius
    own = method_setting(r.method, "eps")
    ladder = {f"{r.method} eps {eps:g}": (r.method, [] if eps == own else [f"adapter.eps={eps}"],
                                          "" if eps == own else f"-eps{eps:g}") for eps in r.eps}
    return {**ladder, r.matched: (r.matched, [], ""), **{m: (m, [], "") for m in r.references}}


def cells(cfg: DictConfig) -> list[tuple]:
    return [(method, cfg.controls[0], s, extra, tag) for method, extra, tag in arms(cfg).values() for s in cfg.seeds]


def where_blocks_sit(run: dict) -> dict:
    """cells.blocks_of the run ({} for a diverged run; {} and a warning for a cell archived
    before cells wrote blocks.json as it finished: its figure is kept, its block columns are not)."""
    if "diverged" in run:
        return {}
    found = blocks_of(Path(run["run_dir"]))
    if found is None:
        log.warning("cell %s: no blocks.json and no adapter (archived before blocks.json was kept); its block "
                    "columns are left out", Path(run["run_dir"]).name)
    return found or {}


def lr_note(names: list[str], runs: dict) -> str:
    """Each row's UNet adapter lr, read from its first cell's config: the eps ladder trains at
    method=coft's lr, the scale-matched method at its own."""
    configs = {name: cell_config(runs[name][0]["run_dir"]) for name in names}
    lrs = [f"{name}: {OmegaConf.select(c, 'module.optimizer.lr'):g}" for name, c in configs.items() if c.get("adapter")]
    hint_lrs = {OmegaConf.select(c, "module.hint_lr") for c in configs.values()}
    return (f"UNet adapter lr per row (module.optimizer.lr): {'; '.join(lrs)}. The hint encoder trains at "
            f"module.hint_lr = {', '.join(f'{lr:g}' for lr in sorted(hint_lrs))} in every row.")


def table(cfg: DictConfig) -> Path:
    control = cfg.controls[0]
    key, higher = headline_metric(control), higher_is_better(control)
    names = list(arms(cfg))
    results = iter(run_all(cfg, cells(cfg), "radius"))
    runs = {name: [next(results) for _ in cfg.seeds] for name in names}
    figures = {name: [final_figure(r, key) for r in rs] for name, rs in runs.items()}
    margin = controllable.equivalence_margin_of(cfg, [r for rs in runs.values() for r in rs], key)
    rows = []
    for name in names:
        sits = [where_blocks_sit(r) for r in runs[name]]
        rows.append({"row": name, f"{key} [95 % CI]": stats.mean_ci_text(figures[name]), "seeds": len(figures[name]),
                     **{k: finite_mean([s.get(k, float("nan")) for s in sits])
                        for k in ("budget per plane (deg)", "share on radius", "median angle per plane (deg)")}})
    coft_rows = [n for n in names if n not in cfg.radius.references]
    pairs = [(a, b) for a in coft_rows for b in cfg.radius.references]
    comparisons = stats.comparison_rows([(a, figures[a], b, figures[b]) for a, b in pairs], higher, margin)
    write_csv(cfg, "radius_comparisons", comparisons)
    notes = [f"{control}, {cfg.schedule.steps} steps of batch {cfg.schedule.batch_size}, final {key} on the first "
             f"{cfg.schedule.val_items} validation scenes; mean [95 % CI] over seeds {list(cfg.seeds)}.",
             "Every eps here is in the paper convention (||Q_i||_F <= eps b^2 / sqrt(r)). Budget per plane: the "
             "rotation angle that radius allows each plane of a block when spread evenly, median over the adapted "
             f"layers; {cfg.radius.matched} is at the scale-matched eps, where that median equals SD 1.5's at the "
             "paper's eps = 1e-3 (orthodiff.oft.scale). Share on radius: blocks whose ||Q_i||_F is within 0.1 % of "
             "the radius after the last step; median angle per plane: over every plane of every block (2 atan q_k).",
             lr_note(names, runs),
             *coft_note([runs[n][0] for n in names]),
             "", f"Each COFT row against each reference ({key}; radius_comparisons.csv):", "",
             *markdown_table(comparisons), "", *stats.notes(margin, key)]
    return write_report(cfg, "radius", f"COFT along its radius ({control})", rows, notes, settings=control_settings(cfg))
