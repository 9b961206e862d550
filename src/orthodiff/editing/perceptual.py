"""Perceptual distances for the content term on real images, built from weights on disk
(no downloads): the paper's VGG-16 feature loss, or LPIPS with its VGG backbone.

    VGG: torchvision's vgg16 state dict (`vgg16-397923af.pth`, keys "features.N.*"; the
         classifier's keys are ignored). Widths are read from the weights.
    LPIPS: the lpips package's linear layers for VGG (`weights/v0.1/vgg.pth`, keys
         "linK.model.1.weight"), on top of the same VGG weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

# torchvision's vgg16().features: 13 convs (ReLU after each), max-pools at these indices.
_POOLS = (4, 9, 16, 23, 30)
_LENGTH = 31
# Slices ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the paper uses the first four).
_BLOCK_ENDS = (4, 9, 16, 23, 30)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


def read_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights {path} not found: pass a local file (no downloads here)")
    try:
        return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                    weights_only=True)
    except Exception as error:  # pickle, zip and safetensors each raise their own types
        raise ValueError(f"{what} weights {path} could not be read ({type(error).__name__}: {error})") from None


def vgg16_features(state: dict[str, torch.Tensor], path="the VGG weights") -> nn.Sequential:
    """torchvision's vgg16().features with the weights of `state`."""
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    layers, index = [], 0
    while index < _LENGTH:
        if index in _POOLS:
            layers.append(nn.MaxPool2d(2, 2))
            index += 1
            continue
        if f"{index}.weight" not in state:
            raise ValueError(f"{path} is not a VGG-16 state dict: no conv weight '{index}.weight' "
                             "(torchvision layout: features.0.weight, features.2.weight, ...)")
        weight = state[f"{index}.weight"]
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
        conv.load_state_dict({"weight": weight, "bias": state[f"{index}.bias"]})
        layers += [conv, nn.ReLU()]
        index += 2
    return nn.Sequential(*layers).eval().requires_grad_(False)


class PerceptualDistance(nn.Module):
    """distance(a, b) -> (N,) for images (N, 3, H, W) in [0, 1]: the paper's VGG loss (L1
    of the relu1_2..relu4_3 features, ImageNet normalization, resized to 224 px) or, with
    `lpips`, LPIPS (channel-normalized relu1_2..relu5_3 features, learned weights)."""

    def __init__(self, vgg: str | Path, lpips: str | Path | None = None):
        super().__init__()
        features = vgg16_features(read_weights(vgg, "VGG-16"), vgg)
        ends = _BLOCK_ENDS if lpips else _BLOCK_ENDS[:4]
        self.blocks = nn.ModuleList(features[start:end] for start, end in zip((0,) + ends[:-1], ends))
        self.lins = None
        if lpips:
            lins = read_weights(lpips, "LPIPS")
            try:
                self.lins = [lins[f"lin{k}.model.1.weight"].float() for k in range(len(ends))]
            except KeyError as missing:
                raise ValueError(f"{lpips} is not an LPIPS (VGG) weights file: no {missing}") from None
            mean, std = LPIPS_SHIFT, LPIPS_SCALE
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images * 2 - 1 if self.lins is not None else images  # LPIPS reads [-1, 1]
        x = (x - self.mean) / self.std
        if self.lins is None:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for k, (fa, fb) in enumerate(zip(self._features(a), self._features(b))):
            if self.lins is None:
                total = total + (fa - fb).abs().flatten(1).mean(1)
            else:
                fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + F.conv2d((fa - fb) ** 2, self.lins[k].to(fa)).mean((1, 2, 3))
        return total
