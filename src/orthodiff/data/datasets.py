"""Datasets for controllable generation: one item contract, shared loading and resizing.

Every dataset yields dicts
    pixel_values  (3, R, R) float in [-1, 1]   the target image, as the VAE wants it
    conditioning  (C, R, R) float in [0, 1]    the encoded condition (see data/control.py)
    text          str                          the caption
    index         int                          the item's index (keys the latent cache)
    target        dict                         ground truth for the control metric, when known:
                  seg (R, R) int64 class ids; depth (R, R) float in [0, 1];
                  landmarks (S, K, 2) pixels + landmark_mask (S, K)
and subclasses only say where records live (`records`) and how to read one (`load`).
A joint control ("canny+seg") reads each condition through a view of the dataset under that
condition alone and stacks them (data/control.py's joint_condition); the target holds each one's.

Skip-on-error: an unreadable item (a file that fails to decode, a label out of range: an
OSError or ValueError from `load`) comes back as a `SkippedItem` naming it (on_error="skip",
the default: one bad file must not kill a 20-epoch run), or raises (on_error="raise").
`collate` drops skipped items and lists them under the batch's "skipped" key; `SkipBudget`
counts them where batches arrive (the datamodule, eval.py) and stops the run when skipping
is no longer the odd bad file but a systematic fault (a missing annotator model makes
every item fail). Errors that are not about one item (a config mistake, a model that
cannot load) are not caught here and stop the run at once.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from orthodiff.data.control import canny_edges, colorize_segmentation, condition_channels, control_parts, encode_condition, joint_condition
from orthodiff.data.readers import read_image
from orthodiff.data.shapes import SEG_CLASSES, read_metadata

ON_ERROR = ("skip", "raise")
# Condition pixels that are labels or thin marks must not be blended when resized.
NEAREST_CONTROLS = ("seg", "landmarks", "canny")
# Longer side / shorter side beyond which an image is skipped rather than centre-cropped: a
# 10,000 x 10 strip would be upscaled 50x (and, at 512 px, take ~800 MB) to keep 1 % of it.
MAX_ASPECT_RATIO = 10
log = logging.getLogger(__name__)


@dataclass
class SkippedItem:
    """What a dataset gives for an item it could not read: its index and why (the message
    names the file). Workers send it back like an item, so the main process can count it."""

    index: int
    error: str


def _crop_geometry(size: tuple[int, int], resolution: int):
    """Resized (width, height) and crop (left, top) of `resize_crop`."""
    height, width = size
    scale = resolution / min(height, width)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return (new_w, new_h), ((new_w - resolution) // 2, (new_h - resolution) // 2)


def resize_crop(array: np.ndarray, resolution: int, nearest: bool = False) -> np.ndarray:
    """Resize the shorter side to `resolution`, centre-crop to a square."""
    if array.shape[:2] == (resolution, resolution):
        return array
    (new_w, new_h), (left, top) = _crop_geometry(array.shape[:2], resolution)
    shrink = new_w < array.shape[1]
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    resized = cv2.resize(array, (new_w, new_h), interpolation=interpolation)
    return resized[top:top + resolution, left:left + resolution]


def resize_points(points: np.ndarray, size: tuple[int, int], resolution: int) -> np.ndarray:
    """Pixel coordinates (x, y; pixel centres at integers) through `resize_crop`."""
    (new_w, new_h), (left, top) = _crop_geometry(size, resolution)
    scale = np.array([new_w / size[1], new_h / size[0]], np.float32)
    return (np.asarray(points, np.float32) + 0.5) * scale - 0.5 - np.array([left, top], np.float32)


class ControlDataset(Dataset):
    """Base class: subclasses set `self.records` and implement `load(record)` returning
    dict(image=uint8 (H, W, 3), condition=uint8 image or None, text=str, target=dict of
    raw ground truth at the image's size (seg ids, depth in [0, 1], landmarks in pixels))."""

    num_classes: int | None = None  # segmentation classes, for colour-coding and mIoU
    ignore_index: int | None = None  # a segmentation id left out of mIoU (ADE20K's 0, "other")

    def __init__(self, control: str, resolution: int, on_error: str = "skip"):
        self.parts = control_parts(control)
        self.control = control
        self.channels = condition_channels(control)
        self._views: list | None = None  # a joint control's per-condition views, made on first use
        self.resolution = int(resolution)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: choose one of {ON_ERROR}")
        self.on_error = on_error
        self.skipped: list[str] = []
        self.records: list = []

    def __len__(self) -> int:
        return len(self.records)

    def load(self, record) -> dict:
        raise NotImplementedError

    def describe(self, record) -> str:
        """The item's file, for messages: the first file name in its record."""
        values = record.values() if isinstance(record, dict) else record if isinstance(record, tuple) else [record]
        return str(next((value for value in values if isinstance(value, (str, Path))), record))

    def view(self, control: str) -> "ControlDataset":
        """This dataset (records, files, skip list shared) under one of its conditions alone."""
        single = copy.copy(self)
        single.control, single.parts, single.channels = control, [control], condition_channels(control)
        return single

    def joint_item(self, index: int) -> dict | SkippedItem:
        if self._views is None:
            self._views = [self.view(part) for part in self.parts]
        items = [view[index] for view in self._views]
        skipped = next((item for item in items if isinstance(item, SkippedItem)), None)
        if skipped is not None:
            return skipped
        return {**items[0], "conditioning": joint_condition(self.control, [item["conditioning"] for item in items]),
                "target": {key: value for item in items for key, value in item["target"].items()}}

    def __getitem__(self, index: int) -> dict | SkippedItem:
        if len(self.parts) > 1:
            return self.joint_item(index)
        record = self.records[index]
        try:
            raw = self.load(record)  # its errors name the file
            try:
                item = self.prepare(raw)
            except (ValueError, cv2.error) as error:  # prepare sees arrays: name the file here
                raise ValueError(f"{self.describe(record)}: {error}") from None
            return {**item, "index": index}
        except (OSError, ValueError, cv2.error) as error:
            if self.on_error == "raise":
                raise
            self.skipped.append(str(error))
            return SkippedItem(index, str(error))

    def prepare(self, raw: dict) -> dict:
        image, condition, target = raw["image"], raw.get("condition"), dict(raw.get("target", {}))
        size = image.shape[:2]
        if max(size) > MAX_ASPECT_RATIO * min(size):
            raise ValueError(f"image of {size[1]} x {size[0]} px: aspect ratio above {MAX_ASPECT_RATIO}:1")
        if condition is not None and condition.shape[:2] != size:  # resized together with the image
            condition = cv2.resize(condition, size[::-1], interpolation=cv2.INTER_NEAREST
                                   if self.control in NEAREST_CONTROLS else cv2.INTER_LINEAR)
        image = resize_crop(image, self.resolution)
        if self.control == "canny" and condition is None:
            condition = canny_edges(image)  # at the training resolution, as evaluation sees it
        elif condition is None:
            raise ValueError(f"{type(self).__name__} gave no {self.control} condition")
        else:
            condition = resize_crop(condition, self.resolution, self.control in NEAREST_CONTROLS)
        if self.control == "seg" and condition.ndim == 2:  # class ids -> colour code
            target.setdefault("seg", condition)
            condition = colorize_segmentation(condition, self.num_classes)
        item = {"pixel_values": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1,
                "conditioning": encode_condition(self.control, condition),
                "text": raw["text"], "target": {}}
        for key in ("seg", "depth"):
            if key in target:
                resized = resize_crop(np.asarray(target[key]), self.resolution, nearest=key == "seg")
                item["target"][key] = torch.from_numpy(np.ascontiguousarray(resized)).to(
                    torch.int64 if key == "seg" else torch.float32)
        if "landmarks" in target:
            points = resize_points(target["landmarks"], size, self.resolution)
            item["target"]["landmarks"] = torch.from_numpy(points)
            mask = target.get("landmark_mask", np.ones(points.shape[:-1], bool))
            item["target"]["landmark_mask"] = torch.as_tensor(np.asarray(mask, bool))
        return item


def collate(items: list) -> dict:
    """default_collate over the items that loaded; the skipped ones (SkippedItem) are listed
    under "skipped" when there are any (a batch of skipped items only is {"skipped": [...]});
    None items are dropped."""
    loaded = [item for item in items if isinstance(item, dict)]
    skipped = [item for item in items if isinstance(item, SkippedItem)]
    batch = default_collate(loaded) if loaded else {}
    if skipped:
        batch["skipped"] = skipped
    return batch


class TooManySkippedError(RuntimeError):
    pass


class SkipBudget:
    """Counts the items skipped in one stream of batches (training, validation, evaluation)
    and stops the run when more than `max_fraction` of the last `window` items drawn (the
    dataset's size when smaller; at least one item is always tolerated) were skipped. An
    item counts once: a known-bad file skipped again next epoch does not count again.

    `take(batch)` removes the batch's "skipped" list, logs each new skip and raises
    TooManySkippedError, naming the first error, beyond the budget; `report()` is what
    metrics.json records."""

    def __init__(self, name: str, dataset_size: int, max_fraction: float = 0.01, window: int = 1000):
        if not 0 <= max_fraction < 1:
            raise ValueError(f"max_skip_fraction={max_fraction}: choose a fraction in [0, 1)")
        self.name, self.max_fraction = name, max_fraction
        self.recent: deque[bool] = deque(maxlen=max(1, min(window, dataset_size)))  # per item drawn: a new skip?
        self.allowed = max(1, int(max_fraction * self.recent.maxlen))
        self.drawn = 0
        self.bad: set[int] = set()
        self.first: list[str] = []  # the first few errors (each names its file)

    def take(self, batch: dict) -> dict:
        skipped = batch.pop("skipped", [])
        loaded = len(batch.get("text", ()))
        self.drawn += loaded + len(skipped)
        self.recent.extend([False] * loaded)
        for item in skipped:
            new = item.index not in self.bad
            self.recent.append(new)
            if new:
                self.bad.add(item.index)
                if len(self.first) < 5:
                    self.first.append(item.error)
                log.warning("skipped %s item %d (%d skipped so far): %s", self.name, item.index, len(self.bad),
                            item.error)
        if sum(self.recent) > self.allowed:
            raise TooManySkippedError(
                f"{sum(self.recent)} of the last {len(self.recent)} {self.name} items could not be read (more than "
                f"data.max_skip_fraction={self.max_fraction:g} allows); the first error: {self.first[0]}")
        return batch

    def report(self) -> dict:
        return {"skipped": len(self.bad), "drawn": self.drawn, "first": list(self.first)}

    def state_dict(self) -> dict:
        return {"bad": sorted(self.bad), "drawn": self.drawn, "first": list(self.first)}

    def load_state_dict(self, state: dict) -> None:
        self.bad, self.drawn, self.first = set(state["bad"]), state["drawn"], list(state["first"])


class ShapesDataset(ControlDataset):
    """The shapes world in its folder format (`python -m orthodiff.data.shapes`): every
    condition is stored per scene, and so is the exact ground truth of each metric."""

    CONDITION_KEYS = {"canny": "canny", "depth": "depth", "seg": "seg", "landmarks": "landmarks_image"}

    def __init__(self, root: str | Path, split: str, control: str, resolution: int = 64,
                 max_items: int | None = None, on_error: str = "skip"):
        super().__init__(control, resolution, on_error)
        self.root = Path(root).expanduser() / split
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"shapes dataset split {self.root} not found; write it with `python -m "
                f"orthodiff.data.shapes --out {Path(root)} --n 20000` (or `make shapes`)")
        self.num_classes = len(SEG_CLASSES)
        self.records = read_metadata(self.root)[:max_items]

    def load(self, record: dict) -> dict:
        image = read_image(self.root / record["file_name"])
        mode = "RGB" if self.control == "landmarks" else "L"
        condition = read_image(self.root / record[self.CONDITION_KEYS[self.control]], mode)
        target = {}  # only the ground truth this control is scored on; seg's is its condition
        if self.control == "depth":  # this world stores far = bright; conditions are near = bright
            target["depth"] = condition.astype(np.float32) / 255
            condition = 255 - condition
        elif self.control == "landmarks":
            target = {"landmarks": record["landmarks"], "landmark_mask": record["landmark_mask"]}
        return {"image": image, "condition": condition, "text": record["text"], "target": target}
