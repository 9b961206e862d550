"""table=lr_search: the same learning-rate search for every method (an equal tuning budget):
each lr in lr_search.lrs, one seed, the first control, lr_search.steps steps validated at the
end; per method every lr's score and the best. The hint encoder has an lr of its own, the same
for every method that trains it: method=hint's row searches it (module.hint_lr), and every
other row searches the method's own lr (method.tiny_control_lr: its UNet adapter's, or for
ControlNet and the T2I-Adapters their control network's) with the hint encoder at its
committed lr. The chosen values are not applied here: a person commits them (hint's as
module.hint_lr in conf/experiment/base/tiny_control.yaml, first; the others' as
method.tiny_control_lr in conf/method/<method>.yaml)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.reproduce.cells import run_all
from orthodiff.reproduce.report import final_figure, fmt, higher_is_better, lr_search_settings, write_report
from orthodiff.warm import ROOT


def methods(cfg: DictConfig) -> list[str]:
    return list(cfg.lr_search.methods or cfg.methods)


def searched_key(method: str) -> str:
    """The config key a method's row searches: the hint encoder's own lr for the encoder alone."""
    return "module.hint_lr" if method == "hint" else "method.tiny_control_lr"


def cells(cfg: DictConfig) -> list[tuple]:
    """run_cell's arguments: one seed, the search's own steps, validated at the end only."""
    search = cfg.lr_search
    return [(m, cfg.controls[0], cfg.seeds[0], [f"{searched_key(m)}={lr}"], f"-lr{lr:g}", search.steps, False, False)
            for m in methods(cfg) for lr in search.lrs]


def best_lr(scores: dict[float, float], higher: bool) -> float | None:
    """The lr with the best finite score (None: every run diverged)."""
    finite = {lr: v for lr, v in scores.items() if not math.isnan(v)}
    if not finite:
        return None
    return (max if higher else min)(finite, key=finite.get)


def earlier_bests(cfg: DictConfig) -> dict[str, str]:
    """{method: best lr} of lr_search.compare_with (a search in which the hint encoder shared each
    method's lr); empty when it is unset or absent."""
    path = cfg.lr_search.get("compare_with")
    if not path or not (ROOT / path).is_file():
        return {}
    with open(ROOT / path, newline="") as file:
        return {row["method"]: row["best lr"] for row in csv.DictReader(file)}


def carried_rows(cfg: DictConfig) -> list[dict]:
    """The rows of lr_search.carry_from (an earlier report of this table, same settings) for
    methods this run does not search: a search finished part by part, on machines whose cells are gone."""
    path = cfg.lr_search.get("carry_from")
    if not path:
        return []
    with open(ROOT / path, newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["method"] not in methods(cfg)]
    return [{k: number(v) for k, v in row.items()} for row in rows]


def number(text: str) -> float | str:
    """A csv cell as the float it was written from (formatted as this run's figures), else as is."""
    try:
        return float(text)
    except ValueError:
        return text


def table(cfg: DictConfig) -> Path:
    control, search = cfg.controls[0], cfg.lr_search
    key, higher = headline_metric(control), higher_is_better(control)
    runs = iter(run_all(cfg, cells(cfg), "lr_search"))
    earlier = earlier_bests(cfg)
    rows = carried_rows(cfg)
    carried = [row["method"] for row in rows]
    for method in methods(cfg):
        scores = {float(lr): final_figure(next(runs), key) for lr in search.lrs}
        best = best_lr(scores, higher)
        rows.append({"method": method, "searches": searched_key(method), **{f"lr {lr:g}": fmt(v) for lr, v in scores.items()},
                     "best lr": "none (every run diverged)" if best is None else f"{best:g}",
                     f"best {key}": scores.get(best, math.nan),
                     **({"best lr, encoder sharing it": earlier.get(method, "not searched")} if earlier else {})})
    notes = [f"Every method gets every lr as the key in its 'searches' column (the settings line above); {key} at "
             "the last step; n/a: the loss diverged. The hint encoder trains at its own module.hint_lr in every row "
             "but hint's, where that lr is the one searched.",
             *([f"'best lr, encoder sharing it': the best of {search.compare_with}, the search in which the hint "
                "encoder trained at each method's own lr, on that report's grid and seed. Where the two differ the "
                "best moved once the encoder kept an lr of its own; compare the rows' scores above 3e-3 to see "
                "whose cliff it was (one seed each)."] if earlier else []),
             *([f"Rows {', '.join(carried)}: carried from {search.carry_from} (lr_search.carry_from), the same "
                "search written earlier from cells this run did not have; the settings line is this run's."]
               if carried else []),
             "To apply: commit hint's best as `module.hint_lr` in conf/experiment/base/tiny_control.yaml before the "
             "other rows run, and each other method's best as `method.tiny_control_lr` in conf/method/<method>.yaml (a "
             "person does this after the run). Cells are keyed on their overrides, not on config files: cells "
             "trained before a commit must be deleted from runs_dir, or use a fresh runs_dir."]
    return write_report(cfg, "lr_search", f"Learning-rate search ({control}, equal budget)", rows, notes,
                        settings=lr_search_settings(cfg))
