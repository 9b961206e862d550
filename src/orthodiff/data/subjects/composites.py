"""Random composite subjects for training a subject encoder (method=encoder): a shapes-world
silhouette in one colour with a pattern in another, drawn like the evaluation subjects
(``SUBJECTS``) but never one of them.

    subject = random_subject(seed)                 # the same subject for the same seed
    image = composite_image(subject, "white", rng)  # at a random position, size and rotation

A composite is a class word (any shape kind), a pattern (``PATTERNS``: the evaluation
subjects' stripe, cross and inlaid triangle, and a dot) and two colours at least
``MIN_DETAIL_CONTRAST`` grey levels apart; both colours contrast with every background it
is drawn on (``composite_backgrounds``). The combinations that are an evaluation subject
(same class word, pattern and colours) are never drawn (``is_evaluation_subject``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from orthodiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    REFERENCE_SIZE,
    SHAPES,
    UNIT_OUTLINES,
    allowed_colors,
    gray_level,
    sample_placement,
)
from orthodiff.data.subjects.catalogue import (
    MIN_DETAIL_CONTRAST,
    SUBJECT_SIZE_RANGE,
    SUBJECTS,
    Subject,
    instance_prompt,
    stripes,
)
from orthodiff.data.subjects.render import check_image_size, draw_subject

PATTERNS = {
    "stripe": stripes(1),
    "cross": (0.65 * UNIT_OUTLINES["cross"],),
    "inlay": (-0.4 * UNIT_OUTLINES["triangle"],),
    "dot": (0.4 * UNIT_OUTLINES["circle"],),
}
# Which pattern each evaluation subject wears (their details are these polygons).
EVALUATION_PATTERNS = {"striped_square": "stripe", "badge_circle": "cross", "inlaid_triangle": "inlay"}


def is_evaluation_subject(class_word: str, pattern: str, colors: tuple[str, str]) -> bool:
    return any(SUBJECTS[name].class_word == class_word and EVALUATION_PATTERNS[name] == pattern
               and tuple(SUBJECTS[name].colors) == tuple(colors) for name in SUBJECTS)


def composite_backgrounds(colors: tuple[str, str]) -> list[str]:
    """The backgrounds both colours contrast with (a pattern may touch the silhouette's edge)."""
    return [b for b in BACKGROUNDS if set(colors) <= set(allowed_colors(b))]


def _combinations() -> list[tuple[str, str, tuple[str, str]]]:
    found = []
    for class_word in SHAPES:
        for pattern in PATTERNS:
            for body in COLORS:
                for detail in COLORS:
                    colors = (body, detail)
                    contrast = abs(gray_level(COLORS[body]) - gray_level(COLORS[detail]))
                    if (body != detail and contrast >= MIN_DETAIL_CONTRAST and composite_backgrounds(colors)
                            and not is_evaluation_subject(class_word, pattern, colors)):
                        found.append((class_word, pattern, colors))
    return found


COMBINATIONS = _combinations()


def random_subject(seed: int) -> Subject:
    """Composite subject number `seed` (a combination drawn uniformly)."""
    class_word, pattern, colors = COMBINATIONS[np.random.default_rng([int(seed), 7]).integers(len(COMBINATIONS))]
    return Subject(f"composite_{class_word}_{pattern}_{colors[0]}_{colors[1]}", class_word, colors,
                   composite_backgrounds(colors)[0], PATTERNS[pattern], True,
                   f"a {colors[0]} {class_word} with a {colors[1]} {pattern}")


def composite_image(subject: Subject, background: str, rng: np.random.Generator,
                    size: int = REFERENCE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: `subject` alone on `background`, placed as subject_images places."""
    if background not in composite_backgrounds(subject.colors):
        raise ValueError(f"{subject.name} cannot be drawn on a {background} background (allowed: "
                         f"{composite_backgrounds(subject.colors)})")
    size = check_image_size(size)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[background]
    draw_subject(image, subject, subject.colors, scale=size / REFERENCE_SIZE,
                 **sample_placement(rng, SUBJECT_SIZE_RANGE))
    return image


class CompositeSubjectDataset(Dataset):
    """Item k: composite subject number first_seed + k, seen twice on two backgrounds it may
    be drawn on, at two placements: {"reference": the view the encoder reads, (3, R, R) in
    [0, 1]; "pixel_values": the view to denoise, (3, R, R) in [-1, 1]; "text": its prompt,
    "a sks square on a black background"; "class_word"; "index"}."""

    def __init__(self, first_seed: int, length: int, token: str = "sks", size: int = REFERENCE_SIZE):
        if length < 1:
            raise ValueError(f"length={length}: a composite-subject set needs at least one item")
        self.first_seed, self.length, self.token = int(first_seed), int(length), token
        self.size = check_image_size(size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        seed = self.first_seed + index
        subject = random_subject(seed)
        rng = np.random.default_rng([seed, 11])
        backgrounds = composite_backgrounds(subject.colors)
        reference_background, target_background = (backgrounds[i] for i in rng.integers(len(backgrounds), size=2))
        reference = composite_image(subject, reference_background, rng, self.size)
        target = composite_image(subject, target_background, rng, self.size)
        return {"reference": torch.from_numpy(reference).permute(2, 0, 1).float() / 255,
                "pixel_values": torch.from_numpy(target).permute(2, 0, 1).float() / 127.5 - 1,
                "text": instance_prompt(self.token, subject.class_word, target_background),
                "class_word": subject.class_word, "index": index}
