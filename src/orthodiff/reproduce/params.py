"""table=params: trainable parameters at SD 1.5 scale (no training: diffusers' real
architectures on the meta device)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.param_counts import PAPER_TOTALS_M, parameter_table
from orthodiff.reproduce.report import write_report


def table(cfg: DictConfig) -> Path:
    rows = [{"name": row.name, "parameters": row.count, "millions": round(row.millions, 3), "note": row.note}
            for row in parameter_table()]
    notes = [f"Computed from diffusers' real architectures on the meta device (SD 1.5 UNet config "
             f"conf/model/sd15_unet.json). Published totals (OFT paper, incl. encoder, labelled paper_*): "
             f"{PAPER_TOTALS_M} M. See orthodiff/eval/param_counts.py for the ~2.07 M gap."]
    return write_report(cfg, "params", "Trainable parameters at SD 1.5 scale", rows, notes)
