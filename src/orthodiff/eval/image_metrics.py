"""Image quality (FID, KID) and prompt alignment (CLIP score, shapes-world recognition).

FID and KID are torchmetrics' implementations with a pluggable feature extractor, and
every result names the extractor, since numbers from different feature spaces are not
comparable:

    "shapes"     the shapes-world classifier oracle's `features` (295-d, assets/oracles):
                 the FID feature space of this project's tiny experiments
    "inception"  torchmetrics' FID Inception-v3 (2048-d pool features): the papers' FID.
                 Needs the torch-fidelity package and its weights file INCEPTION_WEIGHTS,
                 which nothing here downloads at run time (see `inception_extractor`)

    image_quality(real, generated)              -> {"fid", "kid_mean", "kid_std", ...}
    ImageQuality(...).update(images, real=...)  the same, accumulated batch by batch

Images are float (N, 3, H, W) in [0, 1] (or uint8 (N, H, W, 3) arrays, which
`images_to_tensor` converts), as the oracles take them.

Prompt alignment: `clip_score` (torchmetrics' CLIPScore on a local or cached CLIP
model) and, on the shapes world, `prompt_alignment`: how often the classifier oracle
finds the shape kinds, colours and background a caption asks for, with the labels read
from the caption itself (`caption_labels`), since an evaluator has only the prompts.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal import CLIPScore

from orthodiff.data.shapes import BACKGROUNDS, COLORS, SHAPES
from orthodiff.eval.oracles import DEFAULT_PATH, IMAGE_SIZE, images_to_tensor, load_oracle, scene_labels

EXTRACTORS = ("shapes", "inception")
# torch-fidelity's FID Inception (TF 2015-12-05 weights converted to PyTorch); torch.hub
# caches it under <torch.hub.get_dir()>/checkpoints/ when downloaded.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_WEIGHTS)
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def unit_images(images) -> torch.Tensor:
    """float (N, 3, H, W) in [0, 1]; uint8 (N, H, W, 3) arrays are converted."""
    if not torch.is_tensor(images):
        images = images_to_tensor(images)
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images (N, 3, H, W) in [0, 1], got {images.dtype} "
                         f"{tuple(images.shape)} (images_to_tensor converts uint8 arrays)")
    low, high = images.min().item(), images.max().item()
    if low < -1e-3 or high > 1 + 1e-3:  # tolerate rounding, not a [-1, 1] or 0-255 convention
        raise ValueError(f"expected images in [0, 1], got values in [{low:.3f}, {high:.3f}]"
                         " (for [-1, 1] images pass (x + 1) / 2)")
    return images.clamp(0, 1)


class ShapesFeatures(nn.Module):
    """The classifier oracle's features as a torchmetrics `feature=` module. torchmetrics
    hands a custom module exactly what `update` gets (its `normalize` flag only converts
    images for its own Inception), so this takes float images in [0, 1], resized to the
    oracle's 64 px when they are another size. `num_features` spares torchmetrics its
    probe with a random 299 px uint8 image, which the oracle would reject."""

    def __init__(self, oracle_path=DEFAULT_PATH):
        super().__init__()
        self.classifier = load_oracle("classifier", oracle_path)
        blank = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        self.num_features = self.classifier.features(blank).shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE),
                                   mode="bilinear", antialias=True, align_corners=False)
        return self.classifier.features(images.clamp(0, 1))


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 (2048-d pool features) behind the same float [0, 1]
    interface, so it also serves KID: KernelInceptionDistance has no weights-path
    argument, so only a module built here can give KID local weights."""

    num_features = 2048

    def __init__(self, weights=None):
        super().__init__()
        self.inception = inception_extractor(weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # torchmetrics' own conversion with normalize=True (truncation, not rounding), so
        # numbers match FrechetInceptionDistance(normalize=True) on the same weights.
        return self.inception((images * 255).byte())


def inception_extractor(weights=None) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 with the 2048-d features, from `weights` (a path
    to INCEPTION_WEIGHTS), else from torch.hub's cache, else torchmetrics' default (a
    download, which fails offline). Without the file it raises FileNotFoundError saying
    how to provide it; without torch-fidelity, ModuleNotFoundError."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    how = (f"FID needs torch-fidelity's Inception weights {INCEPTION_WEIGHTS} "
           f"({INCEPTION_URL}; pytorch-fid's {PYTORCH_FID_WEIGHTS} has the same hash). "
           f"Pass its path (weights=..., the config value), or run once with network access "
           f"so that torch.hub caches it in {checkpoints}; or use extractor='shapes'.")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"Inception weights file {weights} not found. {how}")
    if weights is None:
        cached = [checkpoints / name for name in (INCEPTION_WEIGHTS, PYTORCH_FID_WEIGHTS)
                  if (checkpoints / name).is_file()]
        weights = cached[0] if cached else None
    try:
        import torch_fidelity  # noqa: F401  (NoTrainInceptionV3 is an empty shell without it)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise ModuleNotFoundError("extractor='inception' needs the torch-fidelity package: "
                                  "pip install torch-fidelity (keeping the installed torch; "
                                  "an unpinned install may upgrade it)") from None
    path = None if weights is None else str(weights)
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=path)
    except OSError as error:  # offline, the URL is gone, or the file is unreadable
        action = "download" if path is None else f"read {path} for"
        raise FileNotFoundError(f"could not {action} the Inception weights ({error}). "
                                f"{how}") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:  # not a state dict
        raise ValueError(f"{weights} is not the FID Inception state dict ({error}). "
                         f"{how}") from None


