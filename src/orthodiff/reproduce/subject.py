"""table=subject: subject-driven generation (DreamBooth protocol, miniature): every method
on every subject, the base model, and the scores of ideal answers as a ceiling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from orthodiff.data.subjects import EVAL_PROMPTS, expected_labels, reference_images, subject_images
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.eval.subject_metrics import SubjectScorer
from orthodiff.models.base import load_base_model
from orthodiff.models.tiny_sd import TINY_SD_PATH
from orthodiff.reproduce.cells import run_all, train_cell
from orthodiff.reproduce.report import fmt, mean_std, out_dir, subject_settings, write_report

SUBJECT_SCORES = ("subject_fidelity", "prompt_fidelity", "background_accuracy", "diversity", "no_token_kind",
                  "no_token_color")


def subject_cell(cfg: DictConfig, method: str, subject: str) -> dict:
    """One subject-driven cell: experiment=dreambooth with the method's own settings
    (conf/task_method/subject_<method>.yaml). The first method also validates at step 0:
    with its adapter still the identity, that is the base model."""
    overrides = ["experiment=dreambooth", f"method={method}", f"data.subject={subject}", f"seed={cfg.subject.seed}",
                 f"validate_at_start={method == cfg.subject.methods[0]}", "logger=csv",
                 "callbacks.progress_bar.refresh_rate=0", *cfg.subject.train_overrides]
    return train_cell(cfg, f"subject-{subject}-{method}", overrides)


@torch.no_grad()
def subject_ceiling(subject: str, vae=None) -> dict:
    """The scores of ideal answers (subjects.reference_images for every evaluation prompt),
    as rendered and after the tiny VAE's round trip (what any model decoding through that
    VAE can reach at best)."""
    scorer = SubjectScorer(subject_images(subject))
    images, specs = [], []
    for k, entry in enumerate(EVAL_PROMPTS):
        images += reference_images(subject, entry, n=4, seed=k)
        specs += [expected_labels(subject, entry)] * 4
    images = images_to_tensor(np.stack(images))
    prompts = [str(spec) for spec in specs]  # diversity groups samples by prompt
    scores = {}
    for name, batch in (("ideal images", images), ("ideal images through the VAE", _vae_round_trip(vae, images))):
        if batch is None:
            continue
        scorer.reset()
        scorer.update(batch, prompts, specs)
        scores[name] = scorer.compute()
    return scores


def _vae_round_trip(vae, images: torch.Tensor):
    if vae is None:
        return None
    latents = vae.encode(images * 2 - 1).latent_dist.mean
    return ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)


def sample_tiles(run_dir: Path, first: bool, size: int, rows: int) -> list[np.ndarray]:
    """The first sample of each of the first `rows` prompts from a run's first or last
    validation grid (samples/step_*.png: one prompt's samples per row)."""
    grids = sorted((Path(run_dir) / "samples").glob("step_*.png"))
    grid = np.asarray(Image.open(grids[0 if first else -1]).convert("RGB"))
    return [grid[k * size:(k + 1) * size, :size] for k in range(rows)]


def table(cfg: DictConfig) -> Path:
    settings = cfg.subject
    cells = [(m, s) for s in settings.subjects for m in settings.methods]
    runs = dict(zip(cells, run_all(cfg, cells, "subject", cell=subject_cell)))
    # The shapes world on the tiny SD (the overrides may shorten runs, not change model or data).
    embedded = not any(o.split("=")[0].lstrip("+~") in ("model", "data") for o in settings.train_overrides)
    vae = load_base_model(str(TINY_SD_PATH)).vae.eval() if embedded else None
    ceilings = {s: subject_ceiling(s, vae) for s in settings.subjects} if embedded else {}
    first = settings.methods[0]
    detail = []
    for subject in settings.subjects:
        base = runs[(first, subject)]["step0"]
        detail.append({"method": f"base model (step 0 of {first})", "subject": subject, **base})
        for method in settings.methods:
            run = runs[(method, subject)]
            detail.append({"method": method, "subject": subject, **run["final"],
                           "no_token_kind change": run["final"].get("no_token_kind", math.nan) - base.get("no_token_kind", math.nan),
                           "trainable params": run["cost"]["trainable_parameters"],
                           "adapter KB": round((Path(run["run_dir"]) / "adapter.safetensors").stat().st_size / 1024, 1),
                           "minutes": round(run["wall_seconds"] / 60, 2), "s/step": round(run["cost"]["seconds_per_step"], 3),
                           "peak memory MB": run["cost"]["peak_memory_mb"]})
        for name, scores in ceilings.get(subject, {}).items():
            detail.append({"method": name, "subject": subject, **scores})
    rows = []
    for method in dict.fromkeys(row["method"] for row in detail):
        mine = [row for row in detail if row["method"] == method]
        row = {"method": method}
        for key in [*SUBJECT_SCORES, "no_token_kind change", "trainable params", "adapter KB", "minutes",
                    "peak memory MB"]:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = mean_std(values) if key in SUBJECT_SCORES or key.endswith("change") else fmt(float(np.mean(values)))
        rows.append(row)
    out = out_dir(cfg)
    plots = []
    size = 64
    for subject in settings.subjects:
        if not embedded:
            break
        prompts = len(EVAL_PROMPTS)
        training = [np.asarray(Image.fromarray(im).resize((size, size))) for im in subject_images(subject, 4)]
        lines = [training + [np.full((size, size, 3), 255, np.uint8)] * (prompts - len(training)),
                 sample_tiles(runs[(first, subject)]["run_dir"], True, size, prompts)]
        lines += [sample_tiles(runs[(m, subject)]["run_dir"], False, size, prompts) for m in settings.methods]
        grid = np.concatenate([np.concatenate(line, axis=1) for line in lines], axis=0)
        Image.fromarray(grid).save(out / f"subject_samples_{subject}.png")
        plots.append(f"subject_samples_{subject}.png")
    notes = [f"Mean ± std over subjects {list(settings.subjects)} (seed {settings.seed}); per-subject rows in "
             "subject_detail.csv. Each method trains with its own settings (conf/task_method/subject_<method>.yaml); "
             "minutes = the whole train.py run (validation included; the first method's run also validates "
             f"the base model at step 0) with {cfg.jobs} cell(s) at a time. subject_fidelity: mean centred "
             "cosine of the classifier's features between token-prompt samples and the subject's training images; prompt_fidelity: share of what "
             "each prompt asks (background, recolouring, extra shape) that the classifier finds; no_token_*: "
             "prompted kind/colour recognition on 32 ordinary captions (forgetting: compare with the base row). "
             "The 'ideal images' rows score perfect answers, as rendered and after the tiny VAE's round trip: "
             "the ceiling for any model decoding through that VAE.",
             "Sample grids: row 1 the training images, row 2 the base model, then one row per method in the "
             f"order {list(settings.methods)}; columns are the evaluation prompts (subjects.EVAL_PROMPTS, "
             "first sample each, same seeds for every method)."]
    how = subject_settings(cfg)
    write_report(cfg, "subject_detail", "Subject-driven generation, per subject", detail, [], settings=how)
    return write_report(cfg, "subject", "Subject-driven generation (DreamBooth protocol, miniature)", rows, notes, plots,
                        settings=how)
