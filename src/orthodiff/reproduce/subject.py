"""table=subject: subject-driven generation (DreamBooth protocol, miniature): every method
on every subject, the base model, and the scores of ideal answers as a ceiling; the cost of
a new subject (seconds of training, or of encoding for method=encoder, whose one-off
pretraining is not counted), and for Perfusion the forgetting of its edit applied to every
prompt as the paper's code does (the deployed adapter edits only prompts naming the concept).
Every (method, subject) on every seed of subject.seeds, mean and 95 % CI over them.
`subject.methods=[perfusion,encoder]` restricts the cells. table=subject_lr_search
(lr_search_table) searches each method's lr on the same subjects."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from orthodiff.adapter import AdapterFile, load_adapter
from orthodiff.data.shapes import SPLIT_SEEDS, make_scene
from orthodiff.data.subjects import EVAL_PROMPTS, expected_labels, get_subject, reference_images, subject_images
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.eval.subject_metrics import SubjectScorer
from orthodiff.models.base import load_base_model
from orthodiff.models.tiny_sd import TINY_SD_PATH
from orthodiff.reproduce.cells import cell_config, run_all, train_cell
from orthodiff.reproduce.lr_search import best_lr
from orthodiff.reproduce.report import (
    coft_note,
    encoder_search_settings,
    finite_mean,
    fmt,
    labelled_grid,
    out_dir,
    subject_lr_search_settings,
    subject_settings,
    write_report,
)
from orthodiff.reproduce.stats import mean_ci_text

SUBJECT_SCORES = ("subject_fidelity", "prompt_fidelity", "background_accuracy", "diversity", "no_token_kind",
                  "no_token_color")


def subject_cell(cfg: DictConfig, method: str, subject: str, seed: int, extra=(), tag: str = "",
                 cached_only: bool = False, archived: bool = True) -> dict | None:
    """One subject-driven cell: experiment=dreambooth with the method's own settings
    (conf/task_method/subject_<method>.yaml) and `extra` overrides. The first method also
    validates at step 0: with its adapter still the identity, that is the base model."""
    overrides = ["experiment=dreambooth", f"method={method}", f"data.subject={subject}", f"seed={seed}",
                 f"validate_at_start={method == cfg.subject.methods[0]}", "logger=csv",
                 "callbacks.progress_bar.refresh_rate=0", *cfg.subject.train_overrides, *extra]
    return train_cell(cfg, f"subject-{subject}-{method}{tag}-s{seed}", overrides, cached_only, archived=archived)


def on_embedded_default(cfg: DictConfig) -> bool:
    """The subject cells run the shapes world on the tiny SD (subject.train_overrides may shorten
    runs, not change model or data): the tiny VAE's ceiling and the shapes scorers apply."""
    return not any(o.split("=")[0].lstrip("+~") in ("model", "data") for o in cfg.subject.train_overrides)


def seed_runs(cfg: DictConfig, method: str, subject: str | None = None) -> list[dict] | None:
    """A method's finished subject cells (never trains): over every seed of one subject, or of
    every subject; None while any is missing (table=claims)."""
    subjects = [subject] if subject else list(cfg.subject.subjects)
    runs = [subject_cell(cfg, method, s, seed, cached_only=True) for s in subjects for seed in cfg.subject.seeds]
    return None if any(r is None for r in runs) else runs


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
    for name, batch in (("ideal images", images), ("ideal images through the VAE", vae_round_trip(vae, images))):
        if batch is None:
            continue
        scorer.reset()
        scorer.update(batch, prompts, specs)
        scores[name] = scorer.compute()
    return scores


def vae_round_trip(vae, images: torch.Tensor):
    """(N, 3, H, W) images in [0, 1] encoded (posterior mean) and decoded by `vae` (None: None)."""
    if vae is None:
        return None
    latents = vae.encode(images * 2 - 1).latent_dist.mean
    return ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)


def seconds_per_subject(cost: dict) -> float:
    """What a new subject costs: its training steps (validation excluded), or encoding."""
    steps = cost["timed_steps"] + 1 if cost["timed_steps"] else 0
    return cost["seconds_per_step"] * steps + cost.get("encode_seconds", 0.0)