def feature_extractor(name: str = "shapes", weights=None) -> nn.Module:
    """The FID/KID feature module `name` (EXTRACTORS); `weights` is the oracle folder for
    "shapes" (default assets/oracles) or the Inception .pth file for "inception"."""
    if name == "shapes":
        return ShapesFeatures(DEFAULT_PATH if weights is None else weights)
    if name == "inception":
        return InceptionFeatures(weights)
    raise ValueError(f"unknown feature extractor {name!r}: choose from {list(EXTRACTORS)}")


class _Precomputed(nn.Identity):
    """The metrics' `feature=` when ImageQuality has already extracted the features, so
    FID and KID share one forward pass of the extractor."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


class ImageQuality:
    """FID and KID of generated against real images, fed batch by batch: only features
    are kept (FID keeps sums, KID every feature vector, 2048 or 295 floats an image)."""

    def __init__(self, extractor: str = "shapes", weights=None, kid_subset_size: int = 1000,
                 kid_subsets: int = 100, device="cpu", seed: int = 0):
        self.extractor, self.device, self.seed = extractor, device, seed
        self.features = feature_extractor(extractor, weights).to(device).eval()
        self.num_features = int(self.features.num_features)
        self.fid = FrechetInceptionDistance(feature=_Precomputed(self.num_features)).to(device)
        with warnings.catch_warnings():  # "KID saves all features": intended, see above
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(feature=_Precomputed(self.num_features),
                                               subsets=kid_subsets,
                                               subset_size=kid_subset_size).to(device)
        self.kid_subset_size = kid_subset_size

    def update(self, images, real: bool) -> None:
        with torch.no_grad():
            features = self.features(unit_images(images).to(self.device))
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def compute(self) -> dict:
        """{"fid", "kid_mean", "kid_std", "fid_extractor" (the feature space of all three),
        "num_features", "n_real", "n_generated", "kid_subset_size", "kid_subsets"}, plus
        "kid_note" when there were fewer images than kid_subset_size."""
        n_real = int(self.fid.real_features_num_samples)
        n_generated = int(self.fid.fake_features_num_samples)
        if min(n_real, n_generated) < 2:
            raise ValueError(f"FID and KID need at least 2 real and 2 generated images, got "
                             f"{n_real} real and {n_generated} generated")
        # torchmetrics raises when a KID subset is larger than either set; a smaller
        # subset is a noisier but unbiased estimate, so clamp and say so.
        subset_size = min(self.kid_subset_size, n_real, n_generated)
        self.kid.subset_size = subset_size
        with torch.random.fork_rng(devices=[]):  # KID's random subsets, reproducibly
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        result = {"fid": float(self.fid.compute()), "kid_mean": float(kid_mean),
                  "kid_std": float(kid_std), "fid_extractor": self.extractor,
                  "num_features": self.num_features, "n_real": n_real,
                  "n_generated": n_generated, "kid_subset_size": subset_size,
                  "kid_subsets": self.kid.subsets}
        if subset_size < self.kid_subset_size:
            result["kid_note"] = (f"KID subset size clamped from {self.kid_subset_size} to "
                                  f"{subset_size}: only {n_real} real and {n_generated} "
                                  "generated images")
        return result


def image_quality(real, generated, extractor: str = "shapes", weights=None,
                  kid_subset_size: int = 1000, kid_subsets: int = 100,
                  batch_size: int = 250, device="cpu") -> dict:
    """FID and KID of `generated` against `real` images (see ImageQuality.compute)."""
    quality = ImageQuality(extractor, weights, kid_subset_size, kid_subsets, device)
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), batch_size):
            quality.update(images[start:start + batch_size], real=is_real)
    return quality.compute()


# --- CLIP score ----------------------------------------------------------------------

class _ClipEmbeddings(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected
    embeddings, as torchmetrics 1.9's CLIPScore expects: transformers 5 returns an
    output object (pooler_output is the embedding), which CLIPScore fails on
    (torchmetrics issue #3407, fixed after 1.9)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return pooled_embedding(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return pooled_embedding(self.model.get_text_features(input_ids=input_ids,
                                                             attention_mask=attention_mask))


def pooled_embedding(output):
    """A CLIP model's image or text embedding: transformers 4 returns the tensor, 5 an output
    object holding it as pooler_output (also used by subject_metrics' CLIP evaluator)."""
    return output if torch.is_tensor(output) else output.pooler_output


def load_clip(model_name_or_path):
    """(CLIP model, CLIPProcessor) for CLIPScore from a save_pretrained folder or a hub id
    already in the local cache. CLIPScore itself takes only a few hub ids (any other
    string is "not supported"), but it accepts a callable returning this pair."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(model_name_or_path).eval()
        processor = CLIPProcessor.from_pretrained(model_name_or_path)
    except OSError as error:
        raise FileNotFoundError(
            f"CLIP model {model_name_or_path!r} could not be loaded ({error}). Pass a local "
            "folder with the model and its processor (save_pretrained), or a hub id cached "
            "by an earlier run with network access") from None
    return _ClipEmbeddings(model), processor


def clip_score_metric(model_name_or_path) -> CLIPScore:
    """torchmetrics' CLIPScore (100 * cosine, mean over images, floored at 0) on any CLIP
    model `load_clip` can load; feed it with `clip_update` for the input convention."""
    return CLIPScore(model_name_or_path=lambda: load_clip(model_name_or_path))


def clip_update(metric: CLIPScore, images, captions) -> None:
    """Add a batch: images as everywhere here; CLIP processors rescale by 1/255
    themselves, so they get uint8 pixel values."""
    images = (unit_images(images) * 255).round().to(torch.uint8)
    metric.update(list(images), list(captions))


def clip_score(images, captions, model_name_or_path, batch_size: int = 64) -> dict:
    """{"clip_score": ..., "clip_model": model_name_or_path} of images against captions."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images and {len(captions)} captions")
    metric = clip_score_metric(model_name_or_path)
    for start in range(0, len(images), batch_size):
        clip_update(metric, images[start:start + batch_size], captions[start:start + batch_size])
    return {"clip_score": float(metric.compute()), "clip_model": str(model_name_or_path)}


