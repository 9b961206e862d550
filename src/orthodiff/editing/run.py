"""edit.py's work: learn a mixing schedule for one edit (or apply a learned one, or edit
a real image through inversion), score it against the baselines from the same noise,
and write the schedule, the images and edit.json."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orthodiff.data.readers import read_image
from orthodiff.editing.editor import Edit, load_edit_model
from orthodiff.editing.objectives import build_objective
from orthodiff.editing.schedule import (
    check_schedule,
    default_switches,
    load_schedule,
    paper_schedule,
    save_schedule,
    switch_schedule,
)
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.files import atomic_path

log = logging.getLogger(__name__)
PAPER_STEPS, PAPER_GUIDANCE, PAPER_ITERATIONS = 50, 7.5, 10
ADAPTIVE_CAP = 40  # Adam steps, each through the whole chain (tiny SD v3, 20 steps: 13-19 s on a shared core)


@dataclass
class EditConfig:
    prompt: str                       # the neutral prompt: what the image shows
    attribute: str                    # the same prompt with the attribute changed
    seed: int = 0                     # x_T; unused with image=
    out: str | None = None            # None: outputs/edit/<time>
    schedule: str | None = None       # apply this learned schedule.safetensors (no optimisation)
    image: str | None = None          # edit this image (inverted with the neutral prompt) instead of a sample
    budget: str = "adaptive"          # adaptive: from the best of init and switches until the edit passes; or paper
    iterations: int | None = None     # Adam steps; None: at most 40 (adaptive), the paper's 10 (paper)
    lr: float = 0.05                  # the paper's
    steps: int | None = None          # None: the schedule file's, else 50 (the paper's)
    guidance: float | None = None     # None: the schedule file's, else 7.5 (the paper's)
    init: float = 0.4                 # initial schedule: lambda = 1 for this share of the steps, then 0 (paper: 20/50)
    base: str | None = None           # None: the adapter's base model, else the tiny SD
    adapter: str | None = None        # an orthodiff adapter (OFT/COFT, LoRA, subject); None: the base model
    clip_model: str | None = None     # real models: a CLIP folder for the directional loss ...
    perceptual: str | None = None     # ... and VGG-16 weights (torchvision layout) for the content loss
    lpips: str | None = None          # LPIPS (VGG) linear weights: LPIPS instead of the paper's VGG loss
    content: str = "masks"            # shapes world: masks (segmenter) or features (classifier)
    content_weight: float | None = None  # None: 1.0 shapes world, 0.05 CLIP + VGG (the paper's)
    switches: str = "auto"            # hard-switch steps to compare (and to start from), "2,4,6"; auto: k=1 and
                                      # every tenth; none
    pass_cosine: float | None = None  # CLIP: the directional cosine that counts as made (None: learn to the cap)
    refine: int = 5                   # image=: fixed-point rounds per DDIM inversion step ...
    null_iterations: int = 10         # ... and null-text optimization steps per sampling step
    checkpoint: bool = True           # recompute sampling steps in the backward pass (SD at 512 px on one GPU)
    device: str = "auto"              # auto: cuda when available


def parse_switches(text: str, steps: int) -> list[int]:
    if text == "auto":
        return default_switches(steps)
    if text.lower() in ("", "none"):
        return []
    try:
        switches = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise ValueError(f"switches={text!r}: expected auto, none or step numbers such as 2,4,6") from None
    if any(not 0 < k < steps for k in switches):
        raise ValueError(f"switches={text!r}: switch steps must lie in 1..{steps - 1}")
    return switches


def read_reference(path: str, size: int) -> torch.Tensor:
    """image= as (1, 3, size, size) in [0, 1], decoded as the datasets decode theirs (read_image);
    resized (bicubic) when the file has another size."""
    try:
        image = read_image(path, what="image")
    except FileNotFoundError:
        raise FileNotFoundError(f"image={path}: no such file") from None
    if image.shape[:2] != (size, size):
        log.warning("image %s is %dx%d; the model draws %dx%d: resized", path, image.shape[1], image.shape[0],
                    size, size)
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


def save_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


@torch.no_grad()
def render_all(edit: Edit, noise: torch.Tensor, schedules: dict[str, torch.Tensor], uncond=None,
               batch_size: int = 4) -> dict[str, torch.Tensor]:
    """{name: images (1, 3, H, W)} for one noise under several schedules, a few per batch."""
    names, images = list(schedules), []
    for start in range(0, len(names), batch_size):
        chunk = names[start:start + batch_size]
        lambdas = torch.stack([schedules[n] for n in chunk], 1)
        images.append(edit.render(noise.expand(len(chunk), -1, -1, -1), lambdas, uncond))
    return dict(zip(names, torch.cat(images).split(1)))


def _means(scores: dict[str, np.ndarray]) -> dict[str, float | None]:
    return {k: (None if np.isnan(v).all() else round(float(np.nanmean(v)), 4)) for k, v in scores.items()}


def edit(cfg: EditConfig) -> Path:
    started = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    for name in ("prompt", "attribute"):
        if not getattr(cfg, name).strip():
            raise ValueError(f"{name}= is empty")
    if cfg.prompt.strip() == cfg.attribute.strip():
        raise ValueError("attribute= is the prompt itself: nothing to edit; give the prompt with one attribute changed")
    if cfg.budget not in ("adaptive", "paper"):
        raise ValueError(f"budget={cfg.budget!r}: choose adaptive or paper")
    learned_from = None
    if cfg.schedule:  # fail on a foreign file before loading any model
        learned_from, file_meta = load_schedule(cfg.schedule)
    iterations = cfg.iterations if cfg.iterations is not None else (
        ADAPTIVE_CAP if cfg.budget == "adaptive" else PAPER_ITERATIONS)
    if iterations < 0:
        raise ValueError(f"iterations={iterations}: must be >= 0")
    model = load_edit_model(cfg.base, cfg.adapter, device)
    steps = cfg.steps or (int(file_meta["steps"]) if cfg.schedule else PAPER_STEPS)
    guidance = cfg.guidance if cfg.guidance is not None else (
        float(file_meta["guidance"]) if cfg.schedule else PAPER_GUIDANCE)
    if cfg.schedule:
        check_schedule(cfg.schedule, file_meta, model.digest, model.name, steps)
        for key, value in (("prompt", cfg.prompt), ("attribute", cfg.attribute), ("guidance", str(guidance))):
            if file_meta.get(key) != value:
                log.warning("the schedule was learned with %s=%r; this edit uses %r", key, file_meta.get(key), value)
    switches = parse_switches(cfg.switches, steps)
    objective = build_objective(cfg.prompt, cfg.attribute, cfg.clip_model, cfg.perceptual, cfg.lpips, cfg.content,
                                cfg.content_weight, device=device, resolution=model.resolution,
                                pass_cosine=cfg.pass_cosine)
    if len(getattr(objective, "changes", ())) > 1:
        log.warning("attribute= changes %d things at once (%s): success asks for all of them; edit.json scores "
                    "each alone ('reads ...')", len(objective.changes), "; ".join(c.label for c in objective.changes))
    runner = Edit(model, cfg.prompt, cfg.attribute, steps, guidance, cfg.checkpoint)
    inverted, uncond = cfg.image is not None, None
    if inverted:
        reference = read_reference(cfg.image, model.resolution).to(device)
        noise, uncond = runner.invert(reference, cfg.refine, cfg.null_iterations)
    else:
        noise = model.noise(cfg.seed)
        with torch.no_grad():
            reference = runner.render(noise, torch.ones(steps))
    learned = None
    if learned_from is None:
        learned = runner.learn(noise, objective, iterations, cfg.lr, paper_schedule(steps, cfg.init), uncond,
                               reference, adaptive=cfg.budget == "adaptive", switches=switches)
        lambdas = learned.lambdas
    else:
        lambdas = learned_from
        objective.prepare(reference)

    schedules = {"edited": lambdas, "neutral": torch.ones(steps), "attribute_alone": torch.zeros(steps),
                 "paper_init": paper_schedule(steps, cfg.init), **{f"switch_{k}": switch_schedule(steps, k)
                                                                   for k in switches}}
    images = render_all(runner, noise, schedules, uncond)
    scores = {name: _means(objective.scores(image)) for name, image in images.items()}

    out = Path(cfg.out or f"outputs/edit/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    out.mkdir(parents=True, exist_ok=True)
    record_meta = {"base_model": model.base_model, "adapter": model.adapter or "", "model_digest": model.digest,
                   "sampler": "ddim", "eta": "0", "guidance": str(guidance), "prompt": cfg.prompt,
                   "attribute": cfg.attribute, "objective": objective.describe(),
                   "source": f"image {cfg.image} (inverted)" if inverted else f"seed {cfg.seed}"}
    if learned_from is None:
        save_schedule(out / "schedule.safetensors", lambdas, {**record_meta, "budget": cfg.budget,
                                                              "iterations": str(learned.iterations[0]),
                                                              "lr": str(cfg.lr), "init": str(cfg.init),
                                                              "start": learned.start[0]})
    first = to_uint8(reference)[0]
    save_png(out / "neutral.png", first)
    save_png(out / "edited.png", to_uint8(images["edited"])[0])
    if inverted:
        save_png(out / "reconstruction.png", to_uint8(images["neutral"])[0])
    save_png(out / "grid.png", np.concatenate([first, to_uint8(images["attribute_alone"])[0],
                                               to_uint8(images["edited"])[0]], 1))
    record = {"command": "python edit.py " + shlex.join(sys.argv[1:]), "config": asdict(cfg), **record_meta,
              "steps": steps, "device": device,
              "schedule": {"source": cfg.schedule or "learned", "lambda": [round(float(v), 5) for v in lambdas]},
              "learner": None if learned is None else {
                  "budget": cfg.budget, "iterations": iterations,  # the cap, with the adaptive budget
                  "start": learned.start[0], "iterations_taken": learned.iterations[0],
                  "loss": round(learned.loss[0], 5), "passed": learned.passed[0]},
              "iterations": [] if learned is None else learned.history, "scores": scores,
              "seconds": {"learn": None if learned is None else round(learned.seconds, 2),
                          "total": round(time.perf_counter() - started, 2)},
              "grid": "neutral (the input image with image=) | attribute prompt alone | edited"}
    with atomic_path(out / "edit.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    edited = scores["edited"]
    summary = ", ".join(f"{k} {v}" for k, v in edited.items() if v is not None)
    how = "applied schedule" if learned is None else (
        f"learned schedule ({cfg.budget} budget: from {learned.start[0]}, {learned.iterations[0]} Adam steps, "
        f"{'passed' if learned.passed[0] else 'did not pass'}, {learned.seconds:.1f} s)")
    print(f"edit: {summary}; {how}, images and edit.json in {out}")
    return out
