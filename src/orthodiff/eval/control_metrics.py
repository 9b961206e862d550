"""Control consistency of generated images: the task's metric, by the evaluation protocol.

    canny      cv2.Canny(100, 200) on the generated and on the source image; IoU (the OFT
               paper) and F1 (ControlNet++) of the two edge maps, per image, averaged
    seg        a segmenter on the generated image; mIoU / mAcc / aAcc against the input map
    depth      a depth estimator on the generated image; RMSE against the input depth
    landmarks  a landmark detector on the generated image; mean L2 error in pixels

`evaluator="shapes"` uses the shapes-world oracles (assets/oracles) for seg, depth and
landmarks; a path or hub id selects a real transformers model (seg: a semantic
segmentation model such as SegFormer/UperNet trained on ADE20K; depth: a
depth-estimation model such as DPT). Canny needs no evaluator.

Usage: `scorer = ControlScorer("seg")`, then `scorer.update(generated, batch)` per batch
((N, 3, H, W) float images in [0, 1] and the dataset batch), and `scorer.compute()`.
Which of a control's figures is its headline (and which way is better) is said once, in
conf/control/<control>.yaml (`metric`, `metric_mode`: what a sweeper optimizes);
`headline_metric` reads it there for Python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from orthodiff.data.control import canny_edges, check_control, control_parts
from orthodiff.eval.metrics import depth_rmse, landmark_scores, segmentation_scores

CONTROL_CONFIGS = Path(__file__).resolve().parents[3] / "conf" / "control"
ORACLE_FOR = {"seg": "segmenter", "depth": "depth", "landmarks": "keypoints"}


def headline_metric(control: str) -> str:
    """A control's headline figure, as `ControlScorer.compute()` and metrics.json name it:
    conf/control/<control>.yaml's `metric` without its "val/" prefix."""
    return OmegaConf.load(CONTROL_CONFIGS / f"{check_control(control)}.yaml").metric.split("/", 1)[-1]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def edge_scores(generated: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    """IoU and F1 of the Canny maps of one generated and one source uint8 image.
    Both maps empty counts as a perfect match (1, 1)."""
    pred, true = canny_edges(generated) > 0, canny_edges(source) > 0
    both, either = np.logical_and(pred, true).sum(), np.logical_or(pred, true).sum()
    if either == 0:
        return 1.0, 1.0
    return float(both / either), float(2 * both / (pred.sum() + true.sum()))


class _TransformersEvaluator:
    """A real evaluator from transformers, given by local path or hub id."""

    def __init__(self, control: str, model: str):
        from transformers import pipeline

        task = {"seg": "image-segmentation", "depth": "depth-estimation"}.get(control)
        if task is None:
            raise ValueError(f"no real {control} evaluator is integrated; use evaluator=shapes "
                             "on the shapes world")
        if control == "seg":
            from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

            self.processor = AutoImageProcessor.from_pretrained(model)
            self.model = AutoModelForSemanticSegmentation.from_pretrained(model).eval()
        else:
            self.pipe = pipeline(task, model=model)
        self.control = control

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        from PIL import Image

        pil = [Image.fromarray(image) for image in to_uint8(images)]
        if self.control == "seg":
            inputs = self.processor(images=pil, return_tensors="pt")
            logits = self.model(**inputs).logits
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
            return logits.argmax(1).numpy()
        depths = [np.asarray(out["depth"], np.float32) / 255.0 for out in self.pipe(pil)]
        return np.stack(depths)


class ControlScorer:
    def __init__(self, control: str, evaluator: str = "shapes", num_classes: int | None = None,
                 ignore_index: int | None = None, device: str | torch.device = "cpu"):
        self.control = check_control(control)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.model = None
        if control in ORACLE_FOR:
            if evaluator == "shapes":
                from orthodiff.eval.oracles import load_oracle

                self.model = load_oracle(ORACLE_FOR[control], device=device)
            else:
                self.model = _TransformersEvaluator(control, evaluator)
        self.reset()

    def reset(self):
        self.outputs: dict[str, list] = {"pred": [], "target": [], "mask": [], "target_mask": [],
                                         "iou": [], "f1": []}

    def _predict(self, images: torch.Tensor):
        if isinstance(self.model, torch.nn.Module) and images.shape[-1] != 64:  # oracles see 64 x 64
            images = F.interpolate(images.float(), size=(64, 64), mode="area")
        return self.model.predict(images.float().clamp(0, 1).cpu())

    def update(self, generated: torch.Tensor, batch: dict):
        if self.control == "canny":
            source = to_uint8((batch["pixel_values"] + 1) / 2)
            for pred, true in zip(to_uint8(generated), source):
                iou, f1 = edge_scores(pred, true)
                self.outputs["iou"].append(iou)
                self.outputs["f1"].append(f1)
            return
        target = batch["target"]
        if self.control == "landmarks":
            points, mask = self._predict(generated)
            scale = generated.shape[-1] / 64 if isinstance(self.model, torch.nn.Module) else 1.0
            self.outputs["pred"].append(np.asarray(points) * scale)
            self.outputs["mask"].append(np.asarray(mask))
            self.outputs["target"].append(target["landmarks"].cpu().numpy())
            self.outputs["target_mask"].append(target["landmark_mask"].cpu().numpy())
            return
        pred = self._predict(generated)
        true = target[self.control].cpu().numpy()
        if pred.shape[-2:] != true.shape[-2:]:  # oracle resolution -> the target's
            mode = "nearest" if self.control == "seg" else "bilinear"
            pred = F.interpolate(torch.as_tensor(pred[:, None]).float(), size=true.shape[-2:], mode=mode)[:, 0].numpy()
        self.outputs["pred"].append(pred)
        self.outputs["target"].append(true)

    def compute(self) -> dict[str, float]:
        out = self.outputs
        if self.control == "canny":
            return {"canny_iou": float(np.mean(out["iou"])), "canny_f1": float(np.mean(out["f1"]))}
        pred, target = np.concatenate(out["pred"]), np.concatenate(out["target"])
        if self.control == "seg":
            num_classes = self.num_classes or int(max(pred.max(), target.max())) + 1
            scores = segmentation_scores(pred, target, num_classes, self.ignore_index)
            return {"seg_miou": scores["mIoU"], "seg_macc": scores["mAcc"], "seg_aacc": scores["aAcc"]}
        if self.control == "depth":
            return {"depth_rmse": depth_rmse(pred, target)["rmse"]}
        scores = landmark_scores(pred, np.concatenate(out["mask"]), target, np.concatenate(out["target_mask"]))
        return {"landmark_error": scores["error"], "landmark_detected": scores["detected"]}


class JointScorer:
    """A joint control's ("canny+seg") scores: each condition's own metrics on the same samples."""

    def __init__(self, scorers: list[ControlScorer]):
        self.scorers = scorers

    def reset(self):
        for scorer in self.scorers:
            scorer.reset()

    def update(self, generated: torch.Tensor, batch: dict):
        for scorer in self.scorers:
            scorer.update(generated, batch)

    def compute(self) -> dict[str, float]:
        return {key: value for scorer in self.scorers for key, value in scorer.compute().items()}


def control_scorer(control: str, evaluator: str = "shapes", num_classes: int | None = None,
                   ignore_index: int | None = None, device: str | torch.device = "cpu") -> ControlScorer | JointScorer:
    """The scorer of a control: ControlScorer, or for a joint control one per condition."""
    parts = control_parts(control)
    scorers = [ControlScorer(part, evaluator, num_classes, ignore_index, device) for part in parts]
    return scorers[0] if len(scorers) == 1 else JointScorer(scorers)
