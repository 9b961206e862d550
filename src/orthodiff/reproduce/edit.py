"""table=edit: disentangled attribute editing by a learned per-step prompt mix (Wu et al.,
CVPR 2023) on the shapes world, where every edit can be checked exactly.

One neutral prompt, several edits (cfg.edit.attributes: background, colour, kind, count).
Per edit, from the same noise of every seed: the attribute prompt alone, hard switches from
the neutral to the attribute prompt at step k (swept: where the attribute is decided), the
paper's initial schedule untrained, the paper's budget (Adam, lr 0.05, 10 iterations from
that init) and the adaptive learner (from the best of the init and the switches, until the
edit passes or a cap; Edit.learn) on each learn seed, and the schedule the learner finds
on seed 0 transferred to the other seeds and to real shapes-world images through
inversion. Then (prompt, attribute) pairs nobody tuned for (cfg.edit.pairs) on a few seeds
each, with the success rate per kind of edit. Scores (ShapesObjective): attribute success
(classifier), content kept (IoU of the segmenter's foreground masks, neutral vs edited;
the real image itself for inverted edits), shape count kept.

The slow parts are kept, keyed on the model's weights and every setting that shapes them, so
a table=edit killed part-way (a session's end) resumes without learning them again: the
learned schedules (a few KB each) in cells_archive/edit/ (committed with the reports, so a new
machine resumes too; runs_dir/edit/ without an archive), the real images' inversion (MBs) in
runs_dir/edit/. Rendering and scoring are redone (seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from orthodiff.data.shapes import SPLIT_SEEDS, make_scene
from orthodiff.editing import (
    Edit,
    ShapesObjective,
    caption_changes,
    default_switches,
    load_edit_model,
    paper_schedule,
    switch_schedule,
)
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.eval.image_metrics import parse_caption
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.files import atomic_path
from orthodiff.reproduce.cells import archive_folder
from orthodiff.reproduce.report import labelled_grid, markdown_table, out_dir, write_csv, write_report

log = logging.getLogger(__name__)
SCORES = ("success", "content_iou", "count_kept")
LEARNED, PAPER, TRANSFERRED = "learned (own schedule)", "paper budget (own schedule)", "transferred (seed-0 schedule)"
MADE = (0.9, 0.8)  # an edit made: success and content IoU at least these (the bar)


def real_images(prompt: str, n: int) -> torch.Tensor:
    """n test-split scenes that show exactly `prompt` (one shape: its kind, colour, background)."""
    shapes, background = parse_caption(prompt)
    if len(shapes) != 1:
        raise ValueError(f"edit.prompt={prompt!r}: real images are drawn for one-shape prompts")
    (color, kind), = shapes
    scenes = [make_scene(SPLIT_SEEDS["test"] + k, shapes=(kind,), colors=(color,), backgrounds=(background,))
              for k in range(n)]
    return images_to_tensor(np.stack([s.image for s in scenes]))


def cached(folder: Path, name: str, key: dict, compute, *args, **kwargs):
    """compute(*args, **kwargs), kept in folder/<name>-<digest of key>.pt (written atomically)
    and loaded from there when the same key comes again."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"{name}-{digest}.pt"
    if path.is_file():
        log.info("%s: reused %s", name, path)
        return torch.load(path, weights_only=False)
    result = compute(*args, **kwargs)
    with atomic_path(path) as tmp:
        torch.save(result, tmp)
    return result


def learn_key(model, settings, prompt: str, attribute: str, seeds: list[int]) -> dict:
    """What a learned schedule depends on: the weights, the edit, the noise seeds, the budgets."""
    return {"model": model.digest, "prompt": prompt, "attribute": attribute, "seeds": seeds,
            **{k: settings[k] for k in ("steps", "guidance", "lr", "iterations", "cap", "content", "content_weight")}}


def score(objective: ShapesObjective, images: torch.Tensor, reference: torch.Tensor) -> dict[str, np.ndarray]:
    objective.prepare(reference)
    scores = objective.scores(images)
    return {k: scores[k] for k in SCORES}


