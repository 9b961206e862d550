"""What the shapes world holds: shape kinds and their unit geometry, colours, backgrounds
and the contrast rules between them, segmentation classes, depth levels, captions, and the
seeds of each split (see the package docstring for the encodings)."""

from __future__ import annotations

import math

import cv2
import numpy as np

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

_ARM = 0.36  # half-width of a cross's arm, as a fraction of its size
_S = math.sqrt(0.5)
_T = math.sqrt(3) / 2
_ANGLES = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # a 48-gon is within 0.04 px of a circle
# Unit outlines (size 1, rotation 0, y pointing down) and their landmarks 1-4.
UNIT_OUTLINES = {
    "circle": np.stack([np.sin(_ANGLES), -np.cos(_ANGLES)], 1),
    "square": np.array([(-_S, -_S), (_S, -_S), (_S, _S), (-_S, _S)]),
    "triangle": np.array([(0, -1), (_T, 0.5), (-_T, 0.5)]),
    "cross": np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM),
                       (_ARM, _ARM), (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM),
                       (-1, -_ARM), (-_ARM, -_ARM)]),
}
UNIT_LANDMARKS = {
    "circle": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)]),
    "square": UNIT_OUTLINES["square"],
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


def check_names(kind: str, names, vocabulary) -> tuple:
    """`names` as a tuple, after checking it is non-empty and within `vocabulary`."""
    names = tuple(names)
    unknown = [n for n in names if n not in vocabulary]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}: choose from {list(vocabulary)}")
    if not names:
        raise ValueError(f"no {kind} names given: choose from {list(vocabulary)}")
    return names


def shape_depth(z: int) -> float:
    """Depth of the shape drawn at z-order `z` (background is 1.0)."""
    return round(1.0 - DEPTH_STEP * (z + 1), 6)


def article(word: str) -> str:
    """The indefinite article of `word`: 'an orange', 'a white'."""
    return "an" if word[0] in "aeiou" else "a"


def caption_for(shapes: list, background: str) -> str:
    """'a red triangle, a blue circle and an orange cross on a white background'."""
    named = [f"{article(s['color'])} {s['color']} {s['kind']}" for s in shapes]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"{listed} on {article(background)} {background} background"


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
