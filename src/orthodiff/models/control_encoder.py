"""The lightweight control encoder and the hook that adds its output to the UNet's conv_in.

ControlNet's hint block: eight 3x3 convolutions with SiLU between them, channels
in -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> C, the last one zero-initialized so
training starts from the unchanged base model. For SD 1.5 (in 3, C 320) it has
1.09 M parameters. The condition is at pixel resolution and the UNet works on latents,
so the encoder downsamples by the VAE's scale factor: log2(factor) of its three strided
positions use stride 2 (all three for SD's f=8, two for the tiny model's f=4).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

HIDDEN_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
STRIDED = (2, 4, 6)  # indices of the convs that may downsample (ControlNet's positions)


class ControlEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 320, downscale_factor: int = 8):
        super().__init__()
        downsamples = int(math.log2(downscale_factor))
        if 2 ** downsamples != downscale_factor or not 0 <= downsamples <= len(STRIDED):
            raise ValueError(f"downscale_factor={downscale_factor}: must be 1, 2, 4 or 8 "
                             "(the VAE's scale factor)")
        strided = STRIDED[:downsamples]
        layers, channels = [], in_channels
        for index, hidden in enumerate(HIDDEN_CHANNELS):
            layers += [nn.Conv2d(channels, hidden, 3, stride=2 if index in strided else 1, padding=1), nn.SiLU()]
            channels = hidden
        self.blocks = nn.Sequential(*layers)
        self.zero_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.zero_conv.weight)  # starts as "no control": the base model is unchanged
        nn.init.zeros_(self.zero_conv.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.zero_conv(self.blocks(condition))


class ControlInjector:
    """Adds control features to the output of `unet.conv_in` through a forward hook, so
    diffusers' UNet code is used unchanged.

        injector = ControlInjector(unet)
        with injector.control(encoder(condition)):
            unet(latents, t, text).sample

    Under classifier-free guidance the UNet sees the batch k times (unconditional and
    conditional halves stacked); the features are repeated to match, so both halves are
    controlled (ControlNet's default)."""

    def __init__(self, unet: nn.Module):
        self.features: torch.Tensor | None = None
        self.handle = unet.conv_in.register_forward_hook(self._add)

    def _add(self, module, inputs, output):
        if self.features is None:
            return output
        features = self.features
        if features.shape[0] != output.shape[0]:
            if output.shape[0] % features.shape[0]:
                raise ValueError(f"control batch {features.shape[0]} does not divide UNet batch {output.shape[0]}")
            features = features.repeat(output.shape[0] // features.shape[0], 1, 1, 1)
        if features.shape[1:] != output.shape[1:]:
            raise ValueError(f"control features {tuple(features.shape[1:])} do not match conv_in output "
                             f"{tuple(output.shape[1:])}: is the condition at the image resolution?")
        return output + features.to(output.dtype)

    @contextmanager
    def control(self, features: torch.Tensor | None):
        self.features = features
        try:
            yield
        finally:
            self.features = None

    def remove(self):
        self.handle.remove()