def best_switch(results: dict, method: str, seeds: slice | list) -> tuple[str, float, float] | None:
    """The hard switch with the highest content IoU among those whose success on `seeds` is
    at least `method`'s there: (name, success, IoU), or None when no switch gets there."""
    target = results[method]["success"][seeds].mean()
    candidates = [(name, r["success"][seeds].mean(), r["content_iou"][seeds].mean())
                  for name, r in results.items() if name.startswith("switch k=") or name == "attribute alone"]
    reach = [c for c in candidates if c[1] >= target - 1e-9]
    return max(reach, key=lambda c: c[2]) if reach else None


def working_switch(results: dict, seeds: slice | list = slice(None)) -> tuple[str, float, float]:
    """The hard switch (attribute alone included) that keeps the most content among those
    making the edit on at least half the seeds, else the most successful one."""
    candidates = [(name, r["success"][seeds].mean(), r["content_iou"][seeds].mean())
                  for name, r in results.items() if name.startswith("switch k=") or name == "attribute alone"]
    working = [c for c in candidates if c[1] >= 0.5]
    return max(working, key=lambda c: c[2]) if working else max(candidates, key=lambda c: c[1])


@torch.no_grad()
def _render(edit: Edit, noise, lambdas, uncond=None, batch: int = 20) -> torch.Tensor:
    if lambdas.ndim == 1:
        lambdas = lambdas[:, None].expand(-1, len(noise))
    chunks = [edit.render(noise[k:k + batch], lambdas[:, k:k + batch],
                          None if uncond is None else [u[k:k + batch] for u in uncond])
              for k in range(0, len(noise), batch)]
    return torch.cat(chunks)


def edit_kind(prompt: str, attribute: str) -> str:
    """background, colour, kind or count; "several" for a pair that changes more than one
    thing. A pair off the shapes world's grammar, or naming the same scene, raises."""
    try:
        changes, _ = caption_changes(prompt, attribute)
    except ValueError as error:
        raise ValueError(f"edit pair ({prompt!r}, {attribute!r}): {error}") from None
    kinds = {c.what for c in changes}
    return kinds.pop() if len(kinds) == 1 and len(changes) == 1 else "several"


def learn_both(edit: Edit, noise, objective, settings, neutral, switches) -> tuple:
    """(paper's budget, adaptive learner) schedules of each sample of `noise`, learned in
    one batch each (Adam is elementwise: as if alone)."""
    init = paper_schedule(edit.steps)[:, None].repeat(1, len(noise))
    paper = edit.learn(noise, objective, settings.iterations, settings.lr, init, reference=neutral)
    adaptive = edit.learn(noise, objective, settings.cap, settings.lr, init, reference=neutral, adaptive=True,
                          switches=switches)
    return paper, adaptive


def pareto(results: dict, method: str, seeds: slice) -> str:
    """The schedules that dominate `method` on (success, content IoU) over `seeds`, or that
    none does (it is on or beyond their front)."""
    mine = results[method]["success"][seeds].mean(), results[method]["content_iou"][seeds].mean()
    others = [(name, r["success"][seeds].mean(), r["content_iou"][seeds].mean()) for name, r in results.items()
              if name.startswith("switch k=") or name in ("attribute alone", "paper init (untrained)")]
    above = [o for o in others if o[1] >= mine[0] and o[2] >= mine[1] and (o[1], o[2]) != mine]
    if not above:
        return "on or beyond the front of the switches and the paper's init"
    return "dominated by " + ", ".join(f"{n} ({s:.2f}, {i:.3f})" for n, s, i in above)