@torch.no_grad()
def every_prompt_forgetting(run_dir: Path, adapter: AdapterFile, subject: str) -> dict:
    """No-token recognition with the embedding's edit applied to every prompt (Perfusion as
    the paper's code does; the adapter as trained edits only prompts that name the concept):
    the run's validation captions without the token, in its batches and with its seeds."""
    data = cell_config(run_dir).data
    module = load_adapter(adapter)
    module.embedding.every_prompt = True
    token_prompts = len(data.prompts or EVAL_PROMPTS) * data.samples_per_prompt
    texts = [None] * token_prompts + [make_scene(SPLIT_SEEDS["test"] + k).caption for k in range(data.no_token_prompts)]
    size = data.val_batch_size
    images, captions = [], []
    for batch in range(token_prompts // size, -(-len(texts) // size)):
        batch_texts = texts[batch * size:(batch + 1) * size]
        kept = [k for k, text in enumerate(batch_texts) if text is not None]
        generated = module.generate([text or "" for text in batch_texts], seed=module.hparams.val_seed + batch,
                                    progress=False)  # the whole batch: each sample's noise depends on its place
        images.append(generated[kept])
        captions += [batch_texts[k] for k in kept]
    scorer = SubjectScorer(subject_images(subject))
    scorer.update(torch.cat(images), captions, [None] * len(captions))
    return scorer.compute()


def sample_tiles(run_dir: Path, first: bool, size: int, rows: int) -> list[np.ndarray]:
    """The first sample of each of the first `rows` prompts from a run's first or last
    validation grid (samples/step_*.png: one prompt's samples per row)."""
    grids = sorted((Path(run_dir) / "samples").glob("step_*.png"))
    grid = np.asarray(Image.open(grids[0 if first else -1]).convert("RGB"))
    return [grid[k * size:(k + 1) * size, :size] for k in range(rows)]


SCORE_COLUMNS = (*SUBJECT_SCORES, "no_token_kind change", "no_token_kind change, every prompt edited")
COST_COLUMNS = ("trainable params", "adapter KB", "seconds per subject", "minutes", "peak memory MB")


def run_row(run: dict, method: str, subject: str, seed: int, base: dict, embedded: bool) -> dict:
    """One finished cell's scores, its forgetting against the base model of its seed, and its costs."""
    kind = base.get("no_token_kind", math.nan)
    extra = {}
    adapter = AdapterFile.read(Path(run["run_dir"]) / "adapter.safetensors")
    if embedded and adapter.embedding is not None and adapter.embedding.every_prompt_variant:
        extra["no_token_kind change, every prompt edited"] = (
            every_prompt_forgetting(run["run_dir"], adapter, subject)["no_token_kind"] - kind)
    return {"method": method, "subject": subject, "seed": seed, **run["final"],
            "no_token_kind change": run["final"].get("no_token_kind", math.nan) - kind, **extra,
            "trainable params": run["cost"]["trainable_parameters"],
            "adapter KB": round((Path(run["run_dir"]) / "adapter.safetensors").stat().st_size / 1024, 1),
            "seconds per subject": round(seconds_per_subject(run["cost"]), 2),
            "minutes": round(run["wall_seconds"] / 60, 2),
            "s/step": round(run["cost"]["seconds_per_step"], 3),
            "peak memory MB": run["cost"]["peak_memory_mb"]}


def summary(rows: list[dict], label: dict) -> dict:
    """`label` and, for each column the rows hold, the mean and 95 % CI of the scores over the
    rows (seeds, or every (subject, seed) run), the mean of the costs."""
    row = dict(label, runs=len(rows))
    for key in (*SCORE_COLUMNS, *COST_COLUMNS):
        values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            row[key] = mean_ci_text(values, 4) if key in SCORE_COLUMNS else fmt(float(np.mean(values)))
    return row


def table(cfg: DictConfig) -> Path:
    settings = cfg.subject
    seeds = list(settings.seeds)
    cells = [(m, s, seed) for s in settings.subjects for m in settings.methods for seed in seeds]
    runs = dict(zip(cells, run_all(cfg, cells, "subject", cell=subject_cell, archived=False)))
    embedded = on_embedded_default(cfg)
    vae = load_base_model(str(TINY_SD_PATH)).vae.eval() if embedded else None
    ceilings = {s: subject_ceiling(s, vae) for s in settings.subjects} if embedded else {}
    first = settings.methods[0]
    base_name = f"base model (step 0 of {first})"
    per_run = []  # one row per (method, subject, seed); the base model's from the first method's step 0
    for subject in settings.subjects:
        for seed in seeds:
            base = runs[(first, subject, seed)]["step0"]
            per_run.append({"method": base_name, "subject": subject, "seed": seed, **base})
            per_run += [run_row(runs[(m, subject, seed)], m, subject, seed, base, embedded)
                        for m in settings.methods]
        per_run += [{"method": name, "subject": subject, **scores} for name, scores in ceilings.get(subject, {}).items()]
    names = list(dict.fromkeys(row["method"] for row in per_run))
    detail = [summary([r for r in per_run if r["method"] == m and r["subject"] == s], {"method": m, "subject": s})
              for s in settings.subjects for m in names]
    rows = [summary([r for r in per_run if r["method"] == m], {"method": m}) for m in names]
    out = out_dir(cfg)
    plots = []
    size = 64
    for subject in settings.subjects:
        if not embedded:
            break
        prompts = len(EVAL_PROMPTS)
        training = [np.asarray(Image.fromarray(im).resize((size, size))) for im in subject_images(subject, 4)]
        lines = [training + [np.full((size, size, 3), 255, np.uint8)] * (prompts - len(training)),
                 sample_tiles(runs[(first, subject, seeds[0])]["run_dir"], True, size, prompts)]
        lines += [sample_tiles(runs[(m, subject, seeds[0])]["run_dir"], False, size, prompts) for m in settings.methods]
        columns = [entry["prompt"].format(token="sks", cls=get_subject(subject).class_word) for entry in EVAL_PROMPTS]
        labelled_grid(lines, ["training images", f"base model (step 0 of {first})", *settings.methods], columns,
                      out / f"subject_samples_{subject}.png", title=subject)
        plots.append(f"subject_samples_{subject}.png")
    notes = [f"Scores: mean [95 % CI] over every (subject, seed) run: subjects {list(settings.subjects)}, seeds "
             f"{seeds} ('runs'); subject_detail.csv has the same over seeds per subject, and subject_runs.csv every "
             "run. Costs: means. Each method trains with its own settings (conf/task_method/subject_<method>.yaml); "
             "minutes = the whole train.py run (validation included; the first method's run also validates "
             f"the base model at step 0) with {cfg.jobs} cell(s) at a time. subject_fidelity: mean centred "
             "cosine of the classifier's features between token-prompt samples and the subject's training images; "
             "prompt_fidelity: share of what "
             "each prompt asks (background, recolouring, extra shape) that the classifier finds; no_token_*: "
             "prompted kind/colour recognition on 32 ordinary captions (forgetting: compare with the base row). "
             "The 'ideal images' rows score perfect answers, as rendered and after the tiny VAE's round trip: "
             "the ceiling for any model decoding through that VAE.",
             "seconds per subject: the training steps (s/step x steps, validation excluded), or for "
             "method=encoder the encoding of the subject's images (its one-off pretraining, experiment="
             "subject_encoder, is not counted). Perfusion edits only the prompts that name its concept, so its "
             "no_token change is the base model's by construction; 'every prompt edited' applies its edit to "
             "the no-token prompts too, as the paper's code does.",
             f"Sample grids (seed {seeds[0]}): row 1 the training images, row 2 the base model, then one row per "
             f"method in the order {list(settings.methods)} (labelled); columns are the evaluation prompts (subjects.EVAL_PROMPTS, "
             "first sample each, same seeds for every method).",
             *coft_note([runs[(m, settings.subjects[0], seeds[0])] for m in settings.methods])]
    how = subject_settings(cfg)
    write_report(cfg, "subject_runs", "Subject-driven generation, every run", per_run, [], settings=how)
    write_report(cfg, "subject_detail", "Subject-driven generation, per subject", detail, [], settings=how)
    return write_report(cfg, "subject", "Subject-driven generation (DreamBooth protocol, miniature)", rows, notes, plots,
                        settings=how)


def lr_search_table(cfg: DictConfig) -> Path:
    """table=subject_lr_search: module.optimizer.lr at every value of subject.lrs for every method
    of subject.lr_search_methods, on every subject, at the first seed; per method the mean
    subject fidelity over subjects at each lr (prompt fidelity and forgetting beside it) and the
    best. The choice is committed by a person, in conf/task_method/subject_<method>.yaml."""
    settings = cfg.subject
    seed, lrs = settings.seeds[0], [float(lr) for lr in settings.lrs]
    cells = [(m, s, seed, [f"module.optimizer.lr={lr}"], f"-lr{lr:g}")
             for m in settings.lr_search_methods for lr in lrs for s in settings.subjects]
    runs = iter(run_all(cfg, cells, "subject_lr_search", cell=subject_cell))
    rows = []
    for method in settings.lr_search_methods:
        scores = {}
        for lr in lrs:
            finals = [next(runs).get("final", {}) for _ in settings.subjects]
            scores[lr] = {key: finite_mean([f.get(key, math.nan) for f in finals])
                          for key in ("subject_fidelity", "prompt_fidelity", "no_token_kind")}
        fidelity = {lr: v["subject_fidelity"] for lr, v in scores.items()}
        best = best_lr(fidelity, higher=True)
        rows.append({"method": method, **{f"lr {lr:g}": fmt(v) for lr, v in fidelity.items()},
                     "best lr": "none (every run diverged)" if best is None else f"{best:g}",
                     "best subject_fidelity": fidelity.get(best, math.nan),
                     "its prompt_fidelity": scores[best]["prompt_fidelity"] if best else math.nan,
                     "its no_token_kind": scores[best]["no_token_kind"] if best else math.nan})
    notes = [f"Each 'lr' column: subject_fidelity at the last step, the mean over subjects {list(settings.subjects)} "
             f"(seed {seed}); n/a: every subject's run diverged. The best lr maximises it; prompt fidelity and "
             "no-token kind recognition (forgetting) at that lr stand beside it, so a choice that buys fidelity "
             "with forgetting is visible.",
             "To apply: commit each method's best as module.optimizer.lr in conf/task_method/subject_<method>.yaml "
             "(a person does this after the run), then run table=subject into a fresh runs_dir (cells are keyed on "
             "their overrides, not on config files).",
             "encoder is not searched: at method.tune_steps=0 it trains nothing at dreambooth time; its one-off "
             "pretraining (experiment=subject_encoder) is tuned apart."]
    return write_report(cfg, "subject_lr_search", "Subject-driven learning-rate search (equal budget)", rows, notes,
                        settings=subject_lr_search_settings(cfg))


def encoder_pretraining(cfg: DictConfig, name: str, overrides: list[str], archived: bool = False) -> dict:
    """One pretraining of the subject encoder (experiment=subject_encoder) with `overrides`, a cell
    of its own; its run directory holds the encoder it wrote (subject_encoder/).
    encoder_search.pretrain_overrides come last: they apply to every variant (a test's short run)."""
    return train_cell(cfg, f"subject-encoder-pretrain-{name}",
                      ["experiment=subject_encoder", "logger=csv", "callbacks.progress_bar.refresh_rate=0",
                       *overrides, *cfg.encoder_search.pretrain_overrides], archived=archived)


def encoder_search_table(cfg: DictConfig) -> Path:
    """table=encoder_search: the subject encoder retuned on the current base model. Each of
    encoder_search.variants pretrains an encoder (experiment=subject_encoder with its overrides);
    each is scored on every subject at the first seed with each of encoder_search.tune_steps
    (method.tune_steps: E4T-style steps of its word at dreambooth time), against the reference
    method's mean subject fidelity (the target share of it) and the base model on each subject."""
    search, settings = cfg.encoder_search, cfg.subject
    seed, subjects = settings.seeds[0], list(settings.subjects)
    pretrained = dict(zip(search.variants, run_all(cfg, [(name, list(o)) for name, o in search.variants.items()],
                                                   "encoder pretraining", cell=encoder_pretraining,
                                                   archived=False)))
    first = settings.methods[0]  # its step 0 is the base model (table=subject's convention)
    references = list(dict.fromkeys([first, search.reference]))  # their plain subject cells
    encoders = [(name, t) for name in pretrained for t in search.tune_steps]
    cells = [(m, s, seed) for m in references for s in subjects] + [
        ("encoder", s, seed, [f"embedding.encoder={Path(pretrained[name]['run_dir']) / 'subject_encoder'}",
                              f"method.tune_steps={t}"], f"-{name}-tune{t}") for name, t in encoders for s in subjects]
    runs = iter(run_all(cfg, cells, "encoder search", cell=subject_cell))
    found = {arm: {s: next(runs) for s in subjects} for arm in [*references, *encoders]}
    base = {s: found[first][s]["step0"]["subject_fidelity"] for s in subjects}
    reference = finite_mean([found[search.reference][s]["final"].get("subject_fidelity", math.nan) for s in subjects])
    share = f"share of {search.reference}'s"
    rows = []
    for name, t in encoders:
        finals = {s: run["final"] for s, run in found[name, t].items()}
        fidelity = finite_mean([f.get("subject_fidelity", math.nan) for f in finals.values()])
        rows.append({"variant": name, "tune steps": t, "subject_fidelity": fidelity,
                     share: round(fidelity / reference, 3),
                     **{f"{s} (base {base[s]:.3f})": fmt(finals[s].get("subject_fidelity", math.nan)) for s in subjects},
                     "above the base on every subject": all(finals[s].get("subject_fidelity", -1) > base[s]
                                                             for s in subjects),
                     "prompt_fidelity": finite_mean([f.get("prompt_fidelity", math.nan) for f in finals.values()]),
                     "no_token_kind": finite_mean([f.get("no_token_kind", math.nan) for f in finals.values()]),
                     "pretraining minutes": round(pretrained[name]["wall_seconds"] / 60, 1)})
    met = [f"{r['variant']} (tune steps {r['tune steps']})" for r in rows
           if r[share] >= search.target and r["above the base on every subject"]]
    best = max(rows, key=lambda r: r["subject_fidelity"])
    below = "" if best["above the base on every subject"] else ", below the base model on some subject"
    verdict = (f"Met by {', '.join(met)}." if met else
               f"Not met: the best is {best['variant']} with {best['tune steps']} tune steps, {best[share]:.0%} of "
               f"{search.reference}'s mean subject fidelity{below}.")
    notes = [f"Each variant pretrains the encoder once (experiment=subject_encoder plus its overrides: "
             f"{dict((k, list(v)) for k, v in search.variants.items())}; encoder_search.pretrain_overrides "
             f"{list(search.pretrain_overrides)}), then encodes each subject (seed {seed}) and, with tune steps, "
             "optimises the word as Textual Inversion does from there (conf/task_method/subject_encoder.yaml). "
             f"subject_fidelity: the mean over subjects {subjects}; {search.reference}: its subject cells at its own "
             f"settings, mean {reference:.4f}; base: step 0 of {first}'s cell on that subject.",
             f"Target: at least {search.target:.0%} of {search.reference}'s mean subject fidelity and above the base "
             f"model on every subject. {verdict}",
             "To apply: copy the chosen run's subject_encoder/ to assets/subject-encoder and its tune steps to "
             "conf/method/encoder.yaml (a person does this after the run)."]
    return write_report(cfg, "encoder_search", "The subject encoder retuned", rows, notes,
                        settings=encoder_search_settings(cfg))
