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
    """Feeds control networks to `unet` through hooks, so diffusers' UNet is used unchanged:

        injector = ControlInjector(unet, control_network)
        with injector.control(condition):        # (N, C, H, W) encoded condition image
            unet(latents, t, encoder_hidden_states=text).sample

    hint: its features are added to conv_in's output. T2I-Adapter: its features go in as
    `down_intrablock_additional_residuals`. ControlNet: it runs on each UNet call's own
    latents, timestep and text, and its residuals go in as the down/mid residuals.

    Several networks (`ControlInjector(unet, [a, b], scales=[1.0, 0.5])`, then
    `control([condition_a, condition_b])`, None for a network left out) add their scaled
    outputs, as diffusers' MultiControlNetModel adds its residuals and MultiAdapter its
    features; networks of different kinds meet the UNet side by side."""

    def __init__(self, unet: nn.Module, control_network: nn.Module | list[nn.Module], scales=None):
        several = isinstance(control_network, (list, tuple, nn.ModuleList))
        self.networks = list(control_network) if several else [control_network]
        self.scales = [1.0] * len(self.networks) if scales is None else [float(s) for s in scales]
        if len(self.scales) != len(self.networks):
            raise ValueError(f"{len(self.scales)} scales for {len(self.networks)} control networks")
        self.conditions = self.features = [None] * len(self.networks)
        self.handles = []
        if any(isinstance(network, ControlEncoder) for network in self.networks):
            self.handles.append(unet.conv_in.register_forward_hook(self._add_to_conv_in))
        if not all(isinstance(network, ControlEncoder) for network in self.networks):
            self.handles.append(unet.register_forward_pre_hook(self._add_residuals, with_kwargs=True))

    @property
    def network(self) -> nn.Module:
        return self.networks[0]

    @contextmanager
    def control(self, condition: torch.Tensor | list[torch.Tensor | None] | None):
        """One condition per network: a tensor for one network, a list for several."""
        several = isinstance(condition, (list, tuple))
        conditions = list(condition) if several else [condition] * len(self.networks)
        if len(conditions) != len(self.networks) or (len(self.networks) > 1 and condition is not None and not several):
            raise ValueError(f"{len(self.networks)} control networks take a list of as many conditions")
        # Timestep-independent networks run once per call; ControlNet runs in every UNet call.
        self.features = [None if c is None or isinstance(n, ControlNetModel) else n(c)
                         for n, c in zip(self.networks, conditions)]
        self.conditions = conditions
        try:
            yield
        finally:
            self.conditions = self.features = [None] * len(self.networks)

    def _given(self, kind) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, float]]:
        """(network, condition, features, scale) of the networks of `kind` given a condition."""
        return [(n, c, f, s) for n, c, f, s in zip(self.networks, self.conditions, self.features, self.scales)
                if c is not None and isinstance(n, kind)]

    def _add_to_conv_in(self, module, inputs, output):
        for _, _, features, scale in self._given(ControlEncoder):
            features = _repeat_to(features, output.shape[0])
            if features.shape[1:] != output.shape[1:]:
                raise ValueError(f"control features {tuple(features.shape[1:])} do not match conv_in output "
                                 f"{tuple(output.shape[1:])}: is the condition at the image resolution?")
            output = output + (features if scale == 1 else scale * features).to(output.dtype)
        return output

    def _add_residuals(self, unet, args, kwargs):
        controlnets, adapters = self._given(ControlNetModel), self._given(T2IAdapter)
        if not controlnets and not adapters:
            return None
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        if controlnets:
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            text = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
            down = mid = None
            for network, condition, _, scale in controlnets:
                residuals, middle = network(sample, timestep, encoder_hidden_states=text,
                                            controlnet_cond=_repeat_to(condition, batch).to(sample.dtype),
                                            conditioning_scale=scale, return_dict=False)
                down = residuals if down is None else [a + b for a, b in zip(down, residuals)]
                mid = middle if mid is None else mid + middle
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if adapters:
            if len({len(features) for _, _, features, _ in adapters}) > 1:
                raise ValueError("T2I-Adapters with different numbers of feature levels (full and light) do not add")
            summed = None
            for _, _, features, scale in adapters:
                scaled = [f if scale == 1 else scale * f for f in features]
                summed = scaled if summed is None else [a + b for a, b in zip(summed, scaled)]
            # A fresh list per call: the UNet pops from it.
            kwargs["down_intrablock_additional_residuals"] = [_repeat_to(f, batch).to(sample.dtype) for f in summed]
        return args, kwargs

    def remove(self):
        for handle in self.handles:
            handle.remove()
