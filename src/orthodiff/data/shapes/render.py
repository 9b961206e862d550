"""Rendering the shapes world: placing unit shapes, sampling a scene's layout from its seed,
and drawing the image and every ground truth of it (`make_scene`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from orthodiff.data.control import canny_edges, render_points
from orthodiff.data.shapes.catalogue import (
    BACKGROUNDS,
    COLORS,
    LANDMARK_COLORS,
    MAX_ROTATION,
    MAX_SHAPES,
    MIN_VISIBLE,
    NUM_LANDMARKS,
    REFERENCE_SIZE,
    SEG_CLASSES,
    SHAPES,
    SIZE_RANGE,
    UNIT_LANDMARKS,
    UNIT_OUTLINES,
    allowed_colors,
    caption_for,
    check_names,
    shape_depth,
)


@dataclass
class Scene:
    """One rendered scene and its ground truth (see the package docstring for encodings)."""

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


def place_polygon(unit: np.ndarray, center, size: float, rotation: float) -> np.ndarray:
    """Unit polygon (N, 2) -> pixel (x, y): scaled by `size`, turned `rotation` degrees, at `center`."""
    theta = math.radians(rotation)  # y points down, so positive turns clockwise on screen
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return np.asarray(center, np.float64) + size * unit @ rot.T


def shape_outline(kind: str, center, size: float, rotation: float) -> np.ndarray:
    """(N, 2) pixel (x, y) vertices of the polygon a shape is drawn as (circle: 48-gon)."""
    return place_polygon(UNIT_OUTLINES[kind], center, size, rotation)


def shape_landmarks(kind: str, center, size: float, rotation: float) -> np.ndarray:
    """(NUM_LANDMARKS, 2) pixel (x, y) landmarks of a shape: centre, then the kind's 4 points."""
    return np.concatenate([[center], place_polygon(UNIT_LANDMARKS[kind], center, size, rotation)])


def polygon_mask(polygon: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the pixels a polygon (pixel (x, y) vertices) covers."""
    mask = np.zeros((size, size), np.uint8)
    # 4 fractional bits: sub-pixel vertices, so shapes do not jitter to the pixel grid.
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask.astype(bool)


def shape_masks(shapes: list, size: int) -> list:
    """One (size, size) bool mask per shape dict (kind, center, size, rotation), occlusion ignored."""
    return [polygon_mask(shape_outline(s["kind"], s["center"], s["size"], s["rotation"]), size)
            for s in shapes]


def _visible_fractions(masks: list) -> list:
    covered = np.zeros_like(masks[0])
    fractions = []
    for mask in reversed(masks):  # topmost first
        fractions.append(float((mask & ~covered).sum() / max(mask.sum(), 1)))
        covered |= mask
    return fractions[::-1]


def _centres_visible(shapes: list, masks: list) -> bool:
    """Whether the 3x3 pixels around every shape's centre show that shape."""
    for z, shape in enumerate(shapes[:-1]):
        x, y = (int(round(c)) for c in shape["center"])
        if any(m[y - 1:y + 2, x - 1:x + 2].any() for m in masks[z + 1:]):
            return False
    return True


def sample_placement(rng: np.random.Generator, size_range=SIZE_RANGE, rotate: bool = True) -> dict:
    """{"center": [x, y], "size", "rotation"} drawn in the 64-pixel frame with the whole shape
    inside it; the rotation is 0.0 without `rotate` (circles)."""
    size = round(float(rng.uniform(*size_range)), 2)
    lo, hi = size + 1.0, REFERENCE_SIZE - 2.0 - size  # keep the whole shape inside
    center = [round(float(rng.uniform(lo, hi)), 2), round(float(rng.uniform(lo, hi)), 2)]
    rotation = round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 2) if rotate else 0.0
    return {"center": center, "size": size, "rotation": rotation}


def _sample_layout(rng: np.random.Generator, kinds: list, colors: list) -> list:
    """Centres, sizes and rotations in the 64-pixel frame, resampled until every shape
    shows its centre and at least MIN_VISIBLE of its area, so none is hidden or reduced
    to a frame around another (the best of 100 tries if that never happens)."""
    best, best_score = None, (False, -1.0)
    for _ in range(100):
        layout = [{"kind": kind, "color": color, **sample_placement(rng, rotate=kind != "circle"), "z": z}
                  for z, (kind, color) in enumerate(zip(kinds, colors))]
        masks = shape_masks(layout, REFERENCE_SIZE)
        score = (_centres_visible(layout, masks), min(_visible_fractions(masks)))
        if score > best_score:
            best, best_score = layout, score
        if score[0] and score[1] >= MIN_VISIBLE:
            break
    return best


def _scene_words(rng: np.random.Generator, shapes, colors, backgrounds) -> tuple[str, list, list]:
    """A scene's background, colours and kinds: the draws that decide its caption."""
    shapes = check_names("shape", shapes, SHAPES)
    colors = check_names("color", colors, COLORS)
    backgrounds = check_names("background", backgrounds, BACKGROUNDS)
    usable = [b for b in backgrounds if allowed_colors(b, colors)]
    if not usable:
        raise ValueError(f"no color in {list(colors)} contrasts with the backgrounds "
                         f"{list(backgrounds)}: allowed pairs are "
                         f"{ {b: allowed_colors(b) for b in BACKGROUNDS} }")
    background = usable[rng.integers(len(usable))]
    palette = allowed_colors(background, colors)
    count = min(int(rng.integers(1, MAX_SHAPES + 1)), len(palette))  # colours are distinct
    picked = [palette[i] for i in rng.permutation(len(palette))[:count]]
    kinds = [shapes[i] for i in rng.integers(len(shapes), size=count)]
    return background, picked, kinds


def scene_caption(seed: int, *, shapes=SHAPES, colors=tuple(COLORS), backgrounds=tuple(BACKGROUNDS)) -> str:
    """make_scene(seed).caption without drawing the scene (the same draws, ~100x faster)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    background, picked, kinds = _scene_words(np.random.default_rng(int(seed)), shapes, colors, backgrounds)
    return caption_for([{"kind": kind, "color": color} for kind, color in zip(kinds, picked)], background)


def make_scene(seed: int, *, size: int = REFERENCE_SIZE, shapes=SHAPES, colors=tuple(COLORS),
               backgrounds=tuple(BACKGROUNDS)) -> Scene:
    """Render scene `seed`. `shapes`, `colors`, `backgrounds` restrict the vocabulary
    (names; passing the dicts works too). Each shape dict holds kind, color, center [x, y],
    size, rotation (degrees, clockwise), z, depth and visible_fraction, in pixels of `size`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}")
    rng = np.random.default_rng(int(seed))
    background, picked, kinds = _scene_words(rng, shapes, colors, backgrounds)
    layout = _sample_layout(rng, kinds, picked)

    scale = size / REFERENCE_SIZE  # pixel centres stay aligned: x -> (x + 0.5) * scale - 0.5
    for s in layout:
        s["center"] = [round((c + 0.5) * scale - 0.5, 4) for c in s["center"]]
        s["size"] = round(s["size"] * scale, 4)
        s["depth"] = shape_depth(s["z"])
    masks = shape_masks(layout, size)
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
