"""table=edit: disentangled attribute editing by a learned per-step prompt mix (Wu et al.,
CVPR 2023) on the shapes world, where every edit can be checked exactly.

One neutral prompt, several edits (cfg.edit.attributes). Per edit, from the same noise
of every seed: the attribute prompt alone, hard switches from the neutral to the attribute
prompt at step k (swept), the paper's initial schedule untrained, a schedule learned on
each seed (the first `learn_seeds`), and the schedule learned on seed 0 transferred to the
other seeds and to real shapes-world images through inversion. Scores (ShapesObjective):
attribute success (classifier), content kept (IoU of the segmenter's foreground masks,
neutral vs edited; the real image itself for inverted edits), shape count kept.
The question: does a learned schedule beat the best hard switch on content kept at equal
success, and does it transfer?
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from orthodiff.data.shapes import SPLIT_SEEDS, make_scene
from orthodiff.editing import Edit, ShapesObjective, default_switches, load_edit_model, paper_schedule, switch_schedule
from orthodiff.eval.image_metrics import parse_caption
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.reproduce.report import labelled_grid, out_dir, write_report

log = logging.getLogger(__name__)
SCORES = ("success", "content_iou", "count_kept")


def real_images(prompt: str, n: int) -> torch.Tensor:
    """n test-split scenes that show exactly `prompt` (one shape: its kind, colour, background)."""
    shapes, background = parse_caption(prompt)
    if len(shapes) != 1:
        raise ValueError(f"edit.prompt={prompt!r}: real images are drawn for one-shape prompts")
    (color, kind), = shapes
    scenes = [make_scene(SPLIT_SEEDS["test"] + k, shapes=(kind,), colors=(color,), backgrounds=(background,))
              for k in range(n)]
    return images_to_tensor(np.stack([s.image for s in scenes]))


def score(objective: ShapesObjective, images: torch.Tensor, reference: torch.Tensor) -> dict[str, np.ndarray]:
    objective.prepare(reference)
    scores = objective.scores(images)
    return {k: scores[k] for k in SCORES}


def _tiles(images: torch.Tensor) -> list[np.ndarray]:
    return list((images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))


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


def table(cfg: DictConfig) -> Path:
    settings = cfg.edit
    torch.manual_seed(0)
    model = load_edit_model(settings.base)
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
        started = time.perf_counter()
        inverter = Edit(model, settings.prompt, settings.prompt, steps, guidance)
        inversion = [], []
        for k in range(0, len(reals), 10):  # the null-text optimisation, 10 images at a time
            z, uncond = inverter.invert(reals[k:k + 10], settings.refine, settings.null_iterations)
            inversion[0].append(z)
            inversion[1].append(uncond)
        inversion = torch.cat(inversion[0]), [torch.cat(u) for u in zip(*inversion[1])]
        invert_seconds = (time.perf_counter() - started) / len(reals)
        log.info("inverted %d real images: %.1f s each", len(reals), invert_seconds)

    rows, detail, grid_rows, grid_labels = [], [], [], []
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
        started = time.perf_counter()
        transfer, history = edit.learn(noise0, objective, settings.iterations, settings.lr, paper_schedule(steps))
        learn_seconds = time.perf_counter() - started
        generated["transferred (seed-0 schedule)"] = _render(edit, noise, transfer)
        # The learn seeds' own schedules, learned in one batch (Adam is elementwise: as if alone).
        started = time.perf_counter()
        own, _ = edit.learn(noise[:n_learn], objective, settings.iterations, settings.lr,
                            paper_schedule(steps)[:, None].repeat(1, n_learn))
        own_seconds = (time.perf_counter() - started) / max(n_learn, 1)
        generated["learned (own schedule)"] = _render(edit, noise[:n_learn], own)
        results = {}
        for method, images in generated.items():
            results[method] = score(objective, images, neutral[:len(images)])
            cost = render_seconds + (own_seconds if method == "learned (own schedule)" else 0)
            rows.append({"edit": name, "images": "generated", "method": method, "seeds": len(images),
                         **{k: round(float(np.nanmean(results[method][k])), 3) for k in SCORES},
                         "seconds per edit": round(cost, 2)})
        verdict = {"edit": name, "attribute": attribute, "neutral_ok": neutral_ok,
                   "learn_seconds_seed0": learn_seconds, "loss_seed0": [round(h["loss"], 3) for h in history],
                   "own_seconds": own_seconds}
        for method, subset in (("learned (own schedule)", slice(0, n_learn)),
                               ("transferred (seed-0 schedule)", slice(None))):
            verdict[method] = (results[method]["success"].mean(), results[method]["content_iou"].mean(),
                               best_switch(results, method, subset), working_switch(results, subset))

        if inversion is not None:
            z, uncond = inversion
            real = {"reconstruction (lambda = 1)": _render(edit, z, torch.ones(steps), uncond),
                    **{m: _render(edit, z, s, uncond) for m, s in schedules.items()},
                    "transferred (seed-0 schedule)": _render(edit, z, transfer, uncond)}
            real_results = {}
            for method, images in real.items():
                real_results[method] = score(objective, images, reals)
                rows.append({"edit": name, "images": "real (inverted)", "method": method, "seeds": len(reals),
                             **{k: round(float(real_results[method][k].mean()), 3) for k in SCORES},
                             "seconds per edit": round(invert_seconds + render_seconds, 2)})
            method = "transferred (seed-0 schedule)"
            verdict["real"] = (real_results[method]["success"].mean(), real_results[method]["content_iou"].mean(),
                               best_switch(real_results, method, slice(None)), working_switch(real_results))
        detail.append(verdict)

        # Sample grid: the first learn seed and the first real image of this edit.
        columns = ["neutral (lambda = 1)", "attribute alone", working_switch(results)[0], "paper init (untrained)",
                   "learned (own schedule)", "transferred (seed-0 schedule)"]
        grid_rows.append([_tiles(generated[c][:1])[0] for c in columns])
        grid_labels.append(f"{name}, seed {seeds[0]}")
        if inversion is not None:
            real_columns = [None, "attribute alone", working_switch(real_results)[0], "paper init (untrained)",
                            "reconstruction (lambda = 1)", "transferred (seed-0 schedule)"]
            grid_rows.append([_tiles(reals[:1])[0] if c is None else _tiles(real[c][:1])[0] for c in real_columns])
            grid_labels.append(f"{name}, real image 0")

    out = out_dir(cfg)
    grid = labelled_grid(grid_rows, grid_labels, ["neutral / real image", "attribute alone",
                                                  "best working hard switch (see notes)", "paper init",
                                                  "learned (own) / reconstruction", "transferred (seed 0)"],
                         out / "edit_samples.png", title=f"neutral: {settings.prompt}")
    return write_report(cfg, "edit", "Attribute editing by a learned prompt mix (Wu et al., CVPR 2023)", rows,
                        notes(settings, detail, n_learn, switches), plots=[grid.name],
                        settings=f"- settings: {OmegaConf.to_container(settings)}")


def notes(settings, detail: list[dict], n_learn: int, switches: list[int]) -> list[str]:
    lines = [f"Neutral prompt {settings.prompt!r}; DDIM {settings.steps} steps, eta 0, CFG {settings.guidance}; "
             f"schedules learned with Adam lr {settings.lr}, {settings.iterations} iterations from the paper's init "
             f"(lambda = 1 for the first 40 % of the steps); loss {settings.content_weight} x (1 - soft IoU of the "
             "segmenter's foreground) + the classifier's cross-entropy for the new attribute. Generated images: "
             f"seeds 1-{settings.seeds} (learned: seeds 1-{n_learn}); real images: {settings.real_images} test-split "
             "scenes of the neutral prompt, DDIM-inverted without guidance, then null-text inversion at the edit's "
             "CFG, and scored against the real image. Hard switches at k = " + ", ".join(map(str, switches)) + ".",
             "",
             "Seconds per edit: one core; rendering one image per schedule, plus learning (a seed's own schedule, "
             "learned in a batch of seeds, per seed) or inversion (real images).",
             "",
             "Verdict per edit (best hard switch = highest content IoU among the switches, attribute alone included, "
             "whose success on the same seeds is at least the schedule's; best working hard switch = highest content "
             "IoU among the switches that make the edit on at least half the seeds, shown in the sample grid):", ""]
    for entry in detail:
        lines.append(f"- **{entry['edit']}** ({entry['attribute']!r}; neutral images showing the neutral prompt: "
                     f"{entry['neutral_ok']:.2f}; seed-0 schedule learned in {entry['learn_seconds_seed0']:.0f} s, "
                     f"loss {entry['loss_seed0'][0]} -> {entry['loss_seed0'][-1]}):")
        for method in ("learned (own schedule)", "transferred (seed-0 schedule)", "real"):
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
    return lines
