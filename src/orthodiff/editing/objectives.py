"""What an edit optimizes and how it is scored, behind one small interface:

    objective.prepare(neutral)          once per neutral image (N, 3, H, W) in [0, 1]
    objective.loss(edited) -> dict      per image (N,): "loss" = content_weight * "content" + "direction"
    objective.passed(edited) -> array   per image: is the edit made
    objective.direction_mark            the learner stops at a made edit whose direction term is at most this
    objective.scores(edited) -> dict    per-image figures (numpy), higher is better

`ShapesObjective`: the shapes world's oracles. The direction term asks the classifier
to read the attribute prompt's labels (cross-entropy of its per-pixel colour or kind
map, over the pixels that showed the neutral prompt's label; see Change); the content term compares
the segmenter's foreground masks (soft IoU: sum min / sum max) or the classifier's features;
an edit passes when the classifier reads it (scores' success).
`ClipObjective`: the paper's losses on real models, the directional CLIP loss
1 - cos(E_I(edited) - E_I(neutral), E_T(attribute) - E_T(neutral)) and a perceptual
content loss (VGG-16 features, or LPIPS), both from local weights; an edit passes when
the directional cosine reaches `pass_cosine`, if one is given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from orthodiff.data.shapes import BACKGROUNDS, COLORS, SHAPES
from orthodiff.editing.perceptual import PerceptualDistance
from orthodiff.eval.image_metrics import load_clip, parse_caption
from orthodiff.eval.oracles import DEFAULT_PATH, IMAGE_SIZE, PAIRS, load_oracle

log = logging.getLogger(__name__)
_BG, _COLORS = list(BACKGROUNDS), list(COLORS)


@dataclass(frozen=True)
class Change:
    """One attribute the attribute prompt changes (`what`: background, colour, kind, or
    count). Pixels the neutral image shows as colour class `source` (of the classifier's
    colour map: BACKGROUNDS, then COLORS) should read class `target` of map `head`
    ("color_map", or "kind_map" over SEG_CLASSES), among the classes `group` (start, stop)
    of its kind: a background among backgrounds, a shape colour among shape colours, a kind
    among kinds, a dropped shape's colour among all colours. Reading within the group
    makes the term indifferent to area: a square drawn inside a circle's footprint
    leaves some of the circle's pixels black, and those should not count as failing to
    be square (they are the content term's business). An added shape (head "add") has no
    pixels to start from: colour class `target` and kind class `kind` should be read
    somewhere, on the ADD_PIXELS pixels most likely to show that colour."""

    what: str
    head: str
    source: int
    target: int
    group: tuple[int, int]
    label: str
    kind: int = 0


ADD_PIXELS = 60  # twice the classifier's min_pixels: enough for it to count a shape


def caption_changes(neutral: str, attribute: str) -> tuple[list[Change], dict]:
    """The changes from one shapes-world caption to another, and the labels each caption
    asks for: the same shapes with other colours, kinds or background, or (a count edit)
    the same list with shapes added or dropped at its end. Captions off the shapes-world
    grammar raise ValueError, and so does an attribute prompt that names the neutral scene."""
    (shapes_n, bg_n), (shapes_a, bg_a) = parse_caption(neutral), parse_caption(attribute)
    changes, backgrounds, colors, kinds = [], (0, len(_BG)), (len(_BG), len(_BG) + len(_COLORS)), (1, 1 + len(SHAPES))
    if len(shapes_n) != len(shapes_a):
        short = min(len(shapes_n), len(shapes_a))
        if shapes_n[:short] != shapes_a[:short] or bg_n != bg_a:
            raise ValueError(f"prompt and attribute name {len(shapes_n)} and {len(shapes_a)} shapes: an attribute "
                             "edit keeps the shapes and changes their colour or kind, or the background; a count "
                             "edit adds or drops shapes at the end of the list and changes nothing else")
        for color, kind in shapes_a[short:]:
            changes.append(Change("count", "add", -1, len(_BG) + _COLORS.index(color), colors,
                                  f"add a {color} {kind}", 1 + SHAPES.index(kind)))
        for color, kind in shapes_n[short:]:
            changes.append(Change("count", "color_map", len(_BG) + _COLORS.index(color), _BG.index(bg_a),
                                  (0, len(_BG) + len(_COLORS)), f"drop the {color} {kind}"))
    if bg_n != bg_a:
        changes.append(Change("background", "color_map", _BG.index(bg_n), _BG.index(bg_a), backgrounds,
                              f"background {bg_n} -> {bg_a}"))
    for (color_n, kind_n), (color_a, kind_a) in zip(shapes_n, shapes_a):
        source = len(_BG) + _COLORS.index(color_n)
        if color_n != color_a:
            changes.append(Change("colour", "color_map", source, len(_BG) + _COLORS.index(color_a), colors,
                                  f"{kind_n} {color_n} -> {color_a}"))
        if kind_n != kind_a:
            changes.append(Change("kind", "kind_map", source, 1 + SHAPES.index(kind_a), kinds,
                                  f"{color_n} {kind_n} -> {kind_a}"))
    if not changes:
        raise ValueError(f"prompt and attribute are the same scene ({neutral!r}): nothing to edit; give the prompt "
                         "with one attribute changed")
    return changes, {"neutral": (shapes_n, bg_n), "attribute": (shapes_a, bg_a)}


def straight_through_clamp(images: torch.Tensor) -> torch.Tensor:
    """Clamped to [0, 1] in the forward pass, identity in the backward pass: a black
    background decodes to slightly negative values, and a plain clamp would cut the
    gradient exactly where a background edit must act."""
    return images + (images.clamp(0, 1) - images).detach()


class ShapesObjective:
    """Edits of the shapes world scored by its oracles (classifier and segmenter)."""

    # The learner stops once an edit passes with the new label's probability, a geometric
    # mean over the pixels that showed the old one, at least 1/2: made in place. Passing
    # alone is not enough: on tiny SD v3 (20 steps) the red -> green edit at k=1 passes on seed 1 with
    # a direction term of 10 (the green circle is drawn elsewhere, content IoU 0.47).
    direction_mark = math.log(2)

    def __init__(self, neutral: str, attribute: str, content: str = "masks", content_weight: float = 1.0,
                 oracle_path=DEFAULT_PATH, device="cpu"):
        if content not in ("masks", "features"):
            raise ValueError(f"content={content!r}: choose masks (segmenter) or features (classifier)")
        self.changes, self.labels = caption_changes(neutral, attribute)
        self.content, self.content_weight = content, content_weight
        self.classifier = load_oracle("classifier", oracle_path, device).requires_grad_(False)
        self.segmenter = load_oracle("segmenter", oracle_path, device).requires_grad_(False)

    def describe(self) -> str:
        return "shapes oracles: " + "; ".join(c.label for c in self.changes)

    def _read(self, images: torch.Tensor) -> dict:
        images = straight_through_clamp(images)
        out = self.classifier(images)
        foreground = 1 - self.segmenter(images).softmax(1)[:, 0]
        return {"color_map": out["color_map"], "kind_map": out["kind_map"], "foreground": foreground,
                "features": torch.cat([out["bottleneck"].mean((2, 3)), out["bottleneck"].amax((2, 3))], 1)}

    def prepare(self, neutral: torch.Tensor) -> None:
        with torch.no_grad():
            self.neutral = neutral.detach()
            self.reference = self._read(self.neutral)
            colors = self.reference["color_map"].softmax(1)
            self.weights = [colors[:, change.source] for change in self.changes]  # (N, H, W) each; unused by "add"

    def loss(self, edited: torch.Tensor) -> dict[str, torch.Tensor]:
        read = self._read(edited)
        direction = 0
        for change, weight in zip(self.changes, self.weights):
            start, stop = change.group
            if change.head == "add":
                color = read["color_map"].log_softmax(1)[:, change.target].flatten(1)
                kind = read["kind_map"][:, 1:].log_softmax(1)[:, change.kind - 1].flatten(1)
                where = color.topk(ADD_PIXELS, dim=1).indices
                direction = direction - (color.gather(1, where) + kind.gather(1, where)).mean(1)
                continue
            nll = -read[change.head][:, start:stop].log_softmax(1)[:, change.target - start]
            direction = direction + (weight * nll).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1e-6)
        if self.content == "masks":
            a, b = read["foreground"], self.reference["foreground"]
            content = 1 - torch.minimum(a, b).sum((1, 2)) / torch.maximum(a, b).sum((1, 2)).clamp_min(1e-6)
        else:
            content = 1 - F.cosine_similarity(read["features"], self.reference["features"], dim=1)
        return {"loss": self.content_weight * content + direction, "content": content, "direction": direction}

    def _success(self, pred: dict) -> np.ndarray:
        """The classifier reads the attribute prompt's scene where it differs from the neutral
        one: the new background, every changed or added (colour, kind) shape and not the
        neutral's shape it replaced, and the attribute prompt's shape count."""
        (shapes_n, bg_n), (shapes_a, bg_a) = self.labels["neutral"], self.labels["attribute"]
        success = np.ones(len(pred["count"]), bool)
        if bg_n != bg_a:
            success &= pred["background"] == _BG.index(bg_a)
        for pair in set(shapes_a) - set(shapes_n):
            success &= pred["pairs"][:, PAIRS.index(pair)]
        for pair in set(shapes_n) - set(shapes_a):
            success &= ~pred["pairs"][:, PAIRS.index(pair)]
        if len(shapes_n) != len(shapes_a):
            success &= pred["count"] == len(shapes_a)
        return success

    def _reads(self, change: Change, pred: dict) -> np.ndarray:
        """Whether the classifier reads one change alone (the new background, colour or kind
        anywhere; an added shape present, a dropped one gone)."""
        if change.what == "background":
            return pred["background"] == change.target
        if change.what == "colour":
            return pred["colors"][:, change.target - len(_BG)]
        if change.what == "kind":
            return pred["kinds"][:, change.target - 1]
        if change.head == "add":
            return pred["pairs"][:, PAIRS.index((_COLORS[change.target - len(_BG)], SHAPES[change.kind - 1]))]
        return ~pred["colors"][:, change.source - len(_BG)]

    @torch.no_grad()
    def passed(self, edited: torch.Tensor) -> np.ndarray:
        """Per image: the edit is made (scores' success)."""
        return self._success(self.classifier.predict(edited.clamp(0, 1)))

    @torch.no_grad()
    def scores(self, edited: torch.Tensor) -> dict[str, np.ndarray]:
        """Per image: success (the classifier reads every change, see _success), content_iou
        (IoU of the segmenter's foreground masks, neutral vs edited; below 1 for a perfect
        kind or count edit), count_kept, kind_kept (NaN when the edit changes a kind or the
        count), neutral_ok (the neutral image shows what its prompt asks for) and, for an
        attribute prompt that changes several things at once, "reads <change>" for each."""
        edited = edited.clamp(0, 1)
        pred, ref = self.classifier.predict(edited), self.classifier.predict(self.neutral.clamp(0, 1))
        shapes_n, bg_n = self.labels["neutral"]
        neutral_ok = ref["background"] == _BG.index(bg_n)
        for pair in shapes_n:
            neutral_ok &= ref["pairs"][:, PAIRS.index(pair)]
        masks = self.segmenter.predict(edited) > 0
        reference = self.segmenter.predict(self.neutral.clamp(0, 1)) > 0
        union = (masks | reference).sum((1, 2))
        iou = np.where(union > 0, (masks & reference).sum((1, 2)) / np.maximum(union, 1), 1.0)
        kind_kept = (pred["kinds"] == ref["kinds"]).all(1).astype(float)
        changes_kinds = any(c.what in ("kind", "count") for c in self.changes)
        scores = {"success": self._success(pred).astype(float), "content_iou": iou.astype(float),
                  "count_kept": (pred["count"] == ref["count"]).astype(float),
                  "kind_kept": np.full(len(edited), np.nan) if changes_kinds else kind_kept,
                  "neutral_ok": neutral_ok.astype(float)}
        if len(self.changes) > 1:
            scores.update({f"reads {c.label}": self._reads(c, pred).astype(float) for c in self.changes})
        return scores


class ClipObjective:
    """The paper's losses: directional CLIP + content_weight x perceptual (0.05 in the paper)."""

    def __init__(self, neutral: str, attribute: str, clip_model: str, perceptual: str | None,
                 lpips: str | None = None, content_weight: float = 0.05, device="cpu",
                 pass_cosine: float | None = None):
        if not perceptual:
            raise ValueError("clip_model= needs perceptual=<VGG-16 weights> (torchvision's vgg16-397923af.pth; "
                             "add lpips=<lpips vgg.pth> for LPIPS) for the content term")
        self.model, processor = load_clip(clip_model)
        self.model.to(device).requires_grad_(False)
        self.distance = PerceptualDistance(perceptual, lpips).to(device)
        self.content_weight, self.clip_model, self.prompts = content_weight, clip_model, (neutral, attribute)
        self.pass_cosine = pass_cosine
        self.direction_mark = -math.inf if pass_cosine is None else 1 - pass_cosine  # direction = 1 - cosine
        image_processor = processor.image_processor
        crop = getattr(image_processor, "crop_size", None) or image_processor.size
        self.size = (crop["height"], crop["width"]) if "height" in crop else (crop["shortest_edge"],) * 2
        self.mean = torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1)
        with torch.no_grad():
            tokens = processor.tokenizer([neutral, attribute], padding=True, return_tensors="pt").to(device)
            text = self.model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        self.text = F.normalize(text, dim=-1)
        self.text_direction = self.text[1] - self.text[0]
        if self.text_direction.norm() < 1e-6:
            raise ValueError(f"prompt and attribute {attribute!r} have the same CLIP text embedding: there is no "
                             "direction to edit along; give the prompt with one attribute changed")

    def describe(self) -> str:
        kind = "LPIPS" if self.distance.lins is not None else "VGG-16"
        return f"directional CLIP ({self.clip_model}) + {self.content_weight} x {kind} perceptual"

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        images = F.interpolate(straight_through_clamp(images), size=self.size, mode="bilinear", antialias=True,
                               align_corners=False)
        return F.normalize(self.model.get_image_features((images - self.mean) / self.std), dim=-1)

    def prepare(self, neutral: torch.Tensor) -> None:
        with torch.no_grad():
            self.neutral = neutral.detach()
            self.neutral_embedding = self._embed(self.neutral)

    def _parts(self, edited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self._embed(edited)
        cosine = F.cosine_similarity(embedding - self.neutral_embedding, self.text_direction[None], dim=1)
        return cosine, self.distance(straight_through_clamp(edited), self.neutral), embedding

    def loss(self, edited: torch.Tensor) -> dict[str, torch.Tensor]:
        cosine, content, _ = self._parts(edited)
        direction = 1 - cosine
        return {"loss": self.content_weight * content + direction, "content": content, "direction": direction}

    @torch.no_grad()
    def passed(self, edited: torch.Tensor) -> np.ndarray:
        """Per image: the directional cosine reaches pass_cosine. Without one, CLIP has no
        mark of a made edit, and the learner runs to its cap keeping the lowest loss."""
        if self.pass_cosine is None:
            return np.zeros(len(edited), bool)
        return self._parts(edited)[0].cpu().numpy() >= self.pass_cosine

    @torch.no_grad()
    def scores(self, edited: torch.Tensor) -> dict[str, np.ndarray]:
        """Per image: clip_direction (the cosine the loss raises), clip_attribute (cosine of
        the edited image to the attribute prompt) and perceptual distance to the neutral."""
        cosine, content, embedding = self._parts(edited)
        return {"clip_direction": cosine.cpu().numpy(), "clip_attribute": (embedding @ self.text[1]).cpu().numpy(),
                "perceptual_distance": content.cpu().numpy()}


def build_objective(neutral: str, attribute: str, clip_model: str | None = None, perceptual: str | None = None,
                    lpips: str | None = None, content: str = "masks", content_weight: float | None = None,
                    oracle_path=DEFAULT_PATH, device="cpu", resolution: int = IMAGE_SIZE,
                    pass_cosine: float | None = None):
    """ClipObjective when `clip_model` is given, else ShapesObjective (shapes-world captions
    on a model that draws the oracles' 64 px images)."""
    if clip_model:
        return ClipObjective(neutral, attribute, clip_model, perceptual, lpips,
                             0.05 if content_weight is None else content_weight, device, pass_cosine)
    need = "need clip_model= and perceptual= (the paper's CLIP + VGG losses)"
    for prompt in (neutral, attribute):
        try:
            parse_caption(prompt)
        except ValueError as error:
            raise ValueError(f"{error}. Prompts outside the shapes world {need}") from None
    if resolution != IMAGE_SIZE:
        raise ValueError(f"the shapes-world oracles read {IMAGE_SIZE} px images and this model draws {resolution} px: "
                         f"edits on it {need}")
    return ShapesObjective(neutral, attribute, content, 1.0 if content_weight is None else content_weight,
                           oracle_path, device)
