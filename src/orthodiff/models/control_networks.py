"""The control networks the controllable-generation methods train, and how they meet an
unchanged diffusers UNet:

    "hint"        ControlNet's hint block added to conv_in (ControlEncoder; OFT's choice)
    "controlnet"  diffusers' ControlNetModel.from_unet: a trainable encoder copy with zero convs
    "t2i_adapter" / "t2i_adapter_light"  diffusers' T2IAdapter

`ControlInjector` feeds any of them to the UNet through hooks, so training, sampling and
diffusers pipelines share one code path.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers import ControlNetModel, T2IAdapter
from torch import nn

from orthodiff.models.control_encoder import ControlEncoder

CONTROL_NETWORK_CLASSES = {"hint": ControlEncoder, "controlnet": ControlNetModel, "t2i_adapter": T2IAdapter,
                           "t2i_adapter_light": T2IAdapter}
CONTROL_NETWORKS = tuple(CONTROL_NETWORK_CLASSES)


def build_control_network(kind: str, unet, condition_channels: int, vae_scale_factor: int) -> nn.Module:
    """The trainable control network for a frozen `unet` (call before adapting the UNet:
    ControlNet copies its weights)."""
    channels = tuple(unet.config.block_out_channels)
    if kind == "hint":
        # Keyword arguments: diffusers' register_to_config records positional ones as defaults.
        return ControlEncoder(in_channels=condition_channels, out_channels=channels[0],
                              downscale_factor=vae_scale_factor)
    if kind == "controlnet":
        # ControlNet's conditioning embedding halves the size (log2 f) times: (16, 32, 96, 256) for f=8.
        widths = (16, 32, 96, 256)[: int(math.log2(vae_scale_factor)) + 1]
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                         conditioning_channels=condition_channels)
    if kind in ("t2i_adapter", "t2i_adapter_light"):
        light = kind == "t2i_adapter_light"
        # The light variant has no features for SD's last (unstrided) level; T2I's own choice.
        return T2IAdapter(in_channels=condition_channels, channels=list(channels[:3] if light else channels),
                          num_res_blocks=4 if light else 2, downscale_factor=vae_scale_factor,
                          adapter_type="light_adapter" if light else "full_adapter")
    raise ValueError(f"unknown control network {kind!r}; choose one of {CONTROL_NETWORKS}")


def control_network_from_config(kind: str, config: dict) -> nn.Module:
    """An untrained control network rebuilt from its saved config (weights come after)."""
    if kind not in CONTROL_NETWORK_CLASSES:
        raise ValueError(f"unknown control network {kind!r}; choose one of {CONTROL_NETWORKS}")
    return CONTROL_NETWORK_CLASSES[kind].from_config(config)


def _repeat_to(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Under classifier-free guidance the UNet sees the batch k times (unconditional and
    conditional halves stacked): repeat the control to match, so both halves are controlled
    (ControlNet's default)."""
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"control batch {tensor.shape[0]} does not divide UNet batch {batch}")
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.ndim - 1)))


class ControlInjector:
    """Feeds a control network to `unet` through hooks, so diffusers' UNet is used unchanged:

        injector = ControlInjector(unet, control_network)
        with injector.control(condition):        # (N, C, H, W) encoded condition image
            unet(latents, t, encoder_hidden_states=text).sample

    hint: its features are added to conv_in's output. T2I-Adapter: its features go in as
    `down_intrablock_additional_residuals`. ControlNet: it runs on each UNet call's own
    latents, timestep and text, and its residuals go in as the down/mid residuals."""

    def __init__(self, unet: nn.Module, control_network: nn.Module):
        self.network = control_network
        self.condition = self.features = None
        if isinstance(control_network, ControlEncoder):
            self.handle = unet.conv_in.register_forward_hook(self._add_to_conv_in)
        else:
            self.handle = unet.register_forward_pre_hook(self._add_residuals, with_kwargs=True)

    @contextmanager
    def control(self, condition: torch.Tensor | None):
        if condition is not None and not isinstance(self.network, ControlNetModel):
            self.features = self.network(condition)  # timestep-independent: once per call
        self.condition = condition
        try:
            yield
        finally:
            self.condition = self.features = None

    def _add_to_conv_in(self, module, inputs, output):
        if self.features is None:
            return output
        features = _repeat_to(self.features, output.shape[0])
        if features.shape[1:] != output.shape[1:]:
            raise ValueError(f"control features {tuple(features.shape[1:])} do not match conv_in output "
                             f"{tuple(output.shape[1:])}: is the condition at the image resolution?")
        return output + features.to(output.dtype)

    def _add_residuals(self, unet, args, kwargs):
        if self.condition is None:
            return None
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        if isinstance(self.network, ControlNetModel):
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            text = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
            down, mid = self.network(sample, timestep, encoder_hidden_states=text,
                                     controlnet_cond=_repeat_to(self.condition, batch).to(sample.dtype),
                                     return_dict=False)
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        else:  # a fresh list per call: the UNet pops from it
            kwargs["down_intrablock_additional_residuals"] = [_repeat_to(f, batch).to(sample.dtype)
                                                              for f in self.features]
        return args, kwargs

    def remove(self):
        self.handle.remove()
