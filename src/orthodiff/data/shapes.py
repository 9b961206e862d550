"""The procedural "shapes world": tiny scenes with exact ground truth for every control.

A scene is a plain background with 1-3 coloured shapes drawn in z-order (later shapes
occlude earlier ones) and a caption naming them:

    "a red triangle, a blue circle and an orange cross on a white background"

Ground truth, all exact because the scene is rendered from its own description:

- seg: uint8 class map, 0 = background, 1..K = shape kind (``SEG_CLASSES``).
- depth: float32 in [0, 1], distance-like: background 1.0, the shape drawn at z-order z
  at ``1 - DEPTH_STEP * (z + 1)`` (0.8, 0.6, 0.4). The step 0.2 makes every level a
  whole number on the 8-bit scale (255, 204, 153, 102), so depth PNGs are lossless.
- landmarks: float32 (MAX_SHAPES, NUM_LANDMARKS, 2) pixel (x, y), one row per shape in
  z-order, plus a bool mask (MAX_SHAPES, NUM_LANDMARKS) that is False for absent slots.
  Point 0 is the centre, points 1-4 follow one rule per kind:
    circle    top, right, bottom, left points of the circle (circles have rotation 0);
    square    corners, clockwise from the top-left one;
    triangle  apex, bottom-right, bottom-left vertices, then the base midpoint;
    cross     tips of the arms (midpoint of each end edge): top, right, bottom, left.
  "Top-left", "apex", ... name the point of the unrotated shape. Rotations stay within
  +-MAX_ROTATION degrees (clockwise on screen), well inside each kind's symmetry, so the
  order can be read off the image without ambiguity.
- canny: ``cv2.Canny(gray, 100, 200)`` of the image, the evaluation protocol's call.

Pixel coordinates put pixel centres at integers. A shape's ``size`` is the distance from
its centre to its landmarks 1-4 (circumradius; the base midpoint of a triangle is at
size / 2). Geometry is sampled in a 64-pixel reference frame and scaled, so a seed gives
the same scene at every resolution.

Colours are far apart in RGB and at least 28 grey levels apart (so Canny finds weak
edges between any two shapes), and a colour is only drawn on a background at least
``MIN_CONTRAST`` grey levels away from it (so a shape's outline is a strong Canny edge).
Shapes in one scene have distinct colours; each shows its centre and at least
``MIN_VISIBLE`` of its area.

Each scene comes from one integer seed. Split ``s`` uses seeds ``SPLIT_SEEDS[s] + i``
for i in range(n), so splits are disjoint and val/test do not change when --n grows.

    python -m orthodiff.data.shapes --out data/shapes --n 20000

writes, for each split, ``images/ seg/ depth/ canny/ landmarks/`` PNGs and a
``metadata.jsonl`` (Hugging Face imagefolder convention: ``file_name`` + ``text``), and
``info.json`` at the root, which a re-run compares to decide whether the folder already
holds this dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from orthodiff.data.control import CANNY_THRESHOLDS, canny_edges, render_points

# Bump when the same seed would render a different scene; info.json records it.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "cross")
SEG_CLASSES = ("background",) + SHAPES
COLORS = {
    "red": (255, 55, 45),
    "green": (40, 210, 60),
    "blue": (0, 45, 240),
    "yellow": (235, 220, 20),
    "purple": (140, 30, 200),
    "orange": (255, 165, 0),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light gray": (200, 200, 200),
    "dark gray": (60, 60, 60),
    "black": (0, 0, 0),
}

REFERENCE_SIZE = 64
MAX_SHAPES = 3
NUM_LANDMARKS = 5
DEPTH_STEP = 0.2
SIZE_RANGE = (11.0, 18.0)  # circumradius in pixels of the 64-pixel frame
MAX_ROTATION = 30.0  # degrees; square/cross repeat every 90, triangle every 120
# Grey levels between a shape colour and its background. Sobel turns a step of d grey
# levels into a gradient of 4d, so d > 200 / 4 makes the outline a strong Canny edge.
MIN_CONTRAST = 52
MIN_VISIBLE = 0.5  # fraction of a shape's own area that must stay unoccluded
SPLIT_SEEDS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_STRIDE = 1_000_000_000  # the most scenes a split can hold
FILE_KEYS = ("file_name", "seg", "depth", "canny", "landmarks_image")
FOLDERS = {"file_name": "images", "seg": "seg", "depth": "depth", "canny": "canny",
           "landmarks_image": "landmarks"}

_ARM = 0.36  # half-width of a cross's arm, as a fraction of its size
_S = math.sqrt(0.5)
_T = math.sqrt(3) / 2
_ANGLES = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # a 48-gon is within 0.04 px of a circle
# Unit outlines (size 1, rotation 0, y pointing down) and their landmarks 1-4.
_OUTLINES = {
    "circle": np.stack([np.sin(_ANGLES), -np.cos(_ANGLES)], 1),
    "square": np.array([(-_S, -_S), (_S, -_S), (_S, _S), (-_S, _S)]),
    "triangle": np.array([(0, -1), (_T, 0.5), (-_T, 0.5)]),
    "cross": np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM),
                       (_ARM, _ARM), (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM),
                       (-1, -_ARM), (-_ARM, -_ARM)]),
}
_LANDMARKS = {
    "circle": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "square": _OUTLINES["square"],
    "triangle": np.array([(0, -1), (_T, 0.5), (-_T, 0.5), (0, 0.5)]),
    "cross": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)]),
}
# Landmark disc colours for render_landmarks: centre white, then one colour per index.
LANDMARK_COLORS = ((255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 128, 255), (255, 255, 0))


def gray_level(rgb) -> int:
    """Grey level of an RGB colour as cv2.COLOR_RGB2GRAY computes it (what Canny sees)."""
    return int(cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2GRAY)[0, 0])


def allowed_colors(background: str, colors=tuple(COLORS)) -> tuple[str, ...]:
    """The colours (among `colors`) with enough grey-level contrast to `background`."""
    level = gray_level(BACKGROUNDS[background])
    return tuple(c for c in colors if abs(gray_level(COLORS[c]) - level) >= MIN_CONTRAST)


@dataclass
class Scene:
    """One rendered scene and its ground truth (see the module docstring for encodings)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    seg: np.ndarray  # (H, W) uint8, index into SEG_CLASSES
    depth: np.ndarray  # (H, W) float32, 1.0 = background, smaller = nearer
    landmarks: np.ndarray  # (MAX_SHAPES, NUM_LANDMARKS, 2) float32 pixel (x, y)
    landmark_mask: np.ndarray  # (MAX_SHAPES, NUM_LANDMARKS) bool, False = absent slot
    canny: np.ndarray  # (H, W) uint8 in {0, 255}
    caption: str
    shapes: list  # one dict per shape in z-order, see make_scene
    background: str
    seed: int


