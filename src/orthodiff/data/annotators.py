"""Annotators: make a condition from an image when a dataset does not ship one, and cache
it on disk so each image is annotated once, not once per epoch.

Depth polarity (a documented choice): depth maps here are **near = bright**, min-max
normalized per image to [0, 255]. That is what ControlNet's depth model was trained on and
what DPT / MiDaS / Depth Anything predict (relative inverse depth), so the evaluation
protocol (run DPT on the generated image, RMSE against the input map) compares like with
like. The shapes world stores the opposite (distance-like: background 1.0 = far); a model
trained on one polarity does not transfer to the other without inverting the condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from orthodiff.data.readers import read_image
from orthodiff.files import atomic_path


def cached_png(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The single-channel uint8 map cached at `path`, or `compute()` written there first.
    Written atomically, so a run killed mid-write never leaves a truncated PNG for the next
    epoch to fail on."""
    if path.is_file():
        return read_image(path, "L")
    array = compute()
    ok, png = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"cannot encode cache file {path} as PNG")
    with atomic_path(path, shared=True) as tmp:
        tmp.write_bytes(png.tobytes())
    return array


class DepthAnnotator:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 depth map at the image's size, near = bright.

    `model` is a local folder or hub id of any transformers depth-estimation model, e.g.
    "Intel/dpt-hybrid-midas" (the DPT that ControlNet's depth annotator uses) or
    "LiheYoung/depth-anything-small-hf"; these predict relative inverse depth (large =
    near). Pass invert=True for models that predict metric depth (large = far: GLPN,
    ZoeDepth, metric Depth Anything) so the maps keep the same polarity.
    The pipeline is built on first use: a dataset whose maps are all cached never loads
    it, and each DataLoader worker builds its own."""

    def __init__(self, model: str | Path, device: str | int | None = None, invert: bool = False):
        self.model, self.device, self.invert = str(model), device, invert
        self.pipeline = None

    def load(self):
        """The transformers pipeline. A model that cannot load is a RuntimeError, not the
        OSError it comes as: skip-on-error must not take it for one unreadable image."""
        from transformers import pipeline  # slow import, only when a map is missing

        try:
            return pipeline("depth-estimation", model=self.model, device=self.device)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RuntimeError(f"the depth model {self.model!r} could not be loaded ({reason}); give a local path "
                               "to a depth-estimation model folder (depth_model=...)") from error

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        if self.pipeline is None:
            self.pipeline = self.load()
        depth = self.pipeline(Image.fromarray(image))["predicted_depth"]
        depth = depth.float().squeeze().cpu().numpy()
        height, width = image.shape[:2]
        if depth.shape != (height, width):  # older transformers return the model's resolution
            depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_LINEAR)
        low, high = float(depth.min()), float(depth.max())
        depth = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
        if self.invert:
            depth = 1 - depth
        return np.round(depth * 255).astype(np.uint8)
