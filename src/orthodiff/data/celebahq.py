"""CelebA-HQ faces with 68-point landmarks, for the landmark task.

Reads
    root/CelebA-HQ-img/<stem>.jpg     the images (CelebAMask-HQ's folder; 1024 x 1024)
    root/landmarks/<stem>.txt         68 lines "x y", pixels of that image (iBUG 300-W order,
                                      as face-alignment / dlib produce), pixel centres at integers
    root/captions.jsonl               {"file_name": "0.jpg", "text": "..."} lines (optional)
CelebA-HQ ships no 68-point landmarks; make the txt files with a face-alignment model
(see data/README.md). Images without a landmark file (no face found) are left out, with
one warning counting them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from orthodiff.data.control import render_points
from orthodiff.data.datasets import ControlDataset
from orthodiff.data.folder import dataset_root, read_captions
from orthodiff.data.readers import read_image

NUM_LANDMARKS = 68
LANDMARK_RADIUS = 2.0  # disc radius in pixels at the training resolution: 68 points stay apart at 512
CELEBAHQ_HOW = ("put the CelebA-HQ images in CelebA-HQ-img/ and one 68-point landmark file per image "
                "in landmarks/<stem>.txt")


def read_landmarks(path: Path) -> np.ndarray:
    """(68, 2) float32 pixel (x, y) from a text file of 68 "x y" lines."""
    try:
        points = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as error:
        raise ValueError(f"{path} is not a landmark file of 'x y' lines: {error}") from None
    if points.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"{path} holds {points.shape[0]} points of {points.shape[1]} values; "
                         f"expected {NUM_LANDMARKS} lines 'x y'")
    return points


class CelebAHQDataset(ControlDataset):
    def __init__(self, root: str | Path, resolution: int = 512, captions: str | Path | None = None,
                 max_items: int | None = None, on_error: str = "skip"):
        super().__init__("landmarks", resolution, on_error)
        self.root = dataset_root(root, "CelebA-HQ", CELEBAHQ_HOW)
        images, landmarks = self.root / "CelebA-HQ-img", self.root / "landmarks"
        for folder in (images, landmarks):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} not found: {CELEBAHQ_HOW} (see data/README.md)")
        paths = sorted(images.glob("*.jpg"))
        annotated = [path for path in paths if (landmarks / f"{path.stem}.txt").is_file()]
        if not annotated:
            raise FileNotFoundError(f"no image in {images} has a landmark file in {landmarks}: {CELEBAHQ_HOW}")
        if len(annotated) < len(paths):
            warnings.warn(f"{len(paths) - len(annotated)} of {len(paths)} images in {images} have no landmark "
                          f"file in {landmarks}; they are left out", stacklevel=2)
        paths = annotated[:max_items]
        captions = Path(captions).expanduser() if captions is not None else None
        texts = read_captions([path.name for path in paths], captions or self.root / "captions.jsonl",
                              required=captions is not None)
        self.records = [(path, landmarks / f"{path.stem}.txt", text) for path, text in zip(paths, texts)]

    def load(self, record: tuple[Path, Path, str]) -> dict:
        image_path, landmarks_path, text = record
        image = read_image(image_path)
        points = read_landmarks(landmarks_path)
        height, width = image.shape[:2]
        # Drawn at the image's size with the radius that becomes LANDMARK_RADIUS pixels once
        # the base class resizes the shorter side to the training resolution.
        radius = LANDMARK_RADIUS * min(height, width) / self.resolution
        condition = render_points(points, (height, width), radius=radius)
        return {"image": image, "condition": condition, "text": text,
                "target": {"landmarks": points[None], "landmark_mask": np.ones((1, NUM_LANDMARKS), bool)}}
