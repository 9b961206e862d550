"""A table's report: reports/<name>.csv and .md, the .md stamped with where it came from
(command, git revision, machine, how its cells were trained)."""

from __future__ import annotations

import csv
import logging
import math
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from orthodiff.eval.control_metrics import CONTROL_CONFIGS
from orthodiff.oft.layer import COFT_NORMS, OFTConfig
from orthodiff.reproduce.cells import ROOT, cell_config, cell_env

log = logging.getLogger(__name__)


def _settings(schedule: str, overrides) -> str:
    return f"- {schedule}; train overrides: {list(overrides) or 'none (the embedded default)'}"


def control_settings(cfg: DictConfig) -> str:
    return _settings(f"seeds: {list(cfg.seeds)}; schedule: {OmegaConf.to_container(cfg.schedule)}",
                     cfg.train_overrides)


def lr_search_settings(cfg: DictConfig) -> str:
    search = cfg.lr_search
    return _settings(f"seed: {cfg.seeds[0]}; {search.steps} steps of batch {cfg.schedule.batch_size} on "
                     f"{cfg.controls[0]}, validated at the last step on {cfg.schedule.val_items} scenes; "
                     f"lrs: {[float(lr) for lr in search.lrs]}", cfg.train_overrides)


def subject_settings(cfg: DictConfig) -> str:
    return _settings(f"seeds: {list(cfg.subject.seeds)}; each method's own settings "
                     "(conf/task_method/subject_<method>.yaml)", cfg.subject.train_overrides)


def subject_lr_search_settings(cfg: DictConfig) -> str:
    return _settings(f"seed: {cfg.subject.seeds[0]}; subjects: {list(cfg.subject.subjects)}; module.optimizer.lr in "
                     f"{[float(lr) for lr in cfg.subject.lrs]}; otherwise each method's own settings",
                     cfg.subject.train_overrides)


def encoder_search_settings(cfg: DictConfig) -> str:
    return _settings(f"seed: {cfg.subject.seeds[0]}; subjects: {list(cfg.subject.subjects)}; method.tune_steps in "
                     f"{list(cfg.encoder_search.tune_steps)}; otherwise each method's own settings",
                     cfg.subject.train_overrides)


def coft_note(runs: list[dict]) -> list[str]:
    """A note giving each COFT row's eps and its convention (BRIEF.md, COFT: the same eps means different
    bounds), read from its cells' own configs; a run from before coft_norm existed has OFTConfig's default."""
    described = {}
    for run in runs:
        config = cell_config(run["run_dir"])
        adapter = config.get("adapter")  # None or absent: the method trains no OFT adapter
        if adapter and adapter.get("coft"):
            norm = adapter.get("coft_norm", OFTConfig.coft_norm)
            described[config.method.name] = (f"{config.method.name}: eps {adapter.eps:g} in the {norm} convention "
                                             f"({COFT_NORMS[norm]})")
    return [f"COFT rows' eps: {'; '.join(described.values())}."] if described else []


def stamp(cfg: DictConfig, settings: str | None) -> list[str]:
    """Where a report came from; `settings` is the line saying how its cells were trained (None: no cells)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    # The reports this run rewrites do not count as changes to the code that made them.
    reports = (Path(cfg.out_dir).resolve()).as_posix()
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if not (ROOT / line[3:]).resolve().as_posix().startswith(reports)]
    dirty = " (uncommitted changes)" if changed else ""
    return [f"- command: `python reproduce.py {' '.join(sys.argv[1:])}`",
            f"- git revision: {git('rev-parse', '--short', 'HEAD').strip() or 'unknown'}{dirty}",
            f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()}, "
            f"torch {torch.__version__}; cells trained {cfg.jobs} at a time, "
            f"{cell_env(cfg)['OMP_NUM_THREADS']} torch thread(s) each"] + ([settings] if settings else [])


def fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def spread(values) -> tuple[float, float]:
    """(mean, sample std) of the finite values; std NaN below two of them, mean NaN with none."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def mean_std(values: list[float], digits: int = 4) -> str:
    """"mean ± std" (sample std) of the finite values; a missing one (a diverged run, a
    figure the scorer did not give) is counted, not silently dropped."""
    mean, std = spread(values)
    if math.isnan(mean):
        return "n/a"
    missing = sum(math.isnan(v) for v in values)
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text + (f" ({missing} of {len(values)} n/a)" if missing else "")


def finite_mean(values) -> float:
    """The mean of the finite values; NaN when there are none."""
    return spread(values)[0]


def higher_is_better(control: str) -> bool:
    """The direction of a control's headline figure (conf/control/<control>.yaml's metric_mode)."""
    return OmegaConf.load(CONTROL_CONFIGS / f"{control}.yaml").metric_mode == "max"


def final_figure(run: dict, key: str) -> float:
    """A cell's final headline figure; NaN for a run that diverged (no final metrics)."""
    return float(run["final"].get(key, math.nan))


def out_dir(cfg: DictConfig) -> Path:
    """The folder of the reports and their figures (created)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_csv(cfg: DictConfig, name: str, rows: list[dict]) -> Path:
    """rows as reports/<name>.csv, the columns in their first appearance's order."""
    path = out_dir(cfg) / f"{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: list[dict]) -> list[str]:
    """rows as the lines of a markdown table."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:  # a "|" inside a cell (|ΔHE|) would end it
        return fmt(value).replace("|", "\\|")

    return ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows)]


def write_report(cfg: DictConfig, name: str, title: str, rows: list[dict], notes: list[str],
                 plots: list[str] = (), settings: str | None = None) -> Path:
    write_csv(cfg, name, rows)
    lines = [f"# {title}", "", *stamp(cfg, settings), "", *markdown_table(rows),
             "", *notes, *(f"![{p}]({p})" for p in plots)]
    path = out_dir(cfg) / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("%s: %s", name, path)
    return path


def labelled_grid(rows: list[list[np.ndarray]], row_labels: list[str], column_labels: list[str], path: Path,
                  title: str | None = None) -> Path:
    """A grid of equal-sized uint8 tiles (rows of columns) saved as a figure whose rows are
    named on the left and columns on top (wrapped prompts), at the tiles' own resolution."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    tile_h, tile_w = rows[0][0].shape[:2]
    dpi = 100
    width, height = grid.shape[1] / dpi, grid.shape[0] / dpi  # inches; 2.2 on the left for names, 0.9 on top
    fig = plt.figure(figsize=(width + 2.2, height + 0.9), dpi=dpi)
    ax = fig.add_axes([2.0 / (width + 2.2), 0.05 / (height + 0.9), width / (width + 2.2), height / (height + 0.9)])
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([tile_h * (k + 0.5) for k in range(len(rows))], row_labels, fontsize=7)
    ax.set_xticks([tile_w * (k + 0.5) for k in range(len(column_labels))],
                  [textwrap.fill(label, 16) for label in column_labels], fontsize=4.5)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if title:
        fig.suptitle(title, x=0.01, y=0.995, ha="left", va="top", fontsize=8)
    fig.savefig(path, dpi=2 * dpi)  # tiles at twice their size (nearest), so the labels are readable
    plt.close(fig)
    return path
