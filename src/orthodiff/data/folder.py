"""The generic folder format, and the small readers the real-dataset loaders share.

A folder dataset is a root holding images, optional condition images and one index file,
either
    metadata.jsonl  Hugging Face imagefolder / diffusers ControlNet convention, one JSON
                    object per line: "image" (or "file_name"), "conditioning_image", "text";
    prompt.json     ControlNet's training format (fill50k), one JSON object per line:
                    "source" (the condition), "target" (the image), "prompt".
Paths are relative to the root. metadata.jsonl wins when both are present.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np

from orthodiff.data.datasets import ControlDataset
from orthodiff.data.readers import BadLine, read_image, read_jsonl

# The first key present in the first record names each column; the alternatives cover
# imagefolder ("file_name", "*_file_name") and diffusers' ControlNet script ("image", ...).
INDEX_FORMATS = {
    "metadata.jsonl": {"image": ("image", "file_name"),
                       "condition": ("conditioning_image", "conditioning_image_file_name"),
                       "text": ("text",)},
    "prompt.json": {"image": ("target",), "condition": ("source",), "text": ("prompt",)},
}
log = logging.getLogger(__name__)


def dataset_root(root: str | Path, what: str, how: str) -> Path:
    """`root` as a Path, or FileNotFoundError naming it, the dataset and how to get it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what} not found at {root}: {how} (see data/README.md)")
    return root


def read_captions(file_names: list[str], path: Path, required: bool) -> list[str]:
    """The caption of each file name from a jsonl of {"file_name", "text"} lines. Files
    without one get "" and one warning counts them (a run without captions still trains
    the control, it only loses prompt alignment). A missing jsonl raises when `required`
    (the user named it) and counts as no captions otherwise."""
    captions = {}
    if path.is_file():
        for number, record in enumerate(read_jsonl(path), 1):
            if "file_name" not in record or "text" not in record:
                raise ValueError(f"{path} record {number} needs 'file_name' and 'text', has {sorted(record)}")
            captions[Path(record["file_name"]).name] = str(record["text"])
    elif required:
        raise FileNotFoundError(f"captions file {path} not found")
    names = [Path(name).name for name in file_names]
    texts = [captions.get(name, "") for name in names]
    missing = sum(name not in captions for name in names)
    if missing:
        warnings.warn(f"{missing} of {len(file_names)} images have no caption in {path}; "
                      "they get an empty caption", stacklevel=3)
    return texts


def read_condition(path: Path, control: str) -> np.ndarray:
    """A condition image as the base class wants it: grey for canny/depth, RGB for
    landmarks, and for seg either a single-channel class-id map or a colour-coded RGB map."""
    if control in ("canny", "depth"):
        return read_image(path, "L")
    if control == "landmarks":
        return read_image(path, "RGB")
    condition = read_image(path, "unchanged")  # keeps single-channel class ids as they are
    return np.ascontiguousarray(condition[..., :3]) if condition.ndim == 3 else condition  # colour-coded: drop alpha


class FolderDataset(ControlDataset):
    """Images + condition images + captions listed in metadata.jsonl or prompt.json.

    control="canny" may omit condition images (Canny is computed at the training
    resolution). For "seg", a single-channel PNG holds class ids (colour-coded here, and
    kept as the seg target; needs num_classes; palette-mode PNGs are read as colours) and
    a 3-channel image is taken as already colour-coded. For "depth", the condition (8-bit,
    near = bright or far = bright, as the data has it) is also the depth target."""

    def __init__(self, root: str | Path, control: str, resolution: int = 512, image_key: str | None = None,
                 condition_key: str | None = None, text_key: str | None = None,
                 max_items: int | None = None, on_error: str = "skip", num_classes: int | None = None):
        super().__init__(control, resolution, on_error)
        self.root = dataset_root(root, "folder dataset", "point root at a folder holding metadata.jsonl "
                                 "or prompt.json next to the images")
        self.num_classes = num_classes
        index = next((self.root / name for name in INDEX_FORMATS if (self.root / name).is_file()), None)
        if index is None:
            raise FileNotFoundError(f"{self.root} holds neither metadata.jsonl nor prompt.json: "
                                    "write one index file listing image, condition and caption per line")
        # A line that is not JSON is skipped like an unreadable image (or raises, on_error="raise").
        records = read_jsonl(index, on_error="keep" if on_error == "skip" else "raise")[:max_items]
        good = [record for record in records if not isinstance(record, BadLine)]
        if not good:
            raise ValueError(f"{index} lists no records" + (f" ({len(records)} unreadable lines)" if records else ""))
        keys = INDEX_FORMATS[index.name]
        given = {"image": image_key, "condition": condition_key, "text": text_key}
        self.keys = {column: given[column] or next((k for k in keys[column] if k in good[0]), keys[column][0])
                     for column in keys}
        needed = ["image"] + ([] if control == "canny" else ["condition"])
        for number, record in enumerate(records, 1):
            for column in needed:
                if not isinstance(record, BadLine) and record.get(self.keys[column]) is None:
                    raise ValueError(f"{index} record {number} has no {self.keys[column]!r} ({column}); "
                                     f"it has {sorted(record)} (set {column}_key to the right one)")
        uncaptioned = sum(not record.get(self.keys["text"]) for record in good)
        if uncaptioned:  # trained as the unconditional branch, as caption dropout does
            log.warning("%d of %d records in %s have no caption (%r): they train with an empty one", uncaptioned,
                        len(good), index, self.keys["text"])
        self.records = records

    def load(self, record: dict | BadLine) -> dict:
        if isinstance(record, BadLine):
            raise ValueError(record.error)
        image = read_image(self.root / record[self.keys["image"]])
        name = record.get(self.keys["condition"])
        condition = None if name is None else read_condition(self.root / name, self.control)
        if self.control == "seg" and condition.ndim == 2:  # class ids
            if self.num_classes is None:
                # TypeError, not ValueError: a configuration mistake must not be skipped item by item.
                raise TypeError(f"{self.root / name} is a single-channel class-id map: pass num_classes")
            if condition.max() >= self.num_classes:  # checked here, where the error can name the file
                raise ValueError(f"{self.root / name} holds class id {condition.max()} >= "
                                 f"num_classes={self.num_classes}")
        target = {}
        if self.control == "depth":
            if condition.shape != image.shape[:2]:  # the target lives at the image's size
                condition = cv2.resize(condition, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
            target["depth"] = condition.astype(np.float32) / 255
        return {"image": image, "condition": condition, "text": str(record.get(self.keys["text"]) or ""),
                "target": target}