def _place(unit: np.ndarray, center, size: float, rotation: float) -> np.ndarray:
    theta = math.radians(rotation)  # y points down, so positive turns clockwise on screen
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return np.asarray(center, np.float64) + size * unit @ rot.T


def shape_outline(kind: str, center, size: float, rotation: float) -> np.ndarray:
    """(N, 2) pixel (x, y) vertices of the polygon a shape is drawn as (circle: 48-gon)."""
    return _place(_OUTLINES[kind], center, size, rotation)


def shape_landmarks(kind: str, center, size: float, rotation: float) -> np.ndarray:
    """(NUM_LANDMARKS, 2) pixel (x, y) landmarks of a shape: centre, then the kind's 4 points."""
    return np.concatenate([[center], _place(_LANDMARKS[kind], center, size, rotation)])


def shape_depth(z: int) -> float:
    """Depth of the shape drawn at z-order `z` (background is 1.0)."""
    return round(1.0 - DEPTH_STEP * (z + 1), 6)


def _fill(mask: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    # 4 fractional bits: sub-pixel vertices, so shapes do not jitter to the pixel grid.
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask


def _masks(shapes: list, size: int) -> list:
    return [_fill(np.zeros((size, size), np.uint8), shape_outline(
            s["kind"], s["center"], s["size"], s["rotation"])).astype(bool) for s in shapes]


def _visible_fractions(masks: list) -> list:
    covered = np.zeros_like(masks[0])
    fractions = []
    for mask in reversed(masks):  # topmost first
        fractions.append(float((mask & ~covered).sum() / max(mask.sum(), 1)))
        covered |= mask
    return fractions[::-1]


def _check_names(kind: str, names, vocabulary) -> tuple:
    names = tuple(names)
    unknown = [n for n in names if n not in vocabulary]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}: choose from {list(vocabulary)}")
    if not names:
        raise ValueError(f"no {kind} names given: choose from {list(vocabulary)}")
    return names


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(shapes: list, background: str) -> str:
    """'a red triangle, a blue circle and an orange cross on a white background'."""
    named = [f"{_article(s['color'])} {s['color']} {s['kind']}" for s in shapes]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"{listed} on {_article(background)} {background} background"


