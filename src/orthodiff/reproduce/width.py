"""table=width: the main control comparisons at each rung of the width ladder (tiny SDs whose
UNet is ½x, 1x and 2x v3's; scripts/pretrain_tiny_sd.py unet_width=0.5|2 builds the others).
On the first control with its schedule, every seed: OFT r=4; COFT at eps 1e-3 and at the
width's own scale-matched eps (paper convention, orthodiff.oft.scale); LoRA r=4 and the LoRA
rank whose parameter count is nearest OFT r=4's at that width ("lora_matched"); ControlNet;
T2I-Adapter; the hint encoder alone. Learning rates: 1x's (each method's tiny_control_lr, or
the hint encoder's module.hint_lr), with a one-seed check at its two neighbours on the
lr_search grid at every other width. The 1x cells are the plain ones the other tables train.

The report: the headline figure against width per method with its 95 % CI (reports/width.png),
the differences of width.pairs at each width decided with reproduce.stats (one Holm family), the
trainable parameters per method and width, and each difference's least-squares slope per
doubling of width carried to SD 1.5's median adapted width, labelled as an extrapolation.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf

from orthodiff.eval.base_quality import floors
from orthodiff.eval.control_metrics import headline_metric
from orthodiff.models.base import resolve_pretrained
from orthodiff.oft import DEFAULT_TARGETS
from orthodiff.oft.scale import layer_widths, scale_matched_eps
from orthodiff.reproduce import controllable, stats
from orthodiff.reproduce.cells import ROOT, method_setting, run_all
from orthodiff.reproduce.lr_search import searched_key
from orthodiff.reproduce.params import lora_count, oft_count, sd15_unet
from orthodiff.reproduce.report import (
    coft_note,
    control_settings,
    final_figure,
    higher_is_better,
    markdown_table,
    out_dir,
    write_csv,
    write_report,
)

PLAIN_WIDTH = 1.0  # the 1x rung (model=tiny): its cells are the other tables' plain ones (no model= override)


def unet_config(model: str) -> Path:
    """The UNet config of model=<model> (conf/model/<model>.yaml's pretrained folder); a ladder
    rung that is not built yet fails here, naming the command that builds it."""
    config = OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml")
    pretrained = config.get("pretrained") or OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").pretrained
    return Path(resolve_pretrained(str(pretrained))).expanduser() / "unet" / "config.json"


def matched_settings(model: str, num_blocks: int = 4, ranks=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32)) -> dict:
    """At one rung: the scale-matched eps (paper convention, two significant figures as
    conf/method/coft_matched.yaml writes it) and the LoRA rank whose trainable parameters are
    nearest OFT r=num_blocks's (on a log scale), with both counts."""
    config = unet_config(model)
    with torch.device("meta"):
        widths = layer_widths(UNet2DConditionModel.from_config(json.loads(config.read_text())), DEFAULT_TARGETS)
    eps = float(f"{scale_matched_eps(widths, layer_widths(sd15_unet(), DEFAULT_TARGETS), num_blocks):.2g}")
    oft = oft_count(num_blocks, config)[0]
    lora = {rank: lora_count(rank, config) for rank in ranks}
    rank = min(lora, key=lambda k: abs(math.log(lora[k] / oft)))
    return {"eps": eps, "lora_rank": rank, "oft_params": oft, "lora_params": lora[rank],
            "median_width": statistics.median(widths)}


def rungs(cfg: DictConfig) -> list[tuple[float, str]]:
    return [(float(width), str(model)) for width, model in cfg.width.models]


def tag(width: float) -> str:
    return f"-w{width:g}".replace(".", "")


def arm(method: str, model: str, width: float, matched: dict) -> tuple[str, list[str], str]:
    """(the method trained, extra overrides, cell tag) of one row at one rung."""
    plain = width == PLAIN_WIDTH
    extra = [] if plain else [f"model={model}"]
    suffix = "" if plain else tag(width)
    if method == "coft_matched" and not plain:
        return "coft_matched", [*extra, f"adapter.eps={matched['eps']}"], f"-eps{matched['eps']:g}{suffix}"
    if method == "lora_matched":
        rank = matched["lora_rank"]
        own = rank == method_setting("lora", "rank")
        return "lora", [*extra, *([] if own else [f"adapter.rank={rank}"])], ("" if own else f"-rank{rank}") + suffix
    return method, extra, suffix


def neighbours(cfg: DictConfig, method: str) -> list[float]:
    """The lr_search grid's values on either side of the method's own lr (its 1x choice)."""
    own = own_lr(method)
    grid = sorted(float(lr) for lr in cfg.lr_search.lrs)
    below, above = [lr for lr in grid if lr < own], [lr for lr in grid if lr > own]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def own_lr(method: str) -> float:
    """The lr a method's width rows train at: the hint encoder's module.hint_lr for method=hint,
    else its method.tiny_control_lr (conf/method/<method>.yaml, or the method it builds on)."""
    if searched_key(method) == "module.hint_lr":
        return float(OmegaConf.load(ROOT / "conf" / "experiment" / "base" / "tiny_control.yaml").module.hint_lr)
    config = OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml")
    if "tiny_control_lr" in config.get("method", {}):
        return float(config.method.tiny_control_lr)
    parents = [d for d in config.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    if not parents:
        raise ValueError(f"conf/method/{method}.yaml sets no method.tiny_control_lr")
    return own_lr(parents[0])


def plot(series: dict[str, list[tuple[float, float, float]]], key: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, points in series.items():
        widths, means, halves = zip(*points)
        ax.errorbar(widths, means, [0 if math.isnan(h) else h for h in halves], fmt="o-", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("UNet width (x tiny SD v3)")
    ax.set_ylabel(f"{key} (mean, 95 % CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trend(widths: list[float], differences: list[float], at: float) -> tuple[float, float]:
    """(least-squares slope of the difference per doubling of width, its value carried to width `at`)."""
    x = np.log2(widths)
    slope, intercept = np.polyfit(x, differences, 1)
    return float(slope), float(intercept + slope * math.log2(at))


def table(cfg: DictConfig) -> Path:
    control, w = cfg.controls[0], cfg.width
    key, higher = headline_metric(control), higher_is_better(control)
    ladder = rungs(cfg)
    matched = {model: matched_settings(model) for _, model in ladder}
    spec = {(m, width): arm(m, model, width, matched[model]) for width, model in ladder for m in w.methods}
    checks = [(m, width, lr) for width, _ in ladder if width != PLAIN_WIDTH and w.lr_check for m in w.methods
              for lr in neighbours(cfg, arm_method(m))]
    cells = [(method, control, s, extra, tag_) for (method, extra, tag_) in spec.values() for s in cfg.seeds]
    cells += [(spec[m, width][0], control, cfg.seeds[0], [*spec[m, width][1], f"{searched_key(spec[m, width][0])}={lr}"],
               f"{spec[m, width][2]}-lr{lr:g}") for m, width, lr in checks]
    results = iter(run_all(cfg, cells, "width"))
    runs = {arm_key: [next(results) for _ in cfg.seeds] for arm_key in spec}
    checked = {(m, width, lr): final_figure(next(results), key) for m, width, lr in checks}
    figures = {arm_key: [final_figure(r, key) for r in rs] for arm_key, rs in runs.items()}

    rows, series = [], {}
    for (method, width), rs in runs.items():
        mean, half = stats.mean_ci(figures[method, width])
        series.setdefault(method, []).append((width, mean, half))
        cost = rs[0].get("cost", {})
        row = {"method": method, "width": width, f"{key} [95 % CI]": stats.mean_ci_text(figures[method, width]),
               "seeds": len(rs), "trainable params": cost.get("trainable_parameters", 0),
               "control network params": cost.get("control_network_parameters", 0)}
        lrs = [lr for m, wd, lr in checks if m == method and wd == width]
        if lrs:
            row["lr check (seed 0)"] = "; ".join(f"{lr:g}: {checked[method, width, lr]:.3f}" for lr in lrs)
        rows.append(row)
    plot(series, key, out_dir(cfg) / "width.png")

    margin = controllable.equivalence_margin_of(cfg, [r for rs in runs.values() for r in rs], key)
    pairs = [(a, b, width) for a, b in w.pairs for width, _ in ladder if (a, width) in runs and (b, width) in runs]
    comparisons = stats.comparison_rows([(f"{a} @ {width:g}x", figures[a, width], f"{b} @ {width:g}x",
                                          figures[b, width]) for a, b, width in pairs], higher, margin)
    write_csv(cfg, "width_comparisons", comparisons)
    sd15_width = statistics.median(layer_widths(sd15_unet(), DEFAULT_TARGETS))
    plain_model = dict(ladder).get(PLAIN_WIDTH, ladder[0][1])
    at = sd15_width / matched[plain_model]["median_width"]
    trends = []
    for a, b in w.pairs:
        points = [(width, stats.mean_ci(figures[a, width])[0] - stats.mean_ci(figures[b, width])[0])
                  for width, _ in ladder if (a, width) in runs and (b, width) in runs]
        if len(points) >= 2:
            slope, carried = trend(*zip(*points), at)
            trends.append({"difference": f"{a} - {b}", **{f"at {wd:g}x": round(d, 4) for wd, d in points},
                           "slope per doubling": round(slope, 4), f"extrapolated to {at:.3g}x": round(carried, 4)})
    settings_rows = [{"width": width, "model": model, "scale-matched eps (paper convention)": matched[model]["eps"],
                      "lora_matched rank": matched[model]["lora_rank"], "OFT r=4 params": matched[model]["oft_params"],
                      "its LoRA params": matched[model]["lora_params"],
                      "median adapted width": matched[model]["median_width"]} for width, model in ladder]
    write_csv(cfg, "width_settings", settings_rows)
    quality_rows = base_quality(cfg, ladder)
    notes = [f"{control}, {cfg.schedule.steps} steps of batch {cfg.schedule.batch_size}, final {key} on the first "
             f"{cfg.schedule.val_items} validation scenes, mean [95 % CI] over seeds {list(cfg.seeds)}. Widths scale "
             "the UNet's block_out_channels (v3: 64/96/96); VAE, text encoder and data are v3's. Every method trains "
             "at its 1x lr (method.tiny_control_lr; the hint encoder at module.hint_lr); 'lr check' gives seed 0 at "
             "the lr_search grid's neighbours of that lr at the other widths.",
             "coft is eps 1e-3 in the paper convention at every width; coft_matched is the width's own scale-matched "
             "eps (paper convention: the eps whose median per-plane rotation budget equals SD 1.5's at 1e-3); "
             "lora_matched is the LoRA rank whose parameter count is nearest OFT r=4's at that width:",
             *markdown_table(settings_rows), "",
             "Each rung as a text-to-image model, against the floors tiny SD v3 was held to (docs/miniature.md; "
             "scripts/evaluate_tiny_sd.py's report of the rung, width.quality):",
             *markdown_table(quality_rows), "",
             "Differences at each width (ours - theirs, reproduce.stats: Welch's 95 % CI, Holm over the table, "
             "equivalence within 5 % of the range from the base model to the real images through the VAE):",
             *markdown_table(comparisons), "",
             f"Trend (an extrapolation, not a measurement): each difference's least-squares line in log2(width) "
             f"through the widths measured, carried to SD 1.5's median adapted width ({sd15_width:g}, "
             f"{at:.3g}x the 1x model's {matched[plain_model]['median_width']:g}). So few widths and their "
             "noise make it a direction, not a figure:",
             *markdown_table(trends), "",
             *coft_note([rs[0] for (m, _), rs in runs.items() if m.startswith("coft")][:2])]
    return write_report(cfg, "width", f"Control against UNet width ({control})", rows, notes, ["width.png"],
                        settings=control_settings(cfg))


def base_quality(cfg: DictConfig, ladder: list[tuple[float, str]]) -> list[dict]:
    """One row per floor of v3's, one column per rung: its value, met or missed, from the rung's
    scripts/evaluate_tiny_sd.py report (width.quality), or the command that measures it."""
    columns = {}
    for width, model in ladder:
        configured = cfg.width.get("quality", {}).get(model, f"reports/tiny_sd_{model}_quality.json")
        path = ROOT / configured
        if path.is_file():
            columns[f"{width:g}x"] = [("n/a" if r["value"] is None else f"{r['value']:.4g} ({'met' if r['met'] else 'missed'})")
                                      for r in floors(json.loads(path.read_text()))]
        else:
            folder = unet_config(model).parents[1]
            command = f"not measured: python scripts/evaluate_tiny_sd.py --pipeline {folder} --out {configured}"
            columns[f"{width:g}x"] = [command] + [""] * (len(floors({})) - 1)
    return [{"v3 floor": row["floor"], **{rung: values[i] for rung, values in columns.items()}}
            for i, row in enumerate(floors({}))]


def arm_method(method: str) -> str:
    """The method a row trains (lora_matched is LoRA)."""
    return "lora" if method == "lora_matched" else method
