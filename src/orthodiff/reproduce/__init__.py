"""The paper's tables, rebuilt from runs: `python reproduce.py table=<name>` (conf/reproduce.yaml).

Each table writes reports/<name>.md and .csv (and its plot), stamped with the command,
seeds, git revision and machine. Training runs are train.py subprocesses (one per
method x control x seed cell, on fixed-length schedules: conf/reproduce.yaml) whose
run directories are kept in `runs_dir` and reused by later tables with the same
settings, so `table=all` trains each cell once.

    cells.py         the cell runner: train.py / eval.py per cell, the cache in runs_dir
    report.py        the report writer: .csv, stamped .md, settings lines
    paper.py         the OFT paper's published figures the tables compare with
    params.py  lr_search.py  controllable.py  convergence.py  energy.py  ablation.py  radius.py
    frontier.py  length.py  width.py  subject.py (also subject_lr_search, encoder_search)  edit.py
                     multi.py
                     one module per table, each a `table(cfg) -> Path` (the .md written)
                     (params.py also holds the SD 1.5 parameter counts ablation and claims read)
    stats.py         how two groups of seeds are compared: Welch CI, Holm, equivalence
    claims.py        the verdict per claim of the paper, from the cells the tables above trained
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from orthodiff.reproduce import (
    ablation,
    claims,
    controllable,
    convergence,
    edit,
    energy,
    frontier,
    length,
    lr_search,
    multi,
    params,
    radius,
    subject,
    width,
)
from orthodiff.reproduce.cells import Planned

log = logging.getLogger(__name__)

# table=all's order: the lr search first (its choices are committed before the grid is trusted),
# claims last (it reads the cells the others trained).
TABLES = {"params": params.table, "lr_search": lr_search.table, "controllable": controllable.table,
          "convergence": convergence.table, "energy": energy.table, "ablation": ablation.table,
          "radius": radius.table, "frontier": frontier.table, "length": length.table, "width": width.table,
          "subject_lr_search": subject.lr_search_table, "subject": subject.table,
          "encoder_search": subject.encoder_search_table, "edit": edit.table,
          "multi": multi.table, "claims": claims.table}


def reproduce(cfg: DictConfig) -> list[Path]:
    """Write cfg.table's report (every table's for table=all); returns the reports' paths."""
    if cfg.table != "all" and cfg.table not in TABLES:
        raise ValueError(f"unknown table {cfg.table!r}; valid tables: {', '.join([*TABLES, 'all'])}")
    if cfg.jobs < 1:
        raise ValueError(f"jobs={cfg.jobs}: the number of cells trained at once must be >= 1")
    names = list(TABLES) if cfg.table == "all" else [cfg.table]
    if "ablation" in names:
        ablation.variants(cfg)  # a misspelt ablation.three_seeds fails now, not after hours of other tables
    if cfg.get("plan"):
        planned = {name: plan(cfg, name) for name in names}
        lines = [line for table_lines, _ in planned.values() for line in table_lines]
        stages = [stage for _, stage in planned.values() if stage is not None]
        if len(stages) > 1:  # tables share cells (a frontier's plain cells are controllable's canny ones)
            wall = {}
            for stage in stages:
                wall.update({name: stage.median_wall() for name in stage.left() if name not in wall})
            known = [w for w in wall.values() if w is not None]
            lines.append(f"all: {len(wall)} distinct cells to train; ~{sum(known) / 3600:.0f} h of one lane for the "
                         f"{len(known)} whose table has a finished cell to time")
        print("\n".join(lines))
        return []
    started = time.time()
    paths = [TABLES[name](cfg) for name in names]
    log.info("reproduce %s: %.0f s", cfg.table, time.time() - started)
    return paths


# Tables that plan=true does not list: they train no cell of their own.
NOT_PLANNED = {"params": "trains nothing", "claims": "trains nothing: it reads the other tables' cells",
               "edit": "trains no cell: it learns its schedules itself (kept in runs_dir/edit and cells_archive/edit)"}


def plan(cfg: DictConfig, name: str) -> tuple[list[str], Planned | None]:
    """plan=true: the lines saying what table `name` would train, and its cells' states; trains
    nothing. The table runs up to its first set of cells (cells.Planned), the only one for all
    but encoder_search, whose scoring cells need its pretrained encoders."""
    if name in NOT_PLANNED:
        return [f"table={name}: {NOT_PLANNED[name]}"], None
    try:
        TABLES[name](cfg)
    except Planned as planned:
        return [f"table={name}, stage {planned.stage}:", *planned.lines()], planned
    except FileNotFoundError as error:  # e.g. a width-ladder rung not built yet
        return [f"table={name}: cannot be planned yet: {error}"], None
    raise AssertionError(f"table={name} returned under plan=true without reaching cells.run_all")
