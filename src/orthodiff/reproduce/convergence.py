"""table=convergence: the first control's headline figure at every validation of each
method's first-seed run (the same cells as table=controllable), and its plot."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.reproduce.cells import run_all
from orthodiff.reproduce.report import control_settings, out_dir, write_report


def table(cfg: DictConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    control = cfg.controls[0]
    key = headline_metric(control)
    runs = run_all(cfg, [(m, control, cfg.seeds[0]) for m in cfg.methods], "convergence")
    rows, (fig, ax) = [], plt.subplots(figsize=(6, 4))
    for method, run in zip(cfg.methods, runs):
        steps = [h["step"] for h in run["history"]]
        values = [h[key] for h in run["history"]]
        ax.plot(steps, values, marker="o", label=method)
        rows += [{"method": method, "step": s, key: v} for s, v in zip(steps, values)]
    ax.set_xlabel("training step")
    ax.set_ylabel(key)
    ax.set_title(f"{control}: control metric vs step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir(cfg) / "convergence.png", dpi=100)
    plt.close(fig)
    notes = [f"Validation on {cfg.schedule.val_items} fixed scenes every {cfg.schedule.val_every} steps, "
             f"seed {cfg.seeds[0]}."]
    return write_report(cfg, "convergence", f"Convergence ({control})", rows, notes, ["convergence.png"],
                        settings=control_settings(cfg))
