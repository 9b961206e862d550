"""The shapes world on disk: per split ``images/ seg/ depth/ canny/ landmarks/`` PNGs and a
``metadata.jsonl``, and ``info.json`` at the root (see the package docstring); writing it
and reading its metadata back."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from orthodiff.data.control import CANNY_THRESHOLDS
from orthodiff.data.readers import read_jsonl
from orthodiff.data.shapes.catalogue import (
    BACKGROUNDS,
    COLORS,
    DEPTH_STEP,
    GENERATOR_VERSION,
    MAX_SHAPES,
    NUM_LANDMARKS,
    REFERENCE_SIZE,
    SEG_CLASSES,
    SHAPES,
    SPLIT_SEEDS,
    default_eval_size,
    split_seeds,
)
from orthodiff.data.shapes.render import Scene, depth_to_png, make_scene, render_landmarks

logger = logging.getLogger(__name__)

FILE_KEYS = ("file_name", "seg", "depth", "canny", "landmarks_image")
FOLDERS = {"file_name": "images", "seg": "seg", "depth": "depth", "canny": "canny",
           "landmarks_image": "landmarks"}


def scene_record(scene: Scene, name: str) -> dict:
    """The metadata.jsonl line of a scene whose files are called `name` (e.g. '00000.png')."""
    files = {key: f"{FOLDERS[key]}/{name}" for key in FILE_KEYS}
    return {
        "file_name": files["file_name"],
        "text": scene.caption,
        **{key: files[key] for key in FILE_KEYS[1:]},
        "landmarks": np.round(scene.landmarks.astype(np.float64), 3).tolist(),
        "landmark_mask": scene.landmark_mask.astype(int).tolist(),
        "shapes": scene.shapes,
        "background": scene.background,
        "seed": scene.seed,
    }


def write_split(split_dir: Path, split: str, n: int, *, size: int = REFERENCE_SIZE,
                shapes=SHAPES, colors=tuple(COLORS), backgrounds=tuple(BACKGROUNDS),
                progress: bool = True) -> None:
    """Write the first `n` scenes of `split` into `split_dir` (PNGs + metadata.jsonl)."""
    seeds = split_seeds(split, n)
    split_dir = Path(split_dir)
    for folder in FOLDERS.values():
        (split_dir / folder).mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(n - 1)))
    with open(split_dir / "metadata.jsonl", "w") as metadata:
        for i, seed in enumerate(tqdm(seeds, desc=f"shapes {split}", disable=not progress)):
            scene = make_scene(seed, size=size, shapes=shapes, colors=colors,
                               backgrounds=backgrounds)
            name = f"{i:0{digits}d}.png"
            arrays = {
                "file_name": cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
                "seg": scene.seg,
                "depth": depth_to_png(scene.depth),
                "canny": scene.canny,
                "landmarks_image": cv2.cvtColor(render_landmarks(
                    scene.landmarks, scene.landmark_mask, size), cv2.COLOR_RGB2BGR),
            }
            for key, array in arrays.items():
                path = split_dir / FOLDERS[key] / name
                if not cv2.imwrite(str(path), array):
                    raise OSError(f"could not write {path}")
            metadata.write(json.dumps(scene_record(scene, name)) + "\n")


def dataset_info(n_train: int, n_val: int, n_test: int, *, size: int = REFERENCE_SIZE,
                 shapes=SHAPES, colors=tuple(COLORS), backgrounds=tuple(BACKGROUNDS)) -> dict:
    """What info.json records: everything that decides the dataset's content."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {
        "generator": "orthodiff.data.shapes",
        "version": GENERATOR_VERSION,
        "size": size,
        "shapes": list(shapes),
        "colors": {c: list(COLORS[c]) for c in colors},
        "backgrounds": {b: list(BACKGROUNDS[b]) for b in backgrounds},
        "seg_classes": list(SEG_CLASSES),
        "max_shapes": MAX_SHAPES,
        "landmarks_per_shape": NUM_LANDMARKS,
        "depth": f"1.0 background, 1 - {DEPTH_STEP} * (z + 1) for the shape at z-order z; "
                 "png = round(depth * 255)",
        "canny_thresholds": list(CANNY_THRESHOLDS),
        "splits": {s: {"n": n, "seeds": [SPLIT_SEEDS[s], SPLIT_SEEDS[s] + n - 1]}
                   for s, n in sizes.items()},
    }


def write_dataset(out: Path, n_train: int, *, n_val: int | None = None,
                  n_test: int | None = None, size: int = REFERENCE_SIZE, shapes=SHAPES,
                  colors=tuple(COLORS), backgrounds=tuple(BACKGROUNDS),
                  overwrite: bool = False, progress: bool = True) -> bool:
    """Write train/val/test splits and info.json under `out`.

    Returns False (and writes nothing) when `out` already holds this exact dataset.
    A different shapes dataset there is replaced only with `overwrite`; a non-empty
    folder that is not a shapes dataset is never touched."""
    split_seeds("train", n_train)
    n_val = default_eval_size(n_train) if n_val is None else n_val
    n_test = default_eval_size(n_train) if n_test is None else n_test
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        split_seeds(split, n)
    vocabulary = {"shapes": tuple(shapes), "colors": tuple(colors),
                  "backgrounds": tuple(backgrounds)}
    make_scene(0, size=size, **vocabulary)  # validates names and size before any writing
    info = dataset_info(n_train, n_val, n_test, size=size, **vocabulary)
    out = Path(out)
    info_path = out / "info.json"
    old = None
    if info_path.is_file():
        try:
            old = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            pass
    if isinstance(old, dict) and old.get("generator") == info["generator"]:
        complete = old.pop("complete", False)
        if old == info and complete:
            logger.info("%s already holds this shapes dataset; nothing to do", out)
            return False
        if old != info and not overwrite:
            changed = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
            raise ValueError(f"{out} holds a different shapes dataset (differs in {changed}); "
                             "pass --overwrite (overwrite=True) to replace it, or choose "
                             "another --out")
        for split in SPLIT_SEEDS:  # remove only what this generator wrote
            shutil.rmtree(out / split, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no shapes dataset (no info.json "
                         "written by this generator); choose an empty or new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    # Written first with complete=false, so an interrupted run is recognised and redone.
    info_path.write_text(json.dumps({**info, "complete": False}, indent=2) + "\n")
    for split, n in sizes.items():
        write_split(out / split, split, n, size=size, progress=progress, **vocabulary)
    info_path.write_text(json.dumps({**info, "complete": True}, indent=2) + "\n")
    return True


def read_metadata(split_dir: Path) -> list[dict]:
    """The records of `split_dir`/metadata.jsonl, after checking that every file they
    name exists (errors name the line and the file)."""
    split_dir = Path(split_dir)
    path = split_dir / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write the shapes world with `python -m "
                                "orthodiff.data.shapes --out DIR --n N` (see data/README.md)")
    records = read_jsonl(path)
    for number, record in enumerate(records, 1):
        if "file_name" not in record:
            raise ValueError(f"{path} line {number} has no 'file_name'")
        for key in FILE_KEYS:
            if key in record and not (split_dir / record[key]).is_file():
                raise FileNotFoundError(f"{path} line {number}: {key} file "
                                        f"{split_dir / record[key]} does not exist")
    return records
