"""table=ablation_r: OFT's block count r against the headline figure of one control."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.eval.param_counts import PAPER_TOTALS_M, oft_count
from orthodiff.reproduce.cells import run_all
from orthodiff.reproduce.report import control_settings, write_report


def table(cfg: DictConfig) -> Path:
    ablation = cfg.ablation
    key = headline_metric(ablation.control)
    cells = [(ablation.method, ablation.control, cfg.seeds[0], [f"adapter.num_blocks={r}"], f"-r{r}")
             for r in ablation.num_blocks]
    rows = []
    for r, run in zip(ablation.num_blocks, run_all(cfg, cells, "ablation_r")):
        rows.append({"r": r, key: run["final"].get(key),
                     "trainable params (this model)": run["cost"]["trainable_parameters"],
                     "OFT params at SD 1.5": oft_count(r)[0],
                     "paper total incl. encoder (M)": PAPER_TOTALS_M.get(r, "n/a")})
    notes = ["Published (OFT paper, ADE20K mIoU): r=2 27.18, r=4 27.06, r=8 24.09, r=16 21.0."]
    return write_report(cfg, "ablation_r", f"OFT block count r vs {key}", rows, notes,
                        settings=control_settings(cfg))
