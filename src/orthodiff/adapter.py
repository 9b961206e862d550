"""The trained adapter on disk: one safetensors file with the OFT tensors (keys "unet.…"),
the control encoder (keys "control_encoder.…") and metadata strings naming the format
version, the base model, a fingerprint of its target layers' shapes, the OFT config,
the encoder config and the control type."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orthodiff.files import atomic_path
from orthodiff.oft import OFTConfig, OFTLayer, oft_state_dict

FORMAT = "orthodiff-adapter"
FORMAT_VERSION = 1


def target_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the adapted layers' names and weight shapes: two base models with the
    same fingerprint accept the same adapter."""
    layers = sorted((name, tuple(module.base_layer.weight.shape)) for name, module in unet.named_modules()
                    if isinstance(module, OFTLayer))
    return hashlib.sha256(repr(layers).encode()).hexdigest()[:16]


def save_adapter(path: str | Path, module) -> Path:
    """Write `module`'s (a ControlModule) adapter atomically: a crash mid-write never
    replaces an existing file with a partial one."""
    path = Path(path)
    tensors = {f"unet.{k}": v for k, v in oft_state_dict(module.unet).items()}
    tensors.update({f"control_encoder.{k}": v for k, v in module.control_encoder.state_dict().items()})
    adapter = module.adapter_config
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "base_model": str(module.hparams.pretrained),
        "target_fingerprint": target_fingerprint(module.unet) if adapter else "",
        "oft_config": json.dumps(dataclasses.asdict(adapter) if adapter else None),
        "control": module.control,
        "control_encoder_config": json.dumps(dict(module.control_encoder.config)),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and decoded metadata; errors say when a file is not an orthodiff adapter or
    needs a newer orthodiff."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path} is not a safetensors file: {error}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an orthodiff adapter (metadata format={metadata.get('format')!r})")
    version = int(metadata.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} is adapter format version {version}; this orthodiff reads up to "
                         f"{FORMAT_VERSION}: upgrade orthodiff")
    decoded = dict(metadata)
    for key in ("oft_config", "control_encoder_config"):
        decoded[key] = json.loads(metadata[key])
    if decoded["oft_config"] is not None:
        decoded["oft_config"] = OFTConfig(**decoded["oft_config"])
    return tensors, decoded