def table(cfg: DictConfig) -> Path:
    settings = cfg.edit
    torch.manual_seed(0)
    pairs = [(p, a, edit_kind(p, a)) for p, a in settings.pairs]  # bad pairs fail before any model loads
    for attribute in settings.attributes.values():
        edit_kind(settings.prompt, attribute)
    model = load_edit_model(settings.base)
    inversion_cache = Path(cfg.runs_dir).expanduser() / "edit"  # MBs: not archived
    schedules_cache = (archive_folder(cfg) or Path(cfg.runs_dir).expanduser()) / "edit"  # KBs: committed
    steps, guidance = settings.steps, settings.guidance
    seeds = list(range(1, settings.seeds + 1))
    noise, noise0 = torch.cat([model.noise(s) for s in seeds]), model.noise(0)
    n_learn = min(settings.learn_seeds, len(seeds))
    switches = default_switches(steps)
    schedules = {"attribute alone": switch_schedule(steps, 0), **{f"switch k={k}": switch_schedule(steps, k)
                                                                  for k in switches},
                 "paper init (untrained)": paper_schedule(steps)}

    reals = real_images(settings.prompt, settings.real_images) if settings.real_images else None
    inversion = None
    if reals is not None:
        def invert() -> tuple:  # (noise, per-step unconditional encodings, seconds per image)
            started = time.perf_counter()
            inverter = Edit(model, settings.prompt, settings.prompt, steps, guidance)
            parts = [], []
            for k in range(0, len(reals), 10):  # the null-text optimisation, 10 images at a time
                z, uncond = inverter.invert(reals[k:k + 10], settings.refine, settings.null_iterations)
                parts[0].append(z)
                parts[1].append(uncond)
            return torch.cat(parts[0]), [torch.cat(u) for u in zip(*parts[1])], (time.perf_counter() - started) / len(reals)

        key = {"model": model.digest, "prompt": settings.prompt, "images": settings.real_images,
               **{k: settings[k] for k in ("steps", "guidance", "refine", "null_iterations")}}
        *inversion, invert_seconds = cached(inversion_cache, "inversion", key, invert)
        log.info("inverted %d real images: %.1f s each", len(reals), invert_seconds)

    rows, detail, grid_rows, grid_labels, curves, mean_lambdas = [], [], [], [], {}, {}
    blank = np.full((model.resolution, model.resolution, 3), 255, np.uint8)
    for name, attribute in settings.attributes.items():
        edit = Edit(model, settings.prompt, attribute, steps, guidance)
        objective = ShapesObjective(settings.prompt, attribute, settings.content, settings.content_weight)

        started = time.perf_counter()
        neutral = _render(edit, noise, torch.ones(steps))
        render_seconds = (time.perf_counter() - started) / len(seeds)
        objective.prepare(neutral)
        neutral_ok = float(objective.scores(neutral)["neutral_ok"].mean())
        generated = {"neutral (lambda = 1)": neutral, **{m: _render(edit, noise, s) for m, s in schedules.items()}}
        # Seed 0's schedule, learned alone (what one edit costs), then transferred to the other seeds.
        transfer = cached(schedules_cache, "transfer", learn_key(model, settings, settings.prompt, attribute, [0]), edit.learn,
                          noise0, objective, settings.cap, settings.lr, adaptive=True, switches=switches)
        generated[TRANSFERRED] = _render(edit, noise, transfer.lambdas)
        paper, own = cached(schedules_cache, "learned", learn_key(model, settings, settings.prompt, attribute, seeds[:n_learn]),
                            learn_both, edit, noise[:n_learn], objective, settings, neutral[:n_learn], switches)
        generated[PAPER] = _render(edit, noise[:n_learn], paper.lambdas)
        generated[LEARNED] = _render(edit, noise[:n_learn], own.lambdas)
        results = {}
        for method, images in generated.items():
            results[method] = score(objective, images, neutral[:len(images)])
            learned = {PAPER: paper, LEARNED: own}.get(method)
            rows.append({"edit": name, "images": "generated", "method": method, "seeds": len(images),
                         **{k: round(float(np.nanmean(results[method][k])), 3) for k in SCORES},
                         "Adam steps": "" if learned is None else round(float(np.mean(learned.iterations)), 1),
                         "seconds per edit": round(render_seconds + (learned.seconds / n_learn if learned else 0), 2)})
        curves[name] = [(0, *_means(results["attribute alone"])),
                        *((k, *_means(results[f"switch k={k}"])) for k in switches),
                        (steps, *_means(results["neutral (lambda = 1)"]))]
        mean_lambdas[name] = {"learned (own)": own.lambdas.numpy(), "paper budget (own)": paper.lambdas.numpy()}
        own_seeds = slice(0, n_learn)
        verdict = {"edit": name, "attribute": attribute, "neutral_ok": neutral_ok, "transfer": transfer,
                   "own": own, "paper": paper, "decided": decided(curves[name]),
                   "pareto": pareto(results, LEARNED, own_seeds),
                   "reachable": [m for m, r in results.items() if m != "neutral (lambda = 1)"
                                 and r["success"][own_seeds].mean() >= MADE[0]
                                 and r["content_iou"][own_seeds].mean() >= MADE[1]]}
        for method, subset in ((LEARNED, own_seeds), (PAPER, own_seeds), (TRANSFERRED, slice(None))):
            verdict[method] = (results[method]["success"].mean(), results[method]["content_iou"].mean(),
                               best_switch(results, method, subset), working_switch(results, subset))

        if inversion is not None:
            z, uncond = inversion
            real = {"reconstruction (lambda = 1)": _render(edit, z, torch.ones(steps), uncond),
                    **{m: _render(edit, z, s, uncond) for m, s in schedules.items()},
                    TRANSFERRED: _render(edit, z, transfer.lambdas, uncond)}
            real_results = {}
            for method, images in real.items():
                real_results[method] = score(objective, images, reals)
                rows.append({"edit": name, "images": "real (inverted)", "method": method, "seeds": len(reals),
                             **{k: round(float(real_results[method][k].mean()), 3) for k in SCORES},
                             "seconds per edit": round(invert_seconds + render_seconds, 2)})
            verdict["real"] = (real_results[TRANSFERRED]["success"].mean(),
                               real_results[TRANSFERRED]["content_iou"].mean(),
                               best_switch(real_results, TRANSFERRED, slice(None)), working_switch(real_results))
        detail.append(verdict)

        # Sample grid: the first learn seed and the first real image of this edit.
        columns = ["neutral (lambda = 1)", "attribute alone", working_switch(results)[0], "paper init (untrained)",
                   PAPER, LEARNED, TRANSFERRED]
        grid_rows.append([to_uint8(generated[c][:1])[0] for c in columns])
        grid_labels.append(f"{name}, seed {seeds[0]}")
        if inversion is not None:
            real_columns = [None, "attribute alone", working_switch(real_results)[0], "paper init (untrained)",
                            "reconstruction (lambda = 1)", "", TRANSFERRED]
            grid_rows.append([to_uint8(reals[:1])[0] if c is None else blank if not c else to_uint8(real[c][:1])[0]
                              for c in real_columns])
            grid_labels.append(f"{name}, real image 0")

    pair_rows = [untuned_pair(model, settings, prompt, attribute, kind, switches, schedules, schedules_cache)
                 for prompt, attribute, kind in pairs]
    out = out_dir(cfg)
    if pair_rows:
        write_csv(cfg, "edit_pairs", pair_rows)
    grid = labelled_grid(grid_rows, grid_labels, ["neutral / real image", "attribute alone",
                                                  "best working hard switch (see notes)", "paper init",
                                                  "paper budget (own) / reconstruction",
                                                  "learned (own; generated only)", "transferred (seed 0)"],
                         out / "edit_samples.png", title=f"neutral: {settings.prompt}")
    plots = [grid.name, *plot_schedules(out, curves, mean_lambdas, steps)]
    return write_report(cfg, "edit", "Attribute editing by a learned prompt mix (Wu et al., CVPR 2023)", rows,
                        notes(settings, detail, n_learn, switches, pair_rows), plots=plots,
                        settings=f"- settings: {OmegaConf.to_container(settings)}")


