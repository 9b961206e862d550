"""What an edit optimizes and how it is scored, behind one small interface:

    objective.prepare(neutral)          once per neutral image (N, 3, H, W) in [0, 1]
    objective.loss(edited) -> dict      "loss" = content_weight * "content" + "direction"
    objective.scores(edited) -> dict    per-image figures (numpy), higher is better

`ShapesObjective`: the shapes world's oracles. The direction term asks the classifier
to read the attribute prompt's labels (cross-entropy of its per-pixel colour or kind
map, over the pixels that showed the neutral prompt's label; see Change); the content term compares
the segmenter's foreground masks (soft IoU: sum min / sum max) or the classifier's features.
`ClipObjective`: the paper's losses on real models, the directional CLIP loss
1 - cos(E_I(edited) - E_I(neutral), E_T(attribute) - E_T(neutral)) and a perceptual
content loss (VGG-16 features, or LPIPS), both from local weights.
"""

from __future__ import annotations

import logging
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
    """One attribute the attribute prompt changes: pixels the neutral image shows as
    colour class `source` (of the classifier's colour map: BACKGROUNDS, then COLORS)
    should read class `target` of map `head` ("color_map", or "kind_map" over SEG_CLASSES),
    among the classes `group` (start, stop) of its kind: a background among backgrounds,
    a shape colour among shape colours, a kind among kinds. Reading within the group
    makes the term indifferent to area: a square drawn inside a circle's footprint
    leaves some of the circle's pixels black, and those should not count as failing to
    be square (they are the content term's business)."""

    head: str
    source: int
    target: int
    group: tuple[int, int]
    label: str


def caption_changes(neutral: str, attribute: str) -> tuple[list[Change], dict]:
    """The changes from one shapes-world caption to another with the same shapes, and the
    labels each caption asks for. Captions off the shapes-world grammar raise ValueError."""
    (shapes_n, bg_n), (shapes_a, bg_a) = parse_caption(neutral), parse_caption(attribute)
    if len(shapes_n) != len(shapes_a):
        raise ValueError(f"prompt and attribute name {len(shapes_n)} and {len(shapes_a)} shapes: an attribute "
                         "edit keeps the shapes and changes their colour or kind, or the background")
    changes, backgrounds, colors, kinds = [], (0, len(_BG)), (len(_BG), len(_BG) + len(_COLORS)), (1, 1 + len(SHAPES))
    if bg_n != bg_a:
        changes.append(Change("color_map", _BG.index(bg_n), _BG.index(bg_a), backgrounds,
                              f"background {bg_n} -> {bg_a}"))
    for (color_n, kind_n), (color_a, kind_a) in zip(shapes_n, shapes_a):
        source = len(_BG) + _COLORS.index(color_n)
        if color_n != color_a:
            changes.append(Change("color_map", source, len(_BG) + _COLORS.index(color_a), colors,
                                  f"{kind_n} {color_n} -> {color_a}"))
        if kind_n != kind_a:
            changes.append(Change("kind_map", source, 1 + SHAPES.index(kind_a), kinds,
                                  f"{color_n} {kind_n} -> {kind_a}"))
    if not changes:
        raise ValueError(f"prompt and attribute are the same scene ({neutral!r}): nothing to edit")
    return changes, {"neutral": (shapes_n, bg_n), "attribute": (shapes_a, bg_a)}


def straight_through_clamp(images: torch.Tensor) -> torch.Tensor:
    """Clamped to [0, 1] in the forward pass, identity in the backward pass: a black
    background decodes to slightly negative values, and a plain clamp would cut the
    gradient exactly where a background edit must act."""
    return images + (images.clamp(0, 1) - images).detach()


