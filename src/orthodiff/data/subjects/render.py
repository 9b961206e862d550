"""Drawing subjects with the shapes world's renderer: one subject on a background
(`render_subject`), its training images (`subject_images`) and ideal answers to the
evaluation prompts (`reference_images`)."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np

from orthodiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    REFERENCE_SIZE,
    SHAPES,
    SIZE_RANGE,
    UNIT_OUTLINES,
    allowed_colors,
    gray_level,
    place_polygon,
    polygon_mask,
    sample_placement,
)
from orthodiff.data.subjects.catalogue import (
    MIN_DETAIL_CONTRAST,
    SUBJECT_SIZE_RANGE,
    Subject,
    get_subject,
    subject_colors,
)


def check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"image_size must be an integer of at least 16 pixels, got {image_size!r}")
    return int(image_size)


def check_image_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of images, got {n!r}")
    return int(n)


def _mask(unit, center, size, rotation, scale, image_size: int) -> np.ndarray:
    """The pixels of a unit polygon placed in the reference frame, in an image `scale`
    times that frame (the scaling of make_scene: pixel centres stay aligned)."""
    center = (np.asarray(center, np.float64) + 0.5) * scale - 0.5
    return polygon_mask(place_polygon(unit, center, size * scale, rotation), image_size)


def subject_mask(name: str, *, center, size: float, rotation: float,
                 image_size: int = REFERENCE_SIZE) -> np.ndarray:
    """(image_size, image_size) bool silhouette of a subject placed as in render_subject."""
    subject = get_subject(name)
    scale = check_image_size(image_size) / REFERENCE_SIZE
    return _mask(subject.outline(), center, size, rotation, scale, image_size)


def _check_legal(name: str, background: str, colors: tuple, extras) -> None:
    """The shapes world's colour rules for a subject scene (see the package docstring)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}: choose from {list(BACKGROUNDS)}")
    subject = get_subject(name)
    body, pattern = colors
    edge = (body, pattern) if subject.details_touch_edge else (body,)
    allowed = allowed_colors(background)
    for color in edge:
        if color not in allowed:
            raise ValueError(f"{name} in {body}/{pattern} cannot be drawn on a {background} "
                             f"background: {color} is too close to it in grey level (allowed "
                             f"there: {list(allowed)})")
    if abs(gray_level(COLORS[body]) - gray_level(COLORS[pattern])) < MIN_DETAIL_CONTRAST:
        raise ValueError(f"{name}'s body {body} and pattern {pattern} are less than "
                         f"{MIN_DETAIL_CONTRAST} grey levels apart")
    used = set(colors)
    for shape in extras:
        kind, color = shape.get("kind"), shape.get("color")
        if kind not in SHAPES or color not in COLORS or not {"center", "size"} <= set(shape):
            raise ValueError(f"extra shape {shape} needs a kind in {list(SHAPES)}, a color in "
                             f"{list(COLORS)}, a center and a size")
        if color not in allowed:
            raise ValueError(f"extra {color} {kind} cannot be drawn on a {background} "
                             f"background (allowed colours there: {list(allowed)})")
        if color in used:  # the world's rule, which the classifier oracle relies on
            raise ValueError(f"extra {color} {kind}: every shape of a scene needs its own "
                             f"colour, and {sorted(used)} are taken")
        used.add(color)


def draw_subject(image, subject: Subject, colors, center, size, rotation, scale) -> None:
    body = _mask(subject.outline(), center, size, rotation, scale, len(image))
    image[body] = COLORS[colors[0]]
    for detail in subject.details:
        # Clipped to the body, so a pattern never leaks a pixel past the silhouette.
        image[_mask(detail, center, size, rotation, scale, len(image)) & body] = COLORS[colors[1]]


def _draw_shape(image, shape: dict, scale) -> None:
    mask = _mask(UNIT_OUTLINES[shape["kind"]], shape["center"], shape["size"], shape.get("rotation", 0.0),
                 scale, len(image))
    image[mask] = COLORS[shape["color"]]