# --- shapes world: does the classifier see what the caption asks for? ----------------

_CAPTION = re.compile(r"(?P<listed>.+) on an? (?P<background>.+) background")
_SHAPE = re.compile(r"an? (?P<color>\w+) (?P<kind>\w+)")


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], str]:
    """'a red triangle, a blue circle and an orange cross on a white background' ->
    ([("red", "triangle"), ("blue", "circle"), ("orange", "cross")], "white"), the
    inverse of shapes.caption_for. Anything off the grammar raises ValueError."""
    whole = _CAPTION.fullmatch(caption.strip())
    if whole is None or whole["background"] not in BACKGROUNDS:
        raise ValueError(f"not a shapes-world caption (background in {list(BACKGROUNDS)} "
                         f"expected): {caption!r}")
    shapes = []
    for item in re.split(r", | and ", whole["listed"]):
        shape = _SHAPE.fullmatch(item)
        if shape is None or shape["color"] not in COLORS or shape["kind"] not in SHAPES:
            raise ValueError(f"{item!r} in caption {caption!r} is not 'a <colour> <kind>' "
                             f"with a colour in {list(COLORS)} and a kind in {list(SHAPES)}")
        shapes.append((shape["color"], shape["kind"]))
    return shapes, whole["background"]


def caption_labels(captions) -> dict[str, np.ndarray]:
    """Classifier targets read from captions, in oracles.scene_labels' layout (made by
    scene_labels itself, from what each caption says)."""
    described = []
    for caption in captions:
        shapes, background = parse_caption(caption)
        described.append(SimpleNamespace(
            shapes=[{"color": color, "kind": kind} for color, kind in shapes],
            background=background))
    return scene_labels(described)


def prompt_recognition(pred: dict, labels: dict) -> dict:
    """Share of prompted shapes whose kind / colour / (colour, kind) the classifier finds."""
    hits = {}
    for head in ("kinds", "colors", "pairs"):
        prompted = labels[head]
        hits[f"prompted_{head}_recognized"] = float((pred[head] & prompted).sum() / prompted.sum())
    hits["background_recognized"] = float((pred["background"] == labels["background"]).mean())
    hits["count_recognized"] = float((pred["count"] == labels["count"]).mean())
    hits["all_pairs_exact"] = float((pred["pairs"] == labels["pairs"]).all(1).mean())
    return hits


def prompt_alignment(images, captions, classifier=None, batch_size: int = 250) -> dict:
    """prompt_recognition of shapes-world `images` (64 px) against their `captions`, by
    the classifier oracle (loaded from assets/oracles when not given)."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images and {len(captions)} captions")
    classifier = load_oracle("classifier") if classifier is None else classifier
    outputs = [classifier.predict(unit_images(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
    pred = {head: np.concatenate([o[head] for o in outputs]) for head in outputs[0]}
    return prompt_recognition(pred, caption_labels(captions))
