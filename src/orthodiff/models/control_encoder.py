"""The lightweight control encoder (its output is added to the UNet's conv_in output by
`orthodiff.models.control_networks.ControlInjector`).

ControlNet's hint block: eight 3x3 convolutions with SiLU between them, channels
in -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> C, the last one zero-initialized so
training starts from the unchanged base model. For SD 1.5 (in 3, C 320) it has
1.09 M parameters. The condition is at pixel resolution and the UNet works on latents,
so the encoder downsamples by the VAE's scale factor: log2(factor) of its three strided
positions use stride 2 (all three for SD's f=8, two for the tiny model's f=4).
"""

from __future__ import annotations

import math

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