def _means(scores: dict) -> tuple[float, float]:
    return float(scores["success"].mean()), float(scores["content_iou"].mean())


def decided(curve: list[tuple]) -> int | None:
    """The latest switch step k at which the edit is still made on at least half the seeds
    (None: at no k, the attribute prompt alone included)."""
    made = [k for k, success, _ in curve if success >= 0.5]
    return max(made) if made else None


def untuned_pair(model, settings, prompt: str, attribute: str, kind: str, switches: list[int],
                 schedules: dict, cache: Path) -> dict:
    """One (prompt, attribute) pair nobody tuned for, on seeds 1..pair_seeds: the switches,
    the paper's budget and the adaptive learner, each seed its own schedule (kept in `cache`)."""
    edit = Edit(model, prompt, attribute, settings.steps, settings.guidance)
    objective = ShapesObjective(prompt, attribute, settings.content, settings.content_weight)
    seeds = list(range(1, settings.pair_seeds + 1))
    noise = torch.cat([model.noise(s) for s in seeds])
    neutral = _render(edit, noise, torch.ones(settings.steps))
    objective.prepare(neutral)
    neutral_ok = float(objective.scores(neutral)["neutral_ok"].mean())
    paper, own = cached(cache, "learned", learn_key(model, settings, prompt, attribute, seeds), learn_both, edit,
                        noise, objective, settings, neutral, switches)
    results = {m: score(objective, _render(edit, noise, s), neutral) for m, s in schedules.items()}
    results[PAPER] = score(objective, _render(edit, noise, paper.lambdas), neutral)
    results[LEARNED] = score(objective, _render(edit, noise, own.lambdas), neutral)
    switch = working_switch(results)
    row = {"kind": kind, "prompt": prompt, "attribute": attribute, "seeds": len(noise), "neutral_ok": neutral_ok}
    for label, method in (("learned", LEARNED), ("paper budget", PAPER), ("best switch", switch[0]),
                          ("attribute alone", "attribute alone")):
        row[f"{label} success"] = round(float(results[method]["success"].mean()), 3)
        row[f"{label} IoU"] = round(float(results[method]["content_iou"].mean()), 3)
    row["best switch"] = switch[0]
    row["learned Adam steps"] = round(float(np.mean(own.iterations)), 1)
    row["learned s/seed"] = round(own.seconds / len(noise), 1)
    row["paper budget s/seed"] = round(paper.seconds / len(noise), 1)
    log.info("pair %s -> %s: learned success %.2f IoU %.3f", prompt, attribute, row["learned success"],
             row["learned IoU"])
    return row


