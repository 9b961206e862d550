"""The shapes-world subjects (``SUBJECTS``), the evaluation prompts (``EVAL_PROMPTS``) and
what a faithful answer to each shows (``expected_labels``); see the package docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from orthodiff.data.shapes import COLORS, UNIT_OUTLINES, article

# Grey levels between a pattern and its body; the world's colours are >= 28 apart, the
# least a weak Canny edge needs.
MIN_DETAIL_CONTRAST = 28
# Subjects are drawn larger than ordinary shapes (11-18) so their pattern survives the VAE.
SUBJECT_SIZE_RANGE = (15.0, 20.0)

_S = math.sqrt(0.5)  # half the side of the unit square (circumradius 1)


def stripes(count: int = 1) -> tuple:
    """`count` stripes across the unit square, as wide as the bands between them."""
    band = 2 * _S / (2 * count + 1)
    return tuple(np.array([(x, -_S), (x + band, -_S), (x + band, _S), (x, _S)])
                 for x in (-_S + (2 * k + 1) * band for k in range(count)))


@dataclass(frozen=True, eq=False)
class Subject:
    """A shapes-world subject: a `class_word` silhouette in colors[0] with `details`
    (unit polygons in the shape's own frame, clipped to the silhouette) in colors[1]."""

    name: str
    class_word: str
    colors: tuple  # (body, pattern), both part of the identity
    background: str  # the background of its training images
    details: tuple
    details_touch_edge: bool  # then the pattern colour also borders the background
    description: str

    def outline(self) -> np.ndarray:
        return UNIT_OUTLINES[self.class_word]


SUBJECTS = {s.name: s for s in (
    # One stripe a third of the side wide: thinner stripes (two, 4-5 px each) come back
    # from the tiny VAE (f=4) as a muddy blend, so no model could reproduce them.
    Subject("striped_square", "square", ("green", "red"), "white", stripes(1), True,
            "a green square with a red stripe down its middle, parallel to two sides"),
    Subject("badge_circle", "circle", ("red", "yellow"), "dark gray",
            (0.65 * UNIT_OUTLINES["cross"],), False,
            "a red circle with a yellow cross inside it (the cross turns with the subject)"),
    # Point-down, with its tips 0.1 * size short of the edges (the inradius is 0.5).
    Subject("inlaid_triangle", "triangle", ("green", "blue"), "light gray",
            (-0.4 * UNIT_OUTLINES["triangle"],), False,
            "a green triangle with an upside-down blue triangle inlaid in its middle"),
)}

# Evaluation prompts: what each asks beyond the subject is recorded, for the oracle.
#   background  the scene's background
#   extra       (colour, kind) of one ordinary shape next to the subject
#   color       the subject's body recoloured (its pattern keeps its colour)
#   count       copies of the subject
# Words are the shapes captions' own (no "two", no plurals, no positions: the tiny
# model's text encoder never saw them). Extras and recolourings use orange and purple,
# which no subject uses, each on a background it contrasts with.
EVAL_PROMPTS = [
    {"prompt": "a {token} {cls} on a white background", "background": "white"},
    {"prompt": "a {token} {cls} on a light gray background", "background": "light gray"},
    {"prompt": "a {token} {cls} on a dark gray background", "background": "dark gray"},
    {"prompt": "a {token} {cls} on a black background", "background": "black"},
    {"prompt": "a {token} {cls} and a purple circle on a white background",
     "background": "white", "extra": ("purple", "circle")},
    {"prompt": "a {token} {cls} and an orange cross on a dark gray background",
     "background": "dark gray", "extra": ("orange", "cross")},
    {"prompt": "a purple triangle and a {token} {cls} on a light gray background",
     "background": "light gray", "extra": ("purple", "triangle")},
    {"prompt": "an orange square and a {token} {cls} on a black background",
     "background": "black", "extra": ("orange", "square")},
    {"prompt": "a purple {token} {cls} on a white background", "background": "white",
     "color": "purple"},
    {"prompt": "an orange {token} {cls} on a black background", "background": "black",
     "color": "orange"},
    {"prompt": "a {token} {cls} and a {token} {cls} on a white background",
     "background": "white", "count": 2},
    {"prompt": "a {token} {cls} and a {token} {cls} on a dark gray background",
     "background": "dark gray", "count": 2},
]


def get_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ValueError(f"unknown subject {name!r}: choose from {list(SUBJECTS)}")
    return SUBJECTS[name]


def subject_colors(name: str, color: str | None = None) -> tuple[str, str]:
    """(body, pattern) colours of a subject, the body recoloured to `color` if given."""
    subject = get_subject(name)
    body, pattern = subject.colors
    if color is None:
        return body, pattern
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}: choose from {list(COLORS)}")
    if color == pattern:
        raise ValueError(f"cannot recolour {name} {color}: its pattern is {pattern}")
    return color, pattern


def expected_labels(name: str, spec: dict) -> dict:
    """What a faithful image for EVAL_PROMPTS entry `spec` shows, in the classifier
    oracle's terms: background, colours that must be present / absent, (colour, kind)
    pairs that must be present, and the number of subject copies. A recolouring asks
    for the new colour *and* the old body colour gone: a red/yellow badge alone already
    reads as containing orange where its two colours meet."""
    subject = get_subject(name)
    subject_colors(name, spec.get("color"))  # validates the recolouring
    return {"background": spec.get("background", subject.background),
            "colors_present": [spec["color"]] if "color" in spec else [],
            "colors_absent": [subject.colors[0]] if "color" in spec else [],
            "pairs_present": [tuple(spec["extra"])] if "extra" in spec else [],
            "copies": int(spec.get("count", 1))}


def instance_prompt(token: str, cls: str, background: str | None = None) -> str:
    """'a sks square on a white background' ('a sks square' without a background)."""
    prompt = f"a {token} {cls}"
    return prompt if background is None else f"{prompt} on {article(background)} {background} background"


def class_prompt(cls: str, background: str | None = None) -> str:
    """The instance prompt without the token, for prior preservation: 'a square on a
    white background' ('a square' without a background)."""
    prompt = f"a {cls}"
    return prompt if background is None else f"{prompt} on {article(background)} {background} background"
