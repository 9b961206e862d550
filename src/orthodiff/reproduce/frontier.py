"""table=frontier: control against trainable parameters, on the first control with its schedule.
OFT at every r of frontier.oft_blocks, LoRA at every rank of frontier.lora_ranks, and
frontier.others (COFT at the scale-matched eps, full finetuning, ControlNet, the T2I-Adapters,
the hint encoder alone), every seed (frontier.two_seeds: rows cut to two). Each row's final
figure with its 95 % CI over seeds against its trainable parameters, both the UNet adapter's
alone and with the control network (reports/frontier.png); OFT against LoRA at the pair of
(r, rank) whose parameter ratio is nearest the paper's (OFT r=4 / LoRA r=4 on SD 1.5, about
10.5x) and nearest 1 (equal parameters), decided with reproduce.stats (Holm over the table).
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.reproduce import controllable, stats
from orthodiff.reproduce.cells import method_setting, run_all
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


def arms(cfg: DictConfig) -> dict[str, tuple[str, list[str], str]]:
    """{row: (method, extra overrides, tag)}; the methods' own r and rank are their plain cells."""
    f = cfg.frontier
    rows = {}
    for method, key, values, label in (("oft", "num_blocks", f.oft_blocks, "oft_r{}"),
                                       ("lora", "rank", f.lora_ranks, "lora_r{}")):
        own = method_setting(method, key)
        for v in values:
            rows[label.format(v)] = (method, [] if v == own else [f"adapter.{key}={v}"],
                                     "" if v == own else f"-{key}{v}")
    return {**rows, **{m: (m, [], "") for m in f.others}}


def seeds(cfg: DictConfig, row: str) -> list[int]:
    return list(cfg.seeds)[:2] if row in cfg.frontier.two_seeds else list(cfg.seeds)


def order(cfg: DictConfig) -> list[tuple[str, int]]:
    """(row, seed), seed-major: a grid stopped part way has every row's first seeds first."""
    spec = arms(cfg)
    return [(row, s) for s in cfg.seeds for row in spec if s in seeds(cfg, row)]


def cells(cfg: DictConfig) -> list[tuple]:
    spec = arms(cfg)
    return [(spec[row][0], cfg.controls[0], s, spec[row][1], spec[row][2]) for row, s in order(cfg)]


def parameters(run: dict) -> tuple[int, int]:
    """(UNet adapter's trainable parameters, with the control network's) from a cell's cost record."""
    cost = run.get("cost", {})
    total = cost.get("trainable_parameters", 0)
    return total - cost.get("control_network_parameters", 0), total


def nearest_pair(counts: dict[str, int], ratio: float) -> tuple[str, str]:
    """The (OFT row, LoRA row) whose adapter-parameter ratio is nearest `ratio` (on a log scale)."""
    pairs = [(o, lo) for o in counts if o.startswith("oft_r") for lo in counts if lo.startswith("lora_r")]
    return min(pairs, key=lambda p: abs(math.log(counts[p[0]] / counts[p[1]] / ratio)))


def plot(rows: dict[str, dict], key: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, which in zip(axes, ("adapter", "total")):
        for family, marker in (("oft_r", "o-"), ("lora_r", "s-")):
            series = [r for name, r in rows.items() if name.startswith(family)]
            ax.errorbar([r[which] for r in series], [r["mean"] for r in series], [r["ci"] for r in series],
                        fmt=marker, capsize=3, label=f"{family[:-2]} (r / rank)")
            for r in series:
                ax.annotate(r["label"], (r[which], r["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for name, r in rows.items():
            if not name.startswith(("oft_r", "lora_r")) and r[which] > 0:
                ax.errorbar([r[which]], [r["mean"]], [r["ci"]], fmt="D", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters: " + ("the UNet adapter alone" if which == "adapter"
                                                  else "adapter + control network"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{key} (mean, 95 % CI over seeds)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(cfg: DictConfig) -> Path:
    control = cfg.controls[0]
    key, higher = headline_metric(control), higher_is_better(control)
    spec = arms(cfg)
    done = dict(zip(order(cfg), run_all(cfg, cells(cfg), "frontier")))
    runs = {row: [done[row, s] for s in seeds(cfg, row)] for row in spec}
    figures = {row: [final_figure(r, key) for r in rs] for row, rs in runs.items()}
    margin = controllable.equivalence_margin_of(cfg, [r for rs in runs.values() for r in rs], key)
    rows, points = [], {}
    for row, rs in runs.items():
        adapter, total = parameters(rs[0])
        mean, half = stats.mean_ci(figures[row])
        points[row] = {"adapter": adapter, "total": total, "mean": mean, "ci": 0 if math.isnan(half) else half,
                       "label": row.split("_r")[-1] if row.startswith(("oft_r", "lora_r")) else row}
        rows.append({"row": row, f"{key} [95 % CI]": stats.mean_ci_text(figures[row]), "seeds": len(rs),
                     "adapter params": adapter, "control network params": total - adapter, "trainable params": total})
    plot(points, key, out_dir(cfg) / "frontier.png")
    adapters = {row: p["adapter"] for row, p in points.items() if p["adapter"] > 0}
    paper_pair, equal_pair = nearest_pair(adapters, cfg.frontier.paper_ratio), nearest_pair(adapters, 1.0)
    anchor = f"oft_r{method_setting('oft', 'num_blocks')}"  # OFT as configured, against each of frontier.against
    pairs = list(dict.fromkeys([paper_pair, equal_pair, *((anchor, b) for b in cfg.frontier.against if b in spec)]))
    comparisons = stats.comparison_rows([(a, figures[a], b, figures[b]) for a, b in pairs], higher, margin)
    write_csv(cfg, "frontier_comparisons", comparisons)
    ratio = {p: adapters[p[0]] / adapters[p[1]] for p in (paper_pair, equal_pair)}
    notes = [f"{control}, {cfg.schedule.steps} steps of batch {cfg.schedule.batch_size}, final {key} on the first "
             f"{cfg.schedule.val_items} validation scenes; mean [95 % CI] over the row's seeds ({list(cfg.seeds)}, "
             f"or the first two for frontier.two_seeds: {list(cfg.frontier.two_seeds) or 'none cut'}). Every r and "
             "rank trains at its method's lr (method.tiny_control_lr, chosen for r = 4 and rank 4 by table=lr_search); the "
             "hint encoder at its own module.hint_lr.",
             f"At the paper's OFT/LoRA parameter ratio ({cfg.frontier.paper_ratio:g}x on SD 1.5, r = 4 against rank 4): "
             f"{paper_pair[0]} against {paper_pair[1]}, {ratio[paper_pair]:.1f}x here. At equal parameters: "
             f"{equal_pair[0]} against {equal_pair[1]}, {ratio[equal_pair]:.2f}x.",
             *coft_note([rs[0] for rs in runs.values()]),
             "", f"Comparisons ({key}; frontier_comparisons.csv):", "", *markdown_table(comparisons), "",
             *stats.notes(margin, key)]
    return write_report(cfg, "frontier", f"Control against trainable parameters ({control})", rows, notes,
                        ["frontier.png"], settings=control_settings(cfg))