def _centres_visible(shapes: list, masks: list) -> bool:
    """Whether the 3x3 pixels around every shape's centre show that shape."""
    for z, shape in enumerate(shapes[:-1]):
        x, y = (int(round(c)) for c in shape["center"])
        if any(m[y - 1:y + 2, x - 1:x + 2].any() for m in masks[z + 1:]):
            return False
    return True


def _sample_layout(rng: np.random.Generator, kinds: list, colors: list) -> list:
    """Centres, sizes and rotations in the 64-pixel frame, resampled until every shape
    shows its centre and at least MIN_VISIBLE of its area, so none is hidden or reduced
    to a frame around another (the best of 100 tries if that never happens)."""
    best, best_score = None, (False, -1.0)
    for _ in range(100):
        layout = []
        for z, (kind, color) in enumerate(zip(kinds, colors)):
            size = round(float(rng.uniform(*SIZE_RANGE)), 2)
            lo, hi = size + 1.0, REFERENCE_SIZE - 2.0 - size  # keep the whole shape inside
            center = [round(float(rng.uniform(lo, hi)), 2), round(float(rng.uniform(lo, hi)), 2)]
            rotation = 0.0 if kind == "circle" else round(
                float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 2)
            layout.append({"kind": kind, "color": color, "center": center, "size": size,
                           "rotation": rotation, "z": z})
        masks = _masks(layout, REFERENCE_SIZE)
        score = (_centres_visible(layout, masks), min(_visible_fractions(masks)))
        if score > best_score:
            best, best_score = layout, score
        if score[0] and score[1] >= MIN_VISIBLE:
            break
    return best