class ShapesObjective:
    """Edits of the shapes world scored by its oracles (classifier and segmenter)."""

    def __init__(self, neutral: str, attribute: str, content: str = "masks", content_weight: float = 1.0,
                 oracle_path=DEFAULT_PATH, device="cpu"):
        if content not in ("masks", "features"):
            raise ValueError(f"content={content!r}: choose masks (segmenter) or features (classifier)")
        self.changes, self.labels = caption_changes(neutral, attribute)
        self.content, self.content_weight = content, content_weight
        self.classifier = load_oracle("classifier", oracle_path, device).requires_grad_(False)
        self.segmenter = load_oracle("segmenter", oracle_path, device).requires_grad_(False)
        self.kinds_change = any(c.head == "kind_map" for c in self.changes)

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
            self.weights = [colors[:, change.source] for change in self.changes]  # (N, H, W) each

    def loss(self, edited: torch.Tensor) -> dict[str, torch.Tensor]:
        read = self._read(edited)
        direction = 0
        for change, weight in zip(self.changes, self.weights):
            start, stop = change.group
            nll = -read[change.head][:, start:stop].log_softmax(1)[:, change.target - start]
            direction = direction + (weight * nll).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1e-6)
        if self.content == "masks":
            a, b = read["foreground"], self.reference["foreground"]
            content = 1 - torch.minimum(a, b).sum((1, 2)) / torch.maximum(a, b).sum((1, 2)).clamp_min(1e-6)
        else:
            content = 1 - F.cosine_similarity(read["features"], self.reference["features"], dim=1)
        content, direction = content.mean(), direction.mean()
        return {"loss": self.content_weight * content + direction, "content": content, "direction": direction}

    @torch.no_grad()
    def scores(self, edited: torch.Tensor) -> dict[str, np.ndarray]:
        """Per image: success (the classifier reads every changed attribute), content_iou
        (IoU of the segmenter's foreground masks, neutral vs edited), count_kept, kind_kept
        (NaN when the edit changes a kind) and neutral_ok (the neutral image shows what its
        prompt asks for)."""
        edited = edited.clamp(0, 1)
        pred, ref = self.classifier.predict(edited), self.classifier.predict(self.neutral.clamp(0, 1))
        success = np.ones(len(edited), bool)
        neutral_ok = np.ones(len(edited), bool)
        (shapes_n, bg_n), (shapes_a, bg_a) = self.labels["neutral"], self.labels["attribute"]
        if bg_n != bg_a:
            success &= pred["background"] == _BG.index(bg_a)
        neutral_ok &= ref["background"] == _BG.index(bg_n)
        for (color_n, kind_n), (color_a, kind_a) in zip(shapes_n, shapes_a):
            neutral_ok &= ref["pairs"][:, PAIRS.index((color_n, kind_n))]
            if (color_n, kind_n) != (color_a, kind_a):
                success &= pred["pairs"][:, PAIRS.index((color_a, kind_a))]
                success &= ~pred["pairs"][:, PAIRS.index((color_n, kind_n))]
        masks = self.segmenter.predict(edited) > 0
        reference = self.segmenter.predict(self.neutral.clamp(0, 1)) > 0
        union = (masks | reference).sum((1, 2))
        iou = np.where(union > 0, (masks & reference).sum((1, 2)) / np.maximum(union, 1), 1.0)
        kind_kept = (pred["kinds"] == ref["kinds"]).all(1).astype(float)
        return {"success": success.astype(float), "content_iou": iou.astype(float),
                "count_kept": (pred["count"] == ref["count"]).astype(float),
                "kind_kept": np.full(len(edited), np.nan) if self.kinds_change else kind_kept,
                "neutral_ok": neutral_ok.astype(float)}


class ClipObjective:
    """The paper's losses: directional CLIP + content_weight x perceptual (0.05 in the paper)."""

    def __init__(self, neutral: str, attribute: str, clip_model: str, perceptual: str | None,
                 lpips: str | None = None, content_weight: float = 0.05, device="cpu"):
        if not perceptual:
            raise ValueError("clip_model= needs perceptual=<VGG-16 weights> (torchvision's vgg16-397923af.pth; "
                             "add lpips=<lpips vgg.pth> for LPIPS) for the content term")
        self.model, processor = load_clip(clip_model)
        self.model.to(device).requires_grad_(False)
        self.distance = PerceptualDistance(perceptual, lpips).to(device)
        self.content_weight, self.clip_model, self.prompts = content_weight, clip_model, (neutral, attribute)
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
        direction, content = (1 - cosine).mean(), content.mean()
        return {"loss": self.content_weight * content + direction, "content": content, "direction": direction}

    @torch.no_grad()
    def scores(self, edited: torch.Tensor) -> dict[str, np.ndarray]:
        """Per image: clip_direction (the cosine the loss raises), clip_attribute (cosine of
        the edited image to the attribute prompt) and perceptual distance to the neutral."""
        cosine, content, embedding = self._parts(edited)
        return {"clip_direction": cosine.cpu().numpy(), "clip_attribute": (embedding @ self.text[1]).cpu().numpy(),
                "perceptual_distance": content.cpu().numpy()}


def build_objective(neutral: str, attribute: str, clip_model: str | None = None, perceptual: str | None = None,
                    lpips: str | None = None, content: str = "masks", content_weight: float | None = None,
                    oracle_path=DEFAULT_PATH, device="cpu", resolution: int = IMAGE_SIZE):
    """ClipObjective when `clip_model` is given, else ShapesObjective (shapes-world captions
    on a model that draws the oracles' 64 px images)."""
    if clip_model:
        return ClipObjective(neutral, attribute, clip_model, perceptual, lpips,
                             0.05 if content_weight is None else content_weight, device)
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
