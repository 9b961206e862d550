"""The methods the controllable-generation tables compare, as two independent choices:

    UNet adapter      OFTConfig (OFT / COFT, this project's layers), LoRAConfig (PEFT),
                      FullFinetuneConfig (the target layers' own weights), or None
    control network   "hint"        ControlNet's hint block added to conv_in (ControlEncoder)
                      "controlnet"  diffusers' ControlNetModel.from_unet: a trainable
                                    encoder copy with zero convs
                      "t2i_adapter" / "t2i_adapter_light"  diffusers' T2IAdapter

`ControlInjector` feeds any of the three networks to an unchanged diffusers UNet through
hooks, so training, sampling and diffusers pipelines share one code path.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from diffusers import ControlNetModel, T2IAdapter
from torch import nn

from orthodiff.models.control_encoder import ControlEncoder
from orthodiff.oft import DEFAULT_TARGETS, OFTConfig, OFTLayer, inject_oft
from orthodiff.oft.layer import _matches

CONTROL_NETWORKS = ("hint", "controlnet", "t2i_adapter", "t2i_adapter_light")


@dataclass
class LoRAConfig:
    """LoRA through PEFT on the same layers OFT adapts. alpha=None means alpha = rank
    (scale 1), PEFT's usual choice; targets follow PEFT's name matching."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank}: must be at least 1")
        self.targets = list(self.targets)  # Hydra passes a ListConfig: keep the config plain (JSON, pickle)


@dataclass
class FullFinetuneConfig:
    """Full finetuning of the target layers (weights and biases), the rest frozen."""

    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self):
        self.targets = list(self.targets)


ADAPTER_TYPES = {"oft": OFTConfig, "lora": LoRAConfig, "full": FullFinetuneConfig}
# Lightning's resume loads hparams with torch.load(weights_only=True).
torch.serialization.add_safe_globals([OFTConfig, LoRAConfig, FullFinetuneConfig])


def adapter_type(adapter) -> str | None:
    return next((name for name, cls in ADAPTER_TYPES.items() if isinstance(adapter, cls)), None)


def adapter_to_dict(adapter) -> dict | None:
    return None if adapter is None else {"type": adapter_type(adapter), **asdict(adapter)}


def adapter_from_dict(config: dict | None):
    if config is None:
        return None
    config = dict(config)
    kind = config.pop("type")
    if kind not in ADAPTER_TYPES:
        raise ValueError(f"unknown adapter type {kind!r}; known: {sorted(ADAPTER_TYPES)}")
    return ADAPTER_TYPES[kind](**config)


def target_layers(unet: nn.Module, targets) -> list[str]:
    return [name for name, _ in unet.named_modules() if name and any(_matches(name, t) for t in targets)]


def target_fingerprint(unet: nn.Module, targets=DEFAULT_TARGETS) -> str:
    """A short hash of the target layers' names and weight shapes, taken on the base UNet:
    two base models with the same fingerprint accept the same adapter."""
    layers = sorted((name, _shapes(unet.get_submodule(name))) for name in target_layers(unet, targets))
    return hashlib.sha256(repr(layers).encode()).hexdigest()[:16]


def _shapes(module: nn.Module) -> tuple:
    """A layer's weight shape; for a block (full finetuning of whole blocks), its parameters' shapes."""
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return tuple(module.weight.shape)
    return tuple(tuple(p.shape) for p in module.parameters())


def adapt_unet(unet: nn.Module, adapter) -> None:
    """Freeze `unet` and make the adapter's parameters (only) trainable."""
    unet.requires_grad_(False)
    if adapter is None:
        return
    if isinstance(adapter, OFTConfig):
        inject_oft(unet, adapter)
    elif isinstance(adapter, LoRAConfig):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha or adapter.rank, lora_dropout=adapter.dropout,
                            target_modules=list(adapter.targets), init_lora_weights=True)
        inject_adapter_in_model(config, unet)  # B = 0 at init: the base model exactly
    elif isinstance(adapter, FullFinetuneConfig):
        names = target_layers(unet, adapter.targets)
        if not names:
            raise ValueError(f"full finetuning targets {adapter.targets} match no module of the UNet")
        for name in names:
            unet.get_submodule(name).requires_grad_(True)
    else:
        raise TypeError(f"unknown UNet adapter {type(adapter).__name__}; use one of "
                        f"{[c.__name__ for c in ADAPTER_TYPES.values()]} or None")


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


CONTROL_NETWORK_CLASSES = {"hint": ControlEncoder, "controlnet": ControlNetModel, "t2i_adapter": T2IAdapter,
                           "t2i_adapter_light": T2IAdapter}


def control_network_from_config(kind: str, config: dict) -> nn.Module:
    """An untrained control network rebuilt from its saved config (weights come after)."""
    if kind not in CONTROL_NETWORK_CLASSES:
        raise ValueError(f"unknown control network {kind!r}; choose one of {CONTROL_NETWORKS}")
    return CONTROL_NETWORK_CLASSES[kind].from_config(config)


def adapter_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's wrapped layers by name: OFT layers and PEFT (LoRA) layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, (OFTLayer, BaseTunerLayer))}


def merge_adapter(unet: nn.Module) -> int:
    """Fold OFT rotations / LoRA products into the base weights (zero inference overhead);
    full finetuning has nothing to fold. Returns the number of layers merged."""
    layers = adapter_layers(unet).values()
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_adapter(unet: nn.Module) -> int:
    layers = adapter_layers(unet).values()
    for layer in layers:
        layer.unmerge()
    return len(layers)


def fold_adapter(unet: nn.Module) -> nn.Module:
    """Merge, then put each wrapped layer's base layer back in its place: a plain diffusers
    UNet with the adapter in its weights (what export saves)."""
    merge_adapter(unet)
    for name, layer in adapter_layers(unet).items():
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, layer.base_layer)  # OFT and PEFT both keep `base_layer`
    return unet


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
