"""Evaluator networks ("oracles") for the shapes world.

They stand in for the real evaluators of the controllable-generation protocol, trained
on the shapes world's exact ground truth (scripts/train_oracles.py makes them):

    segmenter   ShapeSegmenter         SegFormer / UperNet: per-pixel SEG_CLASSES ids
    depth       ShapeDepthEstimator    DPT: per-pixel depth in the dataset's encoding
    keypoints   ShapeKeypointDetector  the landmark detector: 5 landmarks per shape
    classifier  ShapeClassifier        CLIP: which (colour, kind) shapes, background,
                                       count; its `features` are the FID feature space

Input convention, one for all four: float images in [0, 1], shape (N, 3, 64, 64), RGB,
as `images_to_tensor` makes from uint8 (N, 64, 64, 3) arrays. A uint8 tensor or values
outside [0, 1] (a [-1, 1] decoder output, say) raise an error rather than scoring
garbage. The oracles were trained with mild blur, noise and colour jitter, so they also
read the slightly soft images a tiny diffusion model generates.

Each is a diffusers model (`save_pretrained` / `from_pretrained`, a self-describing
folder), and each has a plain `predict` that switches to eval mode and returns numpy.

Landmark slots. The dataset numbers shapes by z-order, but the image shows z-order only
where shapes overlap (two shapes apart from each other can be drawn in either order and
give the same pixels). So the detector returns an unordered set of up to MAX_SHAPES
shapes; it sorts them by its own depth estimate at each centre, which is the z-order
whenever the image determines it, and metrics.landmark_error matches predicted shapes to
true ones before measuring, so the slot order never changes a score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from orthodiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    MAX_SHAPES,
    NUM_LANDMARKS,
    REFERENCE_SIZE,
    SEG_CLASSES,
    SHAPES,
    decode_keypoints,
    shape_depth,
)
from orthodiff.eval.metrics import classifier_scores, depth_rmse, landmark_scores, segmentation_scores
from orthodiff.models.tiny_sd import ASSETS

IMAGE_SIZE = REFERENCE_SIZE
PAIRS = tuple((color, kind) for color in COLORS for kind in SHAPES)  # index c * 4 + k
ORACLES = ("segmenter", "depth", "keypoints", "classifier")
DEFAULT_PATH = ASSETS / "oracles"  # the repository's, whatever the working directory
TRAIN_COMMAND = "python scripts/train_oracles.py"
DEPTH_LEVELS = (1.0,) + tuple(shape_depth(z) for z in range(MAX_SHAPES))  # background first


def images_to_tensor(images) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3) or one (H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1] != 3 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    images = images[None] if images.ndim == 3 else images
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def check_images(images) -> torch.Tensor:
    """The oracles' input, validated: float (N, 3, 64, 64) with values in [0, 1]."""
    if not torch.is_tensor(images):
        raise TypeError(f"expected a float tensor (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) in "
                        f"[0, 1], got {type(images).__name__}; use images_to_tensor")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got {images.dtype}; "
                         "divide uint8 images by 255 (images_to_tensor does)")
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got "
                         f"{tuple(images.shape)}")
    low, high = images.min().item(), images.max().item()
    if low < -1e-3 or high > 1 + 1e-3:  # tolerate rounding, not another convention
        raise ValueError(f"expected images in [0, 1], got values in [{low:.3f}, {high:.3f}]"
                         " (for [-1, 1] images pass (x + 1) / 2)")
    return images


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class _UNet(nn.Module):
    """Two 3x3 convs per level, max-pool down, nearest-neighbour up, skips concatenated.
    Five levels take 64 px to a 4x4 bottleneck, so every output pixel sees the whole
    image: a shape's kind and its depth order are decided by the entire scene."""

    def __init__(self, out_channels: int, widths):
        super().__init__()
        self.down = nn.ModuleList()
        channels = 3
        for width in widths:
            self.down.append(nn.Sequential(_conv(channels, width), _conv(width, width)))
            channels = width
        self.up = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.Sequential(_conv(channels + width, width), _conv(width, width)))
            channels = width
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output map, bottleneck features)."""
        skips = []
        for level, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        bottleneck = x
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0), skip], 1))
        return self.head(x), bottleneck


class _Oracle(ModelMixin, ConfigMixin):
    """Shared by the four: `predict` runs `_predict` on checked images."""

    def _inference(self, function, images):
        """function(images) in eval mode, without gradients, on the model's device and
        dtype; the training flag is restored afterwards."""
        images = check_images(images).to(self.device, self.dtype)
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return function(images)
        finally:
            self.train(training)

    def predict(self, images: torch.Tensor):
        return self._inference(self._predict, images)


class ShapeSegmenter(_Oracle):
    """Per-pixel class over SEG_CLASSES (0 = background, then SHAPES)."""

    @register_to_config
    def __init__(self, widths=(16, 32, 64, 96, 128), num_classes: int = len(SEG_CLASSES)):
        super().__init__()
        self.unet = _UNet(num_classes, tuple(widths))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, 64, 64) in [0, 1] -> class logits (N, num_classes, 64, 64)."""
        return self.unet(images)[0]

    def _predict(self, images):
        return self(images).argmax(1).to(torch.uint8).cpu().numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Images (N, 3, 64, 64) in [0, 1] -> (N, 64, 64) uint8 class ids."""
        return super().predict(images)


class ShapeDepthEstimator(_Oracle):
    """Per-pixel depth as the dataset encodes it: 1.0 background, shapes at 0.8, 0.6, 0.4
    by z-order (nearer is smaller). The network classifies each pixel into these
    DEPTH_LEVELS and reports the expected depth under its probabilities: trained with
    cross-entropy the probabilities are calibrated, so where the image does not show
    the order (shapes that do not overlap can be stacked either way) the expectation is
    the mean over the orders the image allows, which is what minimizes RMSE. (Direct
    regression with squared error learned more slowly: RMSE 0.058 against 0.045 after
    the same 300 steps.)"""

    @register_to_config
    def __init__(self, widths=(16, 32, 64, 96, 128)):
        super().__init__()
        self.unet = _UNet(len(DEPTH_LEVELS), tuple(widths))
        self.register_buffer("levels", torch.tensor(DEPTH_LEVELS), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, 64, 64) in [0, 1] -> logits (N, len(DEPTH_LEVELS), 64, 64)."""
        return self.unet(images)[0]

    def _predict(self, images):
        probabilities = self(images).float().softmax(1)
        return torch.einsum("nkhw,k->nhw", probabilities, self.levels.float()).cpu().numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Images (N, 3, 64, 64) in [0, 1] -> (N, 64, 64) float32 depth in [0.4, 1]."""
        return super().predict(images)


class ShapeKeypointDetector(_Oracle):
    """Landmark detector by dense voting: every pixel predicts whether it shows a shape
    and, if so, that shape's 5 landmarks (offsets from the pixel, in OFFSET_SCALE pixels)
    and depth, hidden landmarks included. Supervising every shape pixel teaches it in a
    few hundred steps; a centre-heatmap detector (CenterNet) found no shapes after 350.

    The maps, their training targets (keypoint_targets) and their decoding by voting
    (decode_keypoints, with `min_votes` and `radius`) live together in
    orthodiff.data.shapes.keypoints."""

    @register_to_config
    def __init__(self, widths=(16, 32, 64, 96, 128), min_votes: int = 20,
                 radius: float = 3.0):
        super().__init__()
        self.unet = _UNet(2 + 2 * NUM_LANDMARKS, tuple(widths))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, 64, 64) in [0, 1] -> maps (N, 2 + 2 * NUM_LANDMARKS, 64, 64):
        shape-pixel logit, depth, then offsets (x0, y0, x1, y1, ...) / OFFSET_SCALE."""
        return self.unet(images)[0]

    def _predict(self, images):
        return decode_keypoints(self(images).float(), self.config.min_votes, self.config.radius)

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 3, 64, 64) in [0, 1] -> landmarks (N, MAX_SHAPES, NUM_LANDMARKS, 2)
        float32 pixel (x, y) and mask (N, MAX_SHAPES, NUM_LANDMARKS) bool. Detected shapes
        come first, sorted deepest first (the z-order where the image shows it); absent
        slots are zeros with mask False. Compare with metrics.landmark_error, which
        matches shapes, not slots."""
        return super().predict(images)


class ShapeClassifier(_Oracle):
    """Scene classifier (the CLIP stand-in): which shapes, colours and background.

    Two per-pixel maps: a U-Net (the segmenter's architecture) gives each pixel a kind
    (SEG_CLASSES), since a kind is a property of a whole shape, and a small network
    (two 3x3 convolutions, then 1x1s) gives it a colour (BACKGROUNDS, then COLORS: a
    background pixel is named by the background's colour). Reading labels off the maps
    uses one rule of the world, that the shapes of a scene have distinct colours: a
    colour covering at least `min_pixels` pixels is one shape, whose kind is the kind
    most of those pixels get. So:

        kinds       (N, 4) bool over SHAPES      which kinds are present
        colors      (N, 6) bool over COLORS      which colours are present
        pairs       (N, 24) bool over PAIRS      which (colour, kind) shapes
        background  (N,) index into BACKGROUNDS  the most common background colour
        count       (N,) int                     how many shapes (colours) are seen

    Learned image-level heads were tried first and dropped: on this budget (a few
    hundred steps on one CPU thread) they learned colours and counts but not which
    colour goes with which kind (24-way pairs 62% exact), while the per-pixel maps learn
    fast and the vote is exact wherever most of a shape's pixels are right.

    `features` is this world's FID feature space (like Inception's pool features): the
    U-Net bottleneck pooled (mean and max) and the log share of the image each kind,
    colour and (colour, kind) pair covers."""

    @register_to_config
    def __init__(self, widths=(16, 32, 64, 96, 128), color_width: int = 24,
                 min_pixels: int = 30):
        super().__init__()
        self.unet = _UNet(len(SEG_CLASSES), tuple(widths))
        self.color_net = nn.Sequential(
            _conv(3, color_width), _conv(color_width, color_width),
            nn.Conv2d(color_width, color_width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(color_width, len(BACKGROUNDS) + len(COLORS), 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images (N, 3, 64, 64) in [0, 1] -> pixel logits "kind_map" (N, 5, 64, 64)
        over SEG_CLASSES, "color_map" (N, 10, 64, 64) over BACKGROUNDS then COLORS, and
        the U-Net's "bottleneck" (N, widths[-1], 4, 4)."""
        kind_map, bottleneck = self.unet(images)
        return {"kind_map": kind_map, "color_map": self.color_net(images),
                "bottleneck": bottleneck}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, 64, 64) in [0, 1] -> (N, 2 * widths[-1] + 5 + 10 + 24) float32
        features, in eval mode without gradients (the FID/KID feature extractor)."""
        return self._inference(self._features, images)

    def _features(self, images):
        out = self(images)
        kind, color = out["kind_map"].softmax(1), out["color_map"].softmax(1)
        # PAIRS order: colour-major, kind-minor; kind class 0 is the background.
        pairs = (color[:, len(BACKGROUNDS):, None] * kind[:, None, 1:]).flatten(1, 2)
        shares = torch.cat([kind.mean((2, 3)), color.mean((2, 3)), pairs.mean((2, 3))], 1)
        # Log shares: a shape is tens of pixels (share ~1e-2), an absent one ~0.
        bottleneck = out["bottleneck"]
        return torch.cat([bottleneck.mean((2, 3)), bottleneck.amax((2, 3)),
                          torch.log(shares + 1e-3)], 1).float()

    def _predict(self, images):
        out = self(images)
        kind = out["kind_map"].argmax(1)  # (N, H, W)
        color = out["color_map"].argmax(1)
        n = len(images)
        votes = torch.zeros(n, len(BACKGROUNDS) + len(COLORS), len(SEG_CLASSES),
                            dtype=torch.long, device=kind.device)
        votes.view(n, -1).scatter_add_(1, (color * len(SEG_CLASSES) + kind).flatten(1),
                                       torch.ones_like(kind.flatten(1)))
        shape_votes = votes[:, len(BACKGROUNDS):, 1:]  # (N, 6, 4): shape colours x kinds
        colors = shape_votes.sum(2) >= self.config.min_pixels
        pairs = torch.zeros_like(shape_votes, dtype=torch.bool)
        pairs.scatter_(2, shape_votes.argmax(2, keepdim=True), colors[:, :, None])
        return {"kinds": pairs.any(1).cpu().numpy(), "colors": colors.cpu().numpy(),
                "pairs": pairs.flatten(1).cpu().numpy(),
                "background": votes[:, :len(BACKGROUNDS)].sum(2).argmax(1).cpu().numpy(),
                "count": colors.sum(1).cpu().numpy()}

    def predict(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Images (N, 3, 64, 64) in [0, 1] -> {"kinds": (N, 4) bool, "colors": (N, 6) bool,
        "pairs": (N, 24) bool, "background": (N,) index into BACKGROUNDS,
        "count": (N,) number of shapes}, the same layout as `scene_labels`."""
        return super().predict(images)


