"""table=ablation: what moves OFT, on the first control with its schedule (the convergence
cells' schedule), one seed per row unless the row is in ablation.three_seeds (every seed):

    hint                 the hint encoder alone, UNet untouched (method=hint)
    attention            + ablation.method on the attention projections only
    default              + GEGLU: ablation.method as configured (its controllable cells, every seed)
    conv                 + the ResNet convolutions (OFTConv2d on ablation.conv_targets)
    r<r>                 the block count r (ablation.num_blocks; the default row has the method's own)
    hint_lr<lr>          the hint encoder at another lr of its own (module.hint_lr; ablation.hint_lrs)

Each row's targets, r and lr scale are read back from its run's config, and the report says
which row moves the method most, and by how much, against the default.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.oft import DEFAULT_TARGETS
from orthodiff.reproduce import paper
from orthodiff.reproduce.cells import cell_config, run_all
from orthodiff.reproduce.params import PAPER_TOTALS_M, oft_count
from orthodiff.reproduce.report import control_settings, final_figure, finite_mean, higher_is_better, mean_std, write_report


def targets_override(targets) -> str:
    return f"adapter.targets=[{','.join(targets)}]"


def variants(cfg: DictConfig) -> list[dict]:
    """The rows: name, what it is, method, extra train.py overrides, seeds."""
    a = cfg.ablation
    rows = [("hint", "hint encoder alone (UNet untouched)", "hint", []),
            ("attention", f"hint + {a.method} on attention only", a.method, [targets_override(a.attention_targets)]),
            ("default", f"+ GEGLU: {a.method} as configured", a.method, []),
            ("conv", "+ ResNet convolutions", a.method, [targets_override([*DEFAULT_TARGETS, *a.conv_targets])]),
            *((f"r{r}", f"{a.method}, r = {r}", a.method, [f"adapter.num_blocks={r}"]) for r in a.num_blocks),
            *((f"hint_lr{lr:g}", f"{a.method}, hint encoder lr {lr:g}", a.method, [f"module.hint_lr={lr}"])
              for lr in a.hint_lrs)]
    names = [name for name, *_ in rows]
    unknown = set(a.three_seeds) - set(names)
    if unknown:
        raise ValueError(f"ablation.three_seeds names {sorted(unknown)}; the rows are {names}")
    return [{"name": name, "what": what, "method": method, "extra": extra,
             "seeds": list(cfg.seeds) if name == "default" or name in a.three_seeds else [cfg.seeds[0]]}
            for name, what, method, extra in rows]


def cells(cfg: DictConfig, variant: dict) -> list[tuple]:
    """run_cell's arguments; hint and default without a tag: they are the plain cells."""
    tag = f"-{variant['name']}" if variant["extra"] else ""
    return [(variant["method"], cfg.controls[0], s, variant["extra"], tag) for s in variant["seeds"]]


def largest_moves(changes: dict[str, float]) -> list[tuple[str, float]]:
    """(row, change against the default) by decreasing |change|, NaN left out."""
    return sorted(((n, d) for n, d in changes.items() if not math.isnan(d)), key=lambda item: -abs(item[1]))


def run_config(run: dict) -> dict:
    """What a row trained, read back from its run: targets, r, the hint encoder's lr."""
    config = cell_config(run["run_dir"])
    adapter = config.adapter
    return {"targets": "none (UNet untouched)" if adapter is None else ", ".join(adapter.targets or DEFAULT_TARGETS),
            "r": "" if adapter is None else adapter.get("num_blocks", ""),
            "hint lr": config.module.get("hint_lr") or config.module.optimizer.lr}


def what_moves_most(method: str, key: str, higher: bool, changes: dict[str, float], means: dict[str, float],
                    what: dict[str, str]) -> str:
    """The report's verdict: the row that moves the method most (and, when that one hurts,
    the row that helps most), with every row's change."""
    moves = largest_moves(changes)
    if not moves:
        return "No row has a finite score: nothing to compare."
    name, change = moves[0]
    verdict = (f"Moves {method} most: '{name}' ({what[name]}), {key} {means[name] - change:.4f} (default, same seeds) "
               f"-> {means[name]:.4f} ({change:+.4f}, {'better' if (change > 0) == higher else 'worse'}). "
               "Largest |change| first: " + ", ".join(f"{n} {d:+.4f}" for n, d in moves)
               + f". Candidates for ablation.three_seeds (the two that move it most): {[n for n, _ in moves[:2]]}.")
    gains = [(n, d) for n, d in moves if (d > 0) == higher]
    if gains and gains[0] != moves[0]:
        verdict += f" Largest gain: '{gains[0][0]}' ({what[gains[0][0]]}), {gains[0][1]:+.4f}."
    return verdict


def table(cfg: DictConfig) -> Path:
    control, method = cfg.controls[0], cfg.ablation.method
    key, higher = headline_metric(control), higher_is_better(control)
    rows_spec = variants(cfg)
    specs = [c for v in rows_spec for c in cells(cfg, v)]
    runs = iter(run_all(cfg, specs, "ablation"))
    results = {v["name"]: [next(runs) for _ in v["seeds"]] for v in rows_spec}
    means = {n: finite_mean([final_figure(r, key) for r in rs]) for n, rs in results.items()}
    # Against the default at the row's own seeds: a one-seed row is compared with the same seed.
    default = dict(zip(next(v["seeds"] for v in rows_spec if v["name"] == "default"), results["default"]))
    changes = {v["name"]: means[v["name"]] - finite_mean([final_figure(default[s], key) for s in v["seeds"]])
               for v in rows_spec if v["name"] != "default"}
    rows = []
    for v in rows_spec:
        first = results[v["name"]][0]
        trained = run_config(first)
        row = {"row": v["name"], "what": v["what"], "seeds": len(v["seeds"]),
               key: mean_std([final_figure(r, key) for r in results[v["name"]]]),
               "change vs default": "" if v["name"] == "default" else changes[v["name"]], **trained,
               "trainable params (this model)": first.get("cost", {}).get("trainable_parameters", "n/a")}
        default_targets = trained["targets"] == ", ".join(DEFAULT_TARGETS)
        if default_targets and isinstance(trained["r"], int):  # the paper's r ablation, at SD 1.5 scale
            row["OFT params at SD 1.5"] = oft_count(trained["r"])[0]
            row["paper total incl. encoder (M)"] = PAPER_TOTALS_M.get(trained["r"], "n/a")
        rows.append(row)
    verdict = what_moves_most(method, key, higher, changes, means, {v['name']: v['what'] for v in rows_spec})
    notes = [verdict,
             f"{control}, {cfg.schedule.steps} steps of batch {cfg.schedule.batch_size}; final {key} on the first "
             f"{cfg.schedule.val_items} validation scenes; 'change vs default' = row mean - default mean at the row's "
             "seeds. Seeds: "
             f"{list(cfg.seeds)} for default (the controllable cells) and ablation.three_seeds "
             f"{list(cfg.ablation.three_seeds)}, seed {cfg.seeds[0]} for the others. Targets, r and the hint encoder's lr are read "
             "back from each run's config.",
             "Published (OFT paper): seg mIoU by r: " + ", ".join(f"r={r} {v}" for r, v in paper.R_ABLATION_MIOU.items())
             + "; FID on ADE20K by adapted layers: attention 30.8, conv 39.8, both 30.4."]
    return write_report(cfg, "ablation", f"What moves {method} ({control})", rows, notes,
                        settings=control_settings(cfg))