def render_subject(name: str, *, background: str, center, size: float, rotation: float,
                   extra_shapes=(), image_size: int = REFERENCE_SIZE,
                   color: str | None = None) -> np.ndarray:
    """(image_size, image_size, 3) uint8 RGB: subject `name` on `background`.

    Geometry is in the 64-pixel reference frame (scaled to image_size as make_scene
    does): `center` [x, y], `size` the circumradius, `rotation` degrees clockwise.
    `extra_shapes` are ordinary shapes, dicts with kind, color, center, size and
    rotation, drawn in order beneath the subject. `color` recolours the subject's body.
    Raises ValueError for a scene the shapes world's colour rules forbid."""
    subject = get_subject(name)
    image_size = check_image_size(image_size)
    colors = subject_colors(name, color)
    extra_shapes = list(extra_shapes)
    _check_legal(name, background, colors, extra_shapes)
    scale = image_size / REFERENCE_SIZE
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = BACKGROUNDS[background]
    for shape in extra_shapes:
        _draw_shape(image, shape, scale)
    draw_subject(image, subject, colors, center, size, rotation, scale)
    return image


def _rng(name: str, seed: int, purpose: str) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # crc32, not hash(): the same on every run, and different per subject and purpose.
    return np.random.default_rng([int(seed), zlib.crc32(f"{name}/{purpose}".encode())])


def _layout(rng, size_range, count: int) -> list[dict]:
    """`count` placements whose circumcircles stay a pixel apart, so nothing occludes
    anything (two or three ordinary-sized shapes fit within a few tries)."""
    for _ in range(1000):
        placements = [sample_placement(rng, size_range) for _ in range(count)]
        if all(math.dist(a["center"], b["center"]) >= a["size"] + b["size"] + 1
               for i, a in enumerate(placements) for b in placements[i + 1:]):
            return placements
    raise ValueError(f"could not place {count} shapes of sizes {size_range} apart in one image")


def subject_placements(name: str, n: int = 4, seed: int = 0) -> list[dict]:
    """The center/size/rotation of subject_images(name, n, seed), reference frame."""
    get_subject(name)
    rng = _rng(name, seed, "train")
    return [sample_placement(rng, SUBJECT_SIZE_RANGE) for _ in range(check_image_count(n))]


def subject_images(name: str, n: int = 4, seed: int = 0, size: int = REFERENCE_SIZE,
                   background: str | None = None) -> list[np.ndarray]:
    """`n` training images of a subject (uint8 RGB, size x size), alone on its training
    background (or `background`), at varied position, size and rotation; the same
    images for the same seed. DreamBooth trains on 3-5 of these."""
    background = get_subject(name).background if background is None else background
    return [render_subject(name, background=background, image_size=size, **placement)
            for placement in subject_placements(name, n, seed)]


def reference_images(name: str, spec: dict, n: int = 4, seed: int = 0,
                     size: int = REFERENCE_SIZE) -> list[np.ndarray]:
    """`n` images of what an ideal answer to an EVAL_PROMPTS entry looks like: the
    subject (recoloured, twice, next to the extra shape, as `spec` asks) on the asked
    background, nothing overlapping. For scoring references and for checking that the
    oracle reads each attribute off a perfect image."""
    subject = get_subject(name)
    background = spec.get("background", subject.background)
    copies = int(spec.get("count", 1))
    extra = spec.get("extra")
    rng = _rng(name, seed, "reference:" + json.dumps(spec, sort_keys=True))
    # Several objects get ordinary shapes' sizes, so that they fit side by side.
    size_range = SUBJECT_SIZE_RANGE if copies == 1 and extra is None else SIZE_RANGE
    images = []
    for _ in range(check_image_count(n)):
        placements = _layout(rng, size_range, copies + (extra is not None))
        extras = []
        if extra is not None:
            color, kind = extra
            extras = [{"kind": kind, "color": color, **placements.pop(),
                       **({"rotation": 0.0} if kind == "circle" else {})}]
        image = render_subject(name, background=background, extra_shapes=extras, image_size=size,
                               color=spec.get("color"), **placements[0])
        for placement in placements[1:]:
            draw_subject(image, subject, subject_colors(name, spec.get("color")),
                         scale=size / REFERENCE_SIZE, **placement)
        images.append(image)
    return images