ORACLE_CLASSES = {"segmenter": ShapeSegmenter, "depth": ShapeDepthEstimator,
                  "keypoints": ShapeKeypointDetector, "classifier": ShapeClassifier}


def scene_labels(scenes) -> dict[str, np.ndarray]:
    """Classifier targets of a list of Scenes, in ShapeClassifier.predict's layout."""
    labels = {"kinds": np.zeros((len(scenes), len(SHAPES)), bool),
              "colors": np.zeros((len(scenes), len(COLORS)), bool),
              "pairs": np.zeros((len(scenes), len(PAIRS)), bool),
              "background": np.zeros(len(scenes), np.int64),
              "count": np.zeros(len(scenes), np.int64)}
    colors = list(COLORS)
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            labels["kinds"][i, SHAPES.index(shape["kind"])] = True
            labels["colors"][i, colors.index(shape["color"])] = True
            labels["pairs"][i, PAIRS.index((shape["color"], shape["kind"]))] = True
        labels["background"][i] = list(BACKGROUNDS).index(scene.background)
        labels["count"][i] = len(scene.shapes)
    return labels


def load_oracle(name: str, path=DEFAULT_PATH, device="cpu") -> _Oracle:
    """One oracle from `path`/`name` (a save_pretrained folder), in float32 eval mode."""
    if name not in ORACLE_CLASSES:
        raise ValueError(f"unknown oracle {name!r}: choose from {list(ORACLE_CLASSES)}")
    folder = Path(path) / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"oracle folder {folder} not found (or has no config.json); "
                                f"make it with `{TRAIN_COMMAND} --out {Path(path)}`")
    model = ORACLE_CLASSES[name].from_pretrained(folder, torch_dtype=torch.float32)
    return model.to(device).eval()


