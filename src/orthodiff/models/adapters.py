"""The UNet adapters the methods train, each a config dataclass that owns its injection:

    adapter.kind                 the name recorded in adapter files ("oft", "lora", "full")
    adapter.targets              which UNet modules it adapts (orthodiff.oft.matches_target)
    adapter.inject(unet)         wrap or unfreeze the targets in place (the rest stays frozen)
    adapter.after_step(unet)     called after every optimizer step (COFT's projection)
    type(adapter).compose(unet, [(config, tensors), ...], scales, mode)
                                 several adapters of one kind as one of that kind (OFT: rotations
                                 multiplied or averaged, orthodiff.oft.compose; LoRA: updates added)

OFTConfig (orthodiff.oft) is the project's own; LoRAConfig goes through PEFT;
FullFinetuneConfig unfreezes the target layers. A new method adds one dataclass here
(and to ADAPTER_TYPES), one conf/method/<name>.yaml and one test. Merging and folding
work on any layer that keeps its frozen module as `base_layer` (OFT and PEFT both do).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from orthodiff.oft import COMPOSE_MODES, DEFAULT_TARGETS, OFTConfig, OFTLayer, matches_target, target_modules


@dataclass
class LoRAConfig:
    """LoRA through PEFT on the same layers OFT adapts. alpha=None means alpha = rank
    (scale 1), PEFT's usual choice; targets None means DEFAULT_TARGETS."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] | None = None

    kind = "lora"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank}: must be at least 1")
        self.targets = list(DEFAULT_TARGETS if self.targets is None else self.targets)

    def inject(self, unet: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout,
                            target_modules=list(self.targets), init_lora_weights=True)
        inject_adapter_in_model(config, unet)  # B = 0 at init: the base model exactly

    def after_step(self, unet: nn.Module) -> None:
        pass

    @staticmethod
    def compose(unet: nn.Module, parts: list, scales=None, mode: str = "product") -> tuple["LoRAConfig", dict]:
        """LoRA adapters add: W + sum_i s_i B_i A_i ("mean": the scales normalised to sum 1; "product"
        means the same sum, as updates add in any order), exactly, as one LoRA whose rank is the sum
        of theirs (A stacked, each B scaled by s_i alpha_i / r_i), on the union of the targets."""
        if mode not in COMPOSE_MODES:
            raise ValueError(f"compose mode {mode!r}: choose one of {COMPOSE_MODES}")
        scales = [1.0] * len(parts) if scales is None else [float(s) for s in scales]
        if mode == "mean":
            total = sum(scales)
            scales = [s / total if total else 0.0 for s in scales]
        targets = list(dict.fromkeys(t for config, _ in parts for t in config.targets))
        rank = sum(config.rank for config, _ in parts)
        tensors, used = {}, [set() for _ in parts]
        for name in target_modules(unet, targets):
            keys = (f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight")
            adapts = [any(matches_target(name, t) for t in config.targets) for config, _ in parts]
            for k, (_, lora) in enumerate(parts):
                if adapts[k] and not all(key in lora for key in keys):
                    raise ValueError(f"adapter {k + 1} is missing {keys[0]} or {keys[1]}")
            like_a, like_b = (parts[adapts.index(True)][1][key] for key in keys)  # shapes for those that skip it
            a_rows, b_cols = [], []
            for k, ((config, lora), scale) in enumerate(zip(parts, scales)):
                if not adapts[k]:
                    a_rows.append(like_a.new_zeros(config.rank, *like_a.shape[1:]))
                    b_cols.append(like_b.new_zeros(like_b.shape[0], config.rank, *like_b.shape[2:]))
                    continue
                a_rows.append(lora[keys[0]])
                b_cols.append(lora[keys[1]] * (scale * (config.alpha or config.rank) / config.rank))
                used[k].update(keys)
            tensors[keys[0]], tensors[keys[1]] = torch.cat(a_rows, 0), torch.cat(b_cols, 1)
        for k, ((_, lora), seen) in enumerate(zip(parts, used)):
            if set(lora) - seen:
                raise ValueError(f"adapter {k + 1} has tensors for no target layer of this model: "
                                 f"{sorted(set(lora) - seen)[:3]}")
        return replace(parts[0][0], rank=rank, alpha=float(rank), dropout=0.0, targets=targets), tensors


@dataclass
class FullFinetuneConfig:
    """Full finetuning of the target layers (weights and biases), the rest frozen."""

    targets: list[str] | None = None

    kind = "full"

    def __post_init__(self):
        self.targets = list(DEFAULT_TARGETS if self.targets is None else self.targets)

    def inject(self, unet: nn.Module) -> None:
        names = target_modules(unet, self.targets)
        if not names:
            raise ValueError(f"full finetuning targets {self.targets} match no module of the UNet")
        for name in names:
            unet.get_submodule(name).requires_grad_(True)

    def after_step(self, unet: nn.Module) -> None:
        pass

    @staticmethod
    def compose(unet: nn.Module, parts: list, scales=None, mode: str = "product"):
        raise ValueError("full-finetuning adapters each replace their layers' weights: they do not compose "
                         "(compose OFT/COFT or LoRA adapters)")


ADAPTER_TYPES = {cls.kind: cls for cls in (OFTConfig, LoRAConfig, FullFinetuneConfig)}
# Lightning's resume loads hparams with torch.load(weights_only=True).
torch.serialization.add_safe_globals(list(ADAPTER_TYPES.values()))


def adapter_to_dict(adapter) -> dict | None:
    return None if adapter is None else {"type": adapter.kind, **asdict(adapter)}


def adapter_from_dict(config: dict | None):
    if config is None:
        return None
    config = dict(config)
    kind = config.pop("type")
    if kind not in ADAPTER_TYPES:
        raise ValueError(f"unknown adapter type {kind!r}; known: {sorted(ADAPTER_TYPES)}")
    return ADAPTER_TYPES[kind](**config)


def adapt_unet(unet: nn.Module, adapter) -> None:
    """Freeze `unet` and make the adapter's parameters (only) trainable."""
    unet.requires_grad_(False)
    if adapter is None:
        return
    if type(adapter) not in ADAPTER_TYPES.values():
        raise TypeError(f"unknown UNet adapter {type(adapter).__name__}; use one of "
                        f"{[c.__name__ for c in ADAPTER_TYPES.values()]} or None")
    adapter.inject(unet)


def target_fingerprint(unet: nn.Module, targets=DEFAULT_TARGETS) -> str:
    """A short hash of the target layers' names and weight shapes, taken on the base UNet:
    two base models with the same fingerprint accept the same adapter."""
    layers = sorted((name, _shapes(unet.get_submodule(name))) for name in target_modules(unet, targets))
    return hashlib.sha256(repr(layers).encode()).hexdigest()[:16]


def target_signature(unet: nn.Module, targets=DEFAULT_TARGETS, per_layer: int = 4) -> list[list[float]]:
    """A few of each target layer's base weights at fixed places (layers in name order, as the
    fingerprint's), taken on the base UNet. Two base models with the same fingerprint but other
    weights (a retrained or finetuned base) differ here; one base loaded in float32, float16 or
    bfloat16 matches (same_signature)."""
    signature = []
    for name in sorted(target_modules(unet, targets)):
        module = unet.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):  # a whole block (full finetuning): its first tensor, if any
            weight = next(module.parameters(), torch.zeros(1))
        flat = weight.detach().flatten().float().cpu()
        places = torch.linspace(0, flat.numel() - 1, per_layer).long()
        signature.append([float(f"{v:.4g}") for v in flat[places].tolist()])
    return signature


def same_signature(a: list[list[float]], b: list[list[float]]) -> bool:
    """Whether two target signatures are one base model's: within 1 % (bfloat16 rounds by 0.4 %)."""
    if len(a) != len(b):
        return False
    for x, y in zip(map(torch.tensor, a), map(torch.tensor, b)):
        if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-2, atol=1e-2 * float(x.abs().max().clamp_min(1e-12))):
            return False
    return True


def _shapes(module: nn.Module) -> tuple:
    """A layer's weight shape; for a block (full finetuning of whole blocks), its parameters' shapes."""
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return tuple(module.weight.shape)
    return tuple(tuple(p.shape) for p in module.parameters())


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
    """Undo merge_adapter (OFT with R^T, exact). Returns the number of layers unmerged."""
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
