"""Evaluation entry (called by eval.py): score a trained adapter on a fixed split with fixed
seeds, write eval.json and a grid.

    control metric   Canny IoU/F1, seg mIoU/mAcc/aAcc, depth RMSE or landmark error
                     (control_scorer: shapes oracles, or a model named by `evaluator`)
    image quality    FID and KID (torchmetrics) against the same split's real images,
                     with the extractor named in the report (Inception or shapes features)
    prompt alignment CLIP score when `clip_model` is set; the classifier oracle's
                     shape/colour recognition on shapes-world captions
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from orthodiff.adapter import load_adapter
from orthodiff.app.preflight import check_base_model, check_eval
from orthodiff.data.control import preview_condition
from orthodiff.data.datasets import SkipBudget, collate
from orthodiff.eval.control_metrics import control_scorer
from orthodiff.eval.image_metrics import INCEPTION_WEIGHTS, ImageQuality, clip_score, prompt_alignment
from orthodiff.files import atomic_path
from orthodiff.tasks import ControlTask
from orthodiff.tasks.control import image_grid


def load_model(ckpt: str | Path, pretrained: str) -> ControlTask:
    """An adapter file, a run directory holding adapter.safetensors, or a Lightning .ckpt."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        path = path / "adapter.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such adapter file or run directory "
                                "(pass adapter.safetensors, a train.py run directory or a .ckpt)")
    if path.suffix == ".ckpt":
        module = ControlTask.load_from_checkpoint(path, map_location="cpu", weights_only=False)
        if Path(module.hparams.pretrained).resolve() != Path(pretrained).resolve():
            raise ValueError(f"{path} was trained on base model {module.hparams.pretrained!r}, not {pretrained!r}: "
                             f"pass the matching model= (or evaluate its adapter.safetensors)")
        return module.eval()
    module = load_adapter(path, pretrained=pretrained)
    if module.task_name != ControlTask.task_name:
        raise ValueError(f"{path} is a subject-driven adapter: eval.py scores controllable generation; its "
                         "scores are in its run's metrics.json (python reproduce.py table=subject compares methods)")
    return module


def fid_extractor(fid: DictConfig) -> str:
    """"auto": Inception when its weights are given or in torch.hub's cache, else shapes."""
    if fid.extractor != "auto":
        return fid.extractor
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    return "inception" if fid.inception_weights or cached.is_file() else "shapes"


def evaluate(cfg: DictConfig) -> dict:
    start = time.time()
    check_base_model("model.pretrained", cfg.model.pretrained, "model.original_config",
                     cfg.model.get("original_config"))
    module = load_model(cfg.ckpt, cfg.model.pretrained)
    control = module.control
    check_eval(cfg, control)  # evaluator, CLIP, Inception, annotator: before anything is generated
    if cfg.get("control") is not None and cfg.control.name != control:
        raise ValueError(f"ckpt {cfg.ckpt} is a {control!r} adapter but control={cfg.control.name} was asked for: "
                         f"drop control= or evaluate a {cfg.control.name!r} adapter")
    test_cfg = cfg.data.get("test")
    if test_cfg is None:
        raise ValueError(f"data config {cfg.data._target_} has no `test` dataset to evaluate on")
    overrides = {"resolution": cfg.model.resolution, "max_items": cfg.num_samples}
    if "control" in test_cfg:
        overrides["control"] = control
    dataset = instantiate(test_cfg, **overrides)
    extractor = fid_extractor(cfg.fid)
    scorer = control_scorer(control, cfg.evaluator, getattr(dataset, "num_classes", None),
                            getattr(dataset, "ignore_index", None))
    quality = ImageQuality(extractor, cfg.fid.inception_weights if extractor == "inception" else None,
                           kid_subset_size=cfg.fid.kid_subset_size, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, shuffle=False, collate_fn=collate)
    skips = SkipBudget("test", len(dataset), cfg.data.get("max_skip_fraction", 0.01))
    captions, generated_all, grid_rows = [], [], []
    for index, batch in enumerate(tqdm(loader, desc="eval batches")):
        batch = skips.take(batch)
        if not batch:
            continue
        generated = module.generate(batch["text"], batch["conditioning"], seed=cfg.seed + index,
                                    steps=cfg.steps, guidance=cfg.guidance, progress=False)
        real = ((batch["pixel_values"] + 1) / 2).clamp(0, 1)
        scorer.update(generated, batch)
        quality.update(real, real=True)
        quality.update(generated, real=False)
        captions += batch["text"]
        generated_all.append(generated)
        if sum(len(rows[0]) for rows in grid_rows) < cfg.grid_rows:
            grid_rows.append((preview_condition(control, batch["conditioning"]), generated, real))
    if not captions:
        raise ValueError(f"no readable items in {test_cfg._target_} (root {test_cfg.get('root')})")
    generated_all = torch.cat(generated_all)

    alignment = {}
    if cfg.clip_model:
        alignment.update(clip_score(generated_all, captions, cfg.clip_model))
    if "ShapesDataset" in test_cfg._target_:
        alignment["shapes_classifier"] = prompt_alignment(generated_all, captions)

    report = {
        "ckpt": str(cfg.ckpt), "method": module.hparams.method, "base_model": str(module.hparams.pretrained),
        "control": control, "data": {"dataset": test_cfg._target_, "root": str(test_cfg.get("root")),
                                     "split": test_cfg.get("split"), "n": len(captions)},
        "seed": cfg.seed, "steps": cfg.steps, "guidance": cfg.guidance, "evaluator": cfg.evaluator,
        "control_metrics": scorer.compute(),
        "image_quality": quality.compute(),
        "prompt_alignment": alignment,
        "skipped": skips.report(),
        "seconds": round(time.time() - start, 1),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    Image.fromarray(image_grid(grid_rows, cfg.grid_rows)).save(out / "grid.png")
    print(f"eval: {out / 'eval.json'}\n{json.dumps({k: report[k] for k in ('control_metrics', 'image_quality')})}")
    return report

