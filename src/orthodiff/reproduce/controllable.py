"""table=controllable: every method on every control over every seed, its headline figure,
FID and cost; and three reference rows per control, measured like the cells (their
validation scenes, scorer and VAE):

    real images                  the ceiling by definition
    real images through the VAE  the ceiling of any method that decodes through this VAE
    base model (step 0 of M)     no control: cfg.methods[0]'s cells validated at step 0, where
                                 its adapter is the identity and its encoder outputs zeros
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from orthodiff.data.datasets import collate
from orthodiff.eval.control_metrics import ControlScorer, headline_metric
from orthodiff.models.base import load_base_model
from orthodiff.reproduce import paper, stats
from orthodiff.reproduce.cells import cell_config, run_all, run_eval
from orthodiff.reproduce.report import coft_note, control_settings, final_figure, mean_std, write_report
from orthodiff.reproduce.subject import vae_round_trip

REAL, THROUGH_VAE = "real images", "real images through the VAE"


def cells(cfg: DictConfig) -> list[tuple]:
    return [(m, c, s) for c in cfg.controls for m in cfg.methods for s in cfg.seeds]


def equivalence_margin_of(cfg: DictConfig, runs: list[dict], key: str) -> float:
    """The equivalence margin of a table of runs on one control (reproduce.stats): a fraction of
    the range from the base model (the runs' step-0 figure, mean) to the ceiling of any method
    decoding through this VAE (the real validation images through it, the runs' own scenes)."""
    base = statistics.fmean(r["step0"][key] for r in runs if key in r.get("step0", {}))
    ceiling = reference_scores(runs[0]["run_dir"])[THROUGH_VAE][key]
    return stats.equivalence_margin(base, ceiling)


def base_label(cfg: DictConfig) -> str:
    return f"base model (step 0 of {cfg.methods[0]})"


@torch.no_grad()
def reference_scores(run_dir: str | Path) -> dict[str, dict]:
    """The real validation images, as they are and through the VAE, scored as the run's
    validation scored its samples: the run's own validation scenes (its data.val), base
    model and scorer (built as ControlTask.build_scorer builds it)."""
    config = cell_config(run_dir)
    dataset = instantiate(config.data.val)
    scorer = ControlScorer(config.module.control, config.module.evaluator, getattr(dataset, "num_classes", None),
                           getattr(dataset, "ignore_index", None))
    vae = load_base_model(config.module.pretrained, original_config=config.module.original_config).vae.eval()
    loader = DataLoader(dataset, config.data.val_batch_size or config.data.batch_size, collate_fn=collate)
    scores = {}
    for name, transform in ((REAL, lambda images: images), (THROUGH_VAE, lambda images: vae_round_trip(vae, images))):
        scorer.reset()
        for batch in loader:
            scorer.update(transform(((batch["pixel_values"] + 1) / 2).clamp(0, 1)), batch)
        scores[name] = scorer.compute()
    return scores


def table(cfg: DictConfig) -> Path:
    first_control, first_seed = cfg.controls[0], cfg.seeds[0]
    runs = dict(zip(cells(cfg), run_all(cfg, cells(cfg), "controllable")))
    rows = []
    for method in cfg.methods:
        row = {"method": method}
        for control in cfg.controls:
            key = headline_metric(control)
            row[f"{control} {key}"] = mean_std([final_figure(runs[(method, control, s)], key) for s in cfg.seeds])
        first = runs[(method, first_control, first_seed)]
        if "diverged" not in first:  # a diverged run left no adapter to score
            quality = run_eval(cfg, first)["image_quality"]
            row[f"FID ({first_control}, {quality['fid_extractor']} features)"] = round(quality["fid"], 2)
        cost = first.get("cost", {})
        row["trainable params"] = cost.get("trainable_parameters", "n/a")
        # The median over the seeds: one cell slowed by other work on the machine does not move it.
        timed = [runs[(method, first_control, s)].get("cost", {}).get("seconds_per_step") for s in cfg.seeds]
        timed = [t for t in timed if t is not None]
        row["s/step"] = round(statistics.median(timed), 3) if timed else "n/a"
        row["peak memory MB"] = cost.get("peak_memory_mb", "n/a")
        rows.append(row)
    references = {REAL: {"method": REAL}, THROUGH_VAE: {"method": THROUGH_VAE}, "base": {"method": base_label(cfg)}}
    for control in cfg.controls:
        key = headline_metric(control)
        column = f"{control} {key}"
        base_runs = [runs[(cfg.methods[0], control, s)] for s in cfg.seeds]
        references["base"][column] = mean_std([float(run.get("step0", {}).get(key, math.nan)) for run in base_runs])
        for name, scores in reference_scores(base_runs[0]["run_dir"]).items():
            references[name][column] = mean_std([scores[key]])
    rows += references.values()
    steps = f"{cfg.schedule.steps} steps on {first_control}, {cfg.schedule.other_steps} on the others"
    published = "; ".join(f"{control} {paper.TABLE2_METRIC[control]}: " + ", ".join(f"{m} {v}" for m, v in figures.items())
                          for control, figures in paper.TABLE2.items())
    notes = [f"Final validation on the first {cfg.schedule.val_items} validation scenes after {steps} (batch "
             f"{cfg.schedule.batch_size}); mean ± std over seeds {list(cfg.seeds)}. FID/KID from eval.py on "
             f"{cfg.eval_samples} test scenes of {first_control}, seed {first_seed}. s/step: training steps only, the median "
             f"over the {first_control} cells' seeds. Peak memory is the process's peak "
             "resident memory on CPU (base model included) or CUDA's allocator peak on GPU. Each method trains at its "
             "own method.tiny_control_lr (conf/method/<method>.yaml; table=lr_search chooses it).",
             f"Reference rows, scored like the cells (same validation scenes and scorer): '{REAL}' is the ceiling by "
             f"definition, '{THROUGH_VAE}' (posterior mean, decoded) the ceiling of any method decoding through this "
             f"VAE, '{base_label(cfg)}' the base model without control ({cfg.methods[0]}'s adapter is the identity "
             "and its control network outputs zeros at step 0; the validation noise is each seed's).",
             f"Published (OFT paper Table 2, SD 1.5, full size; SD = the base model): {published}. ControlNet++ table: "
             "ControlNet F1 34.65, mIoU 27.46, RMSE 35.90; T2I-Adapter F1 23.65, mIoU 12.61, RMSE 48.40.",
             *coft_note([runs[(m, first_control, first_seed)] for m in cfg.methods])]
    return write_report(cfg, "controllable", "Controllable generation (miniature of the paper's table)", rows, notes,
                        settings=control_settings(cfg))
