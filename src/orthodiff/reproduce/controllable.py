"""table=controllable: every method on every control (all seeds on the first control, the
first seed on the others), its headline figure, FID and cost."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.reproduce.cells import run_all, run_eval
from orthodiff.reproduce.report import control_settings, mean_std, write_report


def table(cfg: DictConfig) -> Path:
    first_control = cfg.controls[0]
    cells = [(m, c, s) for c in cfg.controls for m in cfg.methods
             for s in (cfg.seeds if c == first_control else cfg.seeds[:1])]
    runs = dict(zip(cells, run_all(cfg, cells, "controllable")))
    rows = []
    for method in cfg.methods:
        row = {"method": method}
        for control in cfg.controls:
            key = headline_metric(control)
            finals = [run["final"].get(key, math.nan) for (m, c, _), run in runs.items() if (m, c) == (method, control)]
            row[f"{control} {key}"] = mean_std(finals)
        first = runs[(method, first_control, cfg.seeds[0])]
        quality = run_eval(cfg, first)["image_quality"]
        row[f"FID ({first_control}, {quality['fid_extractor']} features)"] = round(quality["fid"], 2)
        row["trainable params"] = first["cost"]["trainable_parameters"]
        row["s/step"] = round(first["cost"]["seconds_per_step"], 3)
        row["peak memory MB"] = first["cost"]["peak_memory_mb"]
        rows.append(row)
    notes = [f"Final validation on the first {cfg.schedule.val_items} validation scenes after "
             f"{cfg.schedule.steps} steps (batch {cfg.schedule.batch_size}); mean ± std over seeds "
             f"{list(cfg.seeds)} for {first_control}, seed {cfg.seeds[0]} for the others. FID/KID from eval.py on "
             f"{cfg.eval_samples} test scenes of the first control. Peak memory is the process's peak "
             "resident memory on CPU (base model included) or CUDA's allocator peak on GPU.",
             "Published (SD 1.5, full-size; BRIEF): OFT/COFT Canny IoU 19.5; ControlNet++ table: ControlNet "
             "F1 34.65, mIoU 27.46, RMSE 35.90; T2I-Adapter F1 23.65, mIoU 12.61, RMSE 48.40."]
    return write_report(cfg, "controllable", "Controllable generation (miniature of the paper's table)", rows, notes,
                        settings=control_settings(cfg))