def load_oracles(path=DEFAULT_PATH, device="cpu", names=ORACLES) -> dict[str, _Oracle]:
    """{name: oracle} for the shipped evaluators under `path` (assets/oracles)."""
    return {name: load_oracle(name, path, device) for name in names}


def measure(name: str, model: _Oracle, scenes, images: torch.Tensor | None = None,
            batch_size: int = 250) -> dict:
    """Score oracle `name` against the ground truth of `scenes` (a list of Scenes), on
    their own images or on `images` (N, 3, 64, 64) in [0, 1] (degraded copies, say).
    segmenter: segmentation_scores; depth: depth_rmse; keypoints: landmark_scores;
    classifier: classifier_scores."""
    if images is None:
        images = images_to_tensor(np.stack([s.image for s in scenes]))
    outputs = [model.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    if name == "segmenter":
        return segmentation_scores(np.concatenate(outputs), np.stack([s.seg for s in scenes]),
                                   len(SEG_CLASSES))
    if name == "depth":
        return depth_rmse(np.concatenate(outputs), np.stack([s.depth for s in scenes]))
    if name == "keypoints":
        return landmark_scores(np.concatenate([o[0] for o in outputs]),
                               np.concatenate([o[1] for o in outputs]),
                               np.stack([s.landmarks for s in scenes]),
                               np.stack([s.landmark_mask for s in scenes]))
    if name == "classifier":
        pred = {head: np.concatenate([o[head] for o in outputs]) for head in outputs[0]}
        return classifier_scores(pred, scene_labels(scenes))
    raise ValueError(f"unknown oracle {name!r}: choose from {list(ORACLE_CLASSES)}")