def plot_schedules(out: Path, curves: dict, mean_lambdas: dict, steps: int) -> list[str]:
    """edit_switch.png (success and content IoU against the switch step, per edit) and
    edit_lambdas.png (the learned schedules' lambda per step, mean and range over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in curves.items():
        k, success, iou = np.array(curve).T
        axes[0].plot(k, success, marker="o", markersize=3, label=name)
        axes[1].plot(k, iou, marker="o", markersize=3, label=name)
    for ax, label in zip(axes, ("success", "content IoU")):
        ax.set_xlabel(f"switch step k (neutral prompt for the first k of {steps} steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("where each attribute is decided: hard switches, generated seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "edit_switch.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(mean_lambdas), figsize=(3.2 * len(mean_lambdas), 3), sharey=True, squeeze=False)
    for ax, (name, learned) in zip(axes[0], mean_lambdas.items()):
        for label, lambdas in learned.items():
            lambdas = lambdas.reshape(steps, -1)
            line, = ax.plot(range(steps), lambdas.mean(1), marker="o", markersize=2, label=label)
            ax.fill_between(range(steps), lambdas.min(1), lambdas.max(1), color=line.get_color(), alpha=0.15)
        ax.step(range(steps), paper_schedule(steps).numpy(), where="mid", color="grey", linestyle=":",
                label="paper init")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("sampling step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("lambda (1 = neutral prompt)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("learned schedules: mean over the learn seeds, band = min..max", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "edit_lambdas.png", dpi=100)
    plt.close(fig)
    return ["edit_switch.png", "edit_lambdas.png"]


def notes(settings, detail: list[dict], n_learn: int, switches: list[int], pair_rows: list[dict]) -> list[str]:
    lines = [f"Neutral prompt {settings.prompt!r}; DDIM {settings.steps} steps, eta 0, CFG {settings.guidance}; "
             f"loss {settings.content_weight} x (1 - soft IoU of the segmenter's foreground) + the classifier's "
             "cross-entropy for the new attribute. Two budgets per learn seed: the paper's (Adam lr "
             f"{settings.lr}, {settings.iterations} iterations from its init, lambda = 1 for the first 40 % of the "
             f"steps) and the adaptive learner (Adam lr {settings.lr} from the better of that init and the best hard "
             f"switch on the seed, keeping the best schedule seen, until the edit passes in place or {settings.cap} "
             "steps). Generated images: "
             f"seeds 1-{settings.seeds} (learned: seeds 1-{n_learn}); real images: {settings.real_images} test-split "
             "scenes of the neutral prompt, DDIM-inverted without guidance, then null-text inversion at the edit's "
             "CFG, and scored against the real image. Hard switches at k = " + ", ".join(map(str, switches)) + ".",
             "",
             "Seconds per edit: one core; rendering one image per schedule, plus learning (a seed's own schedule, "
             "learned in a batch of seeds, per seed; the adaptive learner's includes its switch sweep) or inversion "
             "(real images). Adam steps: the mean per seed.",
             "",
             "Where each attribute is decided (edit_switch.png: success and content IoU against the switch step; "
             "edit_lambdas.png: the learned lambdas per step):", ""]
    for entry in detail:
        k = entry["decided"]
        where = ("made by no switch, the attribute prompt alone included" if k is None else
                 "made by the attribute prompt alone only" if k == 0 else
                 f"made on at least half the seeds by switches up to k = {k} of {settings.steps}")
        own = entry["own"]
        starts = ", ".join(f"{n} x{c}" for n, c in Counter(own.start).most_common())
        lines.append(f"- **{entry['edit']}**: {where}; the learner started from {starts}, took "
                     f"{np.mean(own.iterations):.1f} Adam steps per seed (cap {settings.cap}), "
                     f"{own.seconds / max(n_learn, 1):.1f} s per seed; the paper's budget "
                     f"{entry['paper'].seconds / max(n_learn, 1):.1f} s per seed.")
    lines += ["", "Verdict per edit (best hard switch = highest content IoU among the switches, attribute alone "
              "included, whose success on the same seeds is at least the schedule's; best working hard switch = "
              "highest content IoU among the switches that make the edit on at least half the seeds, shown in the "
              f"sample grid; made = success >= {MADE[0]} and content IoU >= {MADE[1]} on the learn seeds):", ""]
    for entry in detail:
        transfer = entry["transfer"]
        reach = entry["reachable"]
        made = ("no schedule of the table makes it" if not reach else
                f"{'the learner makes it' if LEARNED in reach else 'the learner does not make it'}; so do "
                + (", ".join(m for m in reach if m != LEARNED) or "no other schedule"))
        lines.append(f"- **{entry['edit']}** ({entry['attribute']!r}; neutral images showing the neutral prompt: "
                     f"{entry['neutral_ok']:.2f}; seed-0 schedule learned in {transfer.seconds:.0f} s from "
                     f"{transfer.start[0]}, {transfer.iterations[0]} Adam steps, "
                     f"{'passed' if transfer.passed[0] else 'did not pass'}): made on the learn seeds: {made}; "
                     f"the learned row is {entry['pareto']}.")
        for method in (LEARNED, PAPER, TRANSFERRED, "real"):
            if method not in entry:
                continue
            success, iou, best, working = entry[method]
            label = "transferred to real images" if method == "real" else method
            if success == 0:
                compare = (f"it never makes the edit (the best working hard switch there: {working[0]}, success "
                           f"{working[1]:.2f}, IoU {working[2]:.3f})")
            elif best is None:
                compare = (f"no hard switch reaches that success (the best working one: {working[0]}, success "
                           f"{working[1]:.2f}, IoU {working[2]:.3f})")
            else:
                verdict = "learned schedule keeps more" if iou > best[2] else "the hard switch keeps as much or more"
                compare = (f"best hard switch at equal success: {best[0]} (success {best[1]:.2f}, IoU {best[2]:.3f}): "
                           f"{verdict}")
            lines.append(f"  - {label}: success {success:.2f}, content IoU {iou:.3f}; {compare}")
    if pair_rows:
        lines += ["", f"Pairs nobody tuned for ({len(pair_rows)}, seeds 1-{settings.pair_seeds} each, every seed its "
                  "own schedule; edit_pairs.csv). Success rate across the pairs of each kind (mean over pairs and "
                  f"seeds) and pairs made (success >= {MADE[0]} and IoU >= {MADE[1]}); best switch = the pair's own "
                  "best working switch, picked on these seeds:", ""]
        summary = []
        for kind in dict.fromkeys(r["kind"] for r in pair_rows):
            mine = [r for r in pair_rows if r["kind"] == kind]
            entry = {"kind": kind, "pairs": len(mine)}
            for label in ("learned", "paper budget", "best switch", "attribute alone"):
                entry[f"{label} success"] = round(float(np.mean([r[f"{label} success"] for r in mine])), 3)
                entry[f"{label} pairs made"] = sum(r[f"{label} success"] >= MADE[0] and r[f"{label} IoU"] >= MADE[1]
                                                   for r in mine)
            summary.append(entry)
        lines += [*markdown_table(summary), "", *markdown_table(pair_rows), ""]
    return lines