def make_scene(seed: int, *, size: int = REFERENCE_SIZE, shapes=SHAPES, colors=tuple(COLORS),
               backgrounds=tuple(BACKGROUNDS)) -> Scene:
    """Render scene `seed`. `shapes`, `colors`, `backgrounds` restrict the vocabulary
    (names; passing the dicts works too). Each shape dict holds kind, color, center [x, y],
    size, rotation (degrees, clockwise), z, depth and visible_fraction, in pixels of `size`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}")
    shapes = _check_names("shape", shapes, SHAPES)
    colors = _check_names("color", colors, COLORS)
    backgrounds = _check_names("background", backgrounds, BACKGROUNDS)
    usable = [b for b in backgrounds if allowed_colors(b, colors)]
    if not usable:
        raise ValueError(f"no color in {list(colors)} contrasts with the backgrounds "
                         f"{list(backgrounds)}: allowed pairs are "
                         f"{ {b: allowed_colors(b) for b in BACKGROUNDS} }")

    rng = np.random.default_rng(int(seed))
    background = usable[rng.integers(len(usable))]
    palette = allowed_colors(background, colors)
    count = min(int(rng.integers(1, MAX_SHAPES + 1)), len(palette))  # colours are distinct
    picked = [palette[i] for i in rng.permutation(len(palette))[:count]]
    kinds = [shapes[i] for i in rng.integers(len(shapes), size=count)]
    layout = _sample_layout(rng, kinds, picked)

    scale = size / REFERENCE_SIZE  # pixel centres stay aligned: x -> (x + 0.5) * scale - 0.5
    for s in layout:
        s["center"] = [round((c + 0.5) * scale - 0.5, 4) for c in s["center"]]
        s["size"] = round(s["size"] * scale, 4)
        s["depth"] = shape_depth(s["z"])
    masks = _masks(layout, size)
    for s, fraction in zip(layout, _visible_fractions(masks)):
        s["visible_fraction"] = round(fraction, 4)

    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[background]
    seg = np.zeros((size, size), np.uint8)
    depth = np.ones((size, size), np.float32)
    landmarks = np.zeros((MAX_SHAPES, NUM_LANDMARKS, 2), np.float32)
    landmark_mask = np.zeros((MAX_SHAPES, NUM_LANDMARKS), bool)
    for s, mask in zip(layout, masks):  # z-order: later shapes paint over earlier ones
        image[mask] = COLORS[s["color"]]
        seg[mask] = SEG_CLASSES.index(s["kind"])
        depth[mask] = s["depth"]
        landmarks[s["z"]] = shape_landmarks(s["kind"], s["center"], s["size"], s["rotation"])
        landmark_mask[s["z"]] = True
    return Scene(image=image, seg=seg, depth=depth, landmarks=landmarks,
                 landmark_mask=landmark_mask, canny=canny_edges(image),
                 caption=caption_for(layout, background), shapes=layout,
                 background=background, seed=int(seed))


def render_landmarks(landmarks, mask, size: int = REFERENCE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 control image: each present landmark as a small disc, coloured
    by its index (LANDMARK_COLORS: centre white, then red, green, blue, yellow)."""
    landmarks = np.asarray(landmarks, np.float64).reshape(-1, NUM_LANDMARKS, 2)
    return render_points(landmarks, (size, size), LANDMARK_COLORS, radius=1.5 * size / REFERENCE_SIZE,
                         mask=np.asarray(mask, bool).reshape(-1, NUM_LANDMARKS))


def depth_to_png(depth: np.ndarray) -> np.ndarray:
    """uint8 depth image (255 = background); exact for this world's depth levels."""
    return np.round(depth * 255).astype(np.uint8)


def default_eval_size(n_train: int) -> int:
    """Default val/test size: 5% of train, at least 200 scenes."""
    return max(n_train // 20, 200)


def split_seeds(split: str, n: int) -> range:
    """Seeds of the scenes of `split` (disjoint between splits)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}: choose from {list(SPLIT_SEEDS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= SPLIT_STRIDE:
        raise ValueError(f"{split} size must be a positive number of scenes "
                         f"(at most {SPLIT_STRIDE}), got {n!r}")
    return range(SPLIT_SEEDS[split], SPLIT_SEEDS[split] + int(n))


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
            print(f"{out} already holds this shapes dataset; nothing to do")
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
    from orthodiff.data.datasets import read_jsonl

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


def _names(text: str) -> tuple:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orthodiff.data.shapes",
                                     description="Write the procedural shapes world to disk.")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder")
    parser.add_argument("--n", type=int, required=True, help="number of train scenes")
    parser.add_argument("--n-val", type=int, help="default: n // 20, at least 200")
    parser.add_argument("--n-test", type=int, help="default: n // 20, at least 200")
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE, help="image side in pixels")
    parser.add_argument("--shapes", type=_names, default=SHAPES, help="comma-separated kinds")
    parser.add_argument("--colors", type=_names, default=tuple(COLORS), help="comma-separated")
    parser.add_argument("--backgrounds", type=_names, default=tuple(BACKGROUNDS),
                        help="comma-separated")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different shapes dataset in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        written = write_dataset(args.out, args.n, n_val=args.n_val, n_test=args.n_test,
                                size=args.size, shapes=args.shapes, colors=args.colors,
                                backgrounds=args.backgrounds, overwrite=args.overwrite,
                                progress=not args.no_progress)
    except ValueError as error:
        parser.error(str(error))
    if written:
        print(f"wrote the shapes world to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
