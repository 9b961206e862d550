"""Export a diffusers Stable Diffusion model as ONE checkpoint in the original (CompVis/LDM) layout.

A1111, ComfyUI and diffusers' own `StableDiffusionPipeline.from_single_file` read SD 1.x
"single-file" checkpoints: one state dict holding three models under fixed prefixes.

- `model.diffusion_model.` -- the UNet (ldm `openaimodel.UNetModel`). Its blocks are numbered
  sequentially instead of nested by level:
    time_embed.{0,2}                    <- time_embedding.linear_{1,2}
    input_blocks.0.0                    <- conv_in
    input_blocks.{k}.0 / .1             <- down_blocks.{i}.resnets.{j} / .attentions.{j}
    input_blocks.{k}.0.op               <- down_blocks.{i}.downsamplers.0.conv (own k)
    middle_block.{0,1,2}                <- mid_block.resnets.0, .attentions.0, .resnets.1
    output_blocks.{k}.0 / .1            <- up_blocks.{i}.resnets.{j} / .attentions.{j}
    output_blocks.{k}.{1|2}.conv        <- up_blocks.{i}.upsamplers.0.conv, on the level's last
                                           k, at 2 when that k has an attention, else at 1
    out.{0,2}                           <- conv_norm_out, conv_out
  with k counting up from 1 (input) or 0 (output). ResBlocks rename their children (norm1 ->
  in_layers.0, conv1 -> in_layers.2, time_emb_proj -> emb_layers.1, norm2 -> out_layers.0,
  conv2 -> out_layers.3, conv_shortcut -> skip_connection); SpatialTransformer keys inside an
  attention (norm, proj_in, transformer_blocks.*, proj_out) are spelled the same in both.
- `first_stage_model.` -- the VAE (ldm `Encoder`/`Decoder`): encoder.down.{i}.block.{j},
  encoder.down.{i}.downsample.conv, {en,de}coder.mid.{block_1,attn_1,block_2}, norm_out,
  conv_out, quant_conv, post_quant_conv; the decoder's `up.{i}` counts levels from the
  highest resolution, so diffusers' up_blocks.{m} is up.{n-1-m}. Resnets differ only in
  conv_shortcut -> nin_shortcut; the mid attention is group_norm/to_q/to_k/to_v/to_out.0 ->
  norm/q/k/v/proj_out, and its q/k/v/proj_out are 1x1 convs there, so (out, in) linear
  weights become (out, in, 1, 1).
- `cond_stage_model.transformer.` -- the Hugging Face CLIPTextModel's own keys, always as
  `text_model.*` (transformers >= 5.6 dropped that wrapper from CLIPTextModel's keys; the
  original checkpoints, A1111/ComfyUI and diffusers' `is_clip_model` all expect it).

We write this direction ourselves: diffusers ships only original -> diffusers inside the
library (its reverse converter is an unpackaged script), and owning the mapping lets us
check it: every source key must be renamed exactly once, or a ValueError names the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from orthodiff.files import atomic_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
METADATA = {
    # "format": "pt" is what safetensors readers (transformers among them) expect there.
    "format": "pt",
    "layout": "stable-diffusion-v1 original (CompVis/LDM) single file",
    "written_by": "orthodiff",
}

UNET_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
UNET_MID = {"UNetMidBlock2DCrossAttn"}
UNET_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}
VAE_DOWN = {"DownEncoderBlock2D"}
VAE_MID = {"UNetMidBlock2D"}
VAE_UP = {"UpDecoderBlock2D"}

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class _Rule:
    """Keys under module prefix `src` move under `dst`; `children`, when given, also renames
    the first child module and is the whole list of children allowed there."""

    src: str
    dst: str
    children: Mapping[str, str] | None = None
    conv1x1: bool = False  # 2-D linear weights become (out, in, 1, 1) conv weights

    def rename(self, key: str) -> str | None:
        rest = key[len(self.src):]
        if self.children is None:
            return self.dst + rest
        for old, new in self.children.items():
            if rest.startswith(old + "."):
                return self.dst + new + rest[len(old):]
        return None

    def convert(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.conv1x1 and tensor.ndim == 2:
            return tensor.reshape(*tensor.shape, 1, 1)
        return tensor


def _require_blocks(what: str, blocks, allowed: set[str]) -> None:
    bad = sorted({type(block).__name__ for block in blocks} - allowed)
    if bad:
        raise ValueError(f"{what}: unsupported block type(s) {bad}; the original layout mapping "
                         f"knows {sorted(allowed)}")


def _n_attentions(block) -> int:
    attentions = getattr(block, "attentions", None)
    return 0 if attentions is None else len(attentions)


def _level_rules(rules: list, name: str, block, target: str, k: int) -> int:
    """One UNet level's (resnet, attention) pairs -> the original's numbered blocks
    `target.k.0` / `target.k.1`; returns the next block number."""
    for j in range(len(block.resnets)):
        rules.append(_Rule(f"{name}.resnets.{j}.", f"{target}.{k}.0.", UNET_RESNET))
        if j < _n_attentions(block):
            rules.append(_Rule(f"{name}.attentions.{j}.", f"{target}.{k}.1."))
        k += 1
    return k


def _unet_rules(unet: UNet2DConditionModel) -> list[_Rule]:
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"unet: expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    _require_blocks("unet down_blocks", unet.down_blocks, UNET_DOWN)
    _require_blocks("unet mid_block", [unet.mid_block], UNET_MID)
    _require_blocks("unet up_blocks", unet.up_blocks, UNET_UP)
    rules = [_Rule("time_embedding.linear_1.", "time_embed.0."),
             _Rule("time_embedding.linear_2.", "time_embed.2."),
             _Rule("conv_in.", "input_blocks.0.0."),
             _Rule("conv_norm_out.", "out.0."),
             _Rule("conv_out.", "out.2.")]

    k = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        k = _level_rules(rules, f"down_blocks.{i}", block, "input_blocks", k)
        if block.downsamplers is not None:  # the original gives the downsampler its own block
            rules.append(_Rule(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op."))
            k += 1

    # The original middle_block is one flat Sequential: resnet, (attention, resnet)*.
    mid = unet.mid_block
    rules.append(_Rule("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET))
    for j in range(_n_attentions(mid)):
        rules.append(_Rule(f"mid_block.attentions.{j}.", f"middle_block.{2 * j + 1}."))
        rules.append(_Rule(f"mid_block.resnets.{j + 1}.", f"middle_block.{2 * j + 2}.", UNET_RESNET))

    k = 0
    for i, block in enumerate(unet.up_blocks):
        k = _level_rules(rules, f"up_blocks.{i}", block, "output_blocks", k)
        if block.upsamplers is not None:  # appended to the level's last output block
            slot = 2 if len(block.resnets) - 1 < _n_attentions(block) else 1
            rules.append(_Rule(f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k - 1}.{slot}.conv."))
    return rules


def _vae_rules(vae: AutoencoderKL) -> list[_Rule]:
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"vae: expected a diffusers AutoencoderKL, got {type(vae).__name__}")
    _require_blocks("vae encoder down_blocks", vae.encoder.down_blocks, VAE_DOWN)
    _require_blocks("vae mid_blocks", [vae.encoder.mid_block, vae.decoder.mid_block], VAE_MID)
    _require_blocks("vae decoder up_blocks", vae.decoder.up_blocks, VAE_UP)
    rules = [_Rule("quant_conv.", "quant_conv."), _Rule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [_Rule(f"{part}.conv_in.", f"{part}.conv_in."),
                  _Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
                  _Rule(f"{part}.conv_out.", f"{part}.conv_out."),
                  # The original mid block is always block_1, attn_1, block_2; anything else is left unmapped.
                  _Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                  _Rule(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION, conv1x1=True),
                  _Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET)]

    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            rules.append(_Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
        if block.downsamplers is not None:
            rules.append(_Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))

    levels = len(vae.decoder.up_blocks)
    for m, block in enumerate(vae.decoder.up_blocks):
        i = levels - 1 - m  # the original numbers decoder levels from the highest resolution
        for j in range(len(block.resnets)):
            rules.append(_Rule(f"decoder.up_blocks.{m}.resnets.{j}.", f"decoder.up.{i}.block.{j}.", VAE_RESNET))
        if block.upsamplers is not None:
            rules.append(_Rule(f"decoder.up_blocks.{m}.upsamplers.0.conv.", f"decoder.up.{i}.upsample.conv."))
    return rules


def _text_rules(text_encoder) -> list[_Rule]:
    # transformers < 5.6 keys CLIPTextModel as `text_model.*`, later versions without it.
    if hasattr(text_encoder, "text_model"):
        return [_Rule("text_model.", "text_model.")]
    return [_Rule("", "text_model.")]


def _apply(what: str, rules: list[_Rule], state_dict: Mapping[str, torch.Tensor],
           prefix: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state_dict` by exactly one rule; raise naming any key left over."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        hits = [rule for rule in rules if key.startswith(rule.src)]
        if len(hits) > 1:
            raise ValueError(f"{what}: key {key!r} matches several rules {[rule.src for rule in hits]}")
        new = hits[0].rename(key) if hits else None
        if new is None:
            unmapped.append(key)
            continue
        new = prefix + new
        if new in out:
            raise ValueError(f"{what}: two keys map to {new!r}")
        out[new] = hits[0].convert(tensor)
    if unmapped:
        shown = ", ".join(unmapped[:20]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 20 else "")
        raise ValueError(f"{what}: no original-layout name for key(s): {shown}")
    return out


def to_original_layout(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One state dict in the original SD 1.x single-file layout (see the module docstring).

    Tensors are the models' own (detached, same device and dtype; VAE attention weights are
    reshaped views). Raises ValueError for an unsupported architecture or any unmapped key."""
    parts = [("unet", _unet_rules(unet), unet.state_dict(), UNET_PREFIX),
             ("vae", _vae_rules(vae), vae.state_dict(), VAE_PREFIX),
             ("text_encoder", _text_rules(text_encoder), text_encoder.state_dict(), TEXT_PREFIX)]
    merged: dict[str, torch.Tensor] = {}
    for what, rules, state_dict, prefix in parts:
        merged.update(_apply(what, rules, state_dict, prefix))  # prefixes differ: no clashes
    return merged


def _components(pipe_or_components):
    """(unet, vae, text_encoder) from a pipeline-like object or a mapping with those names."""
    names = ("unet", "vae", "text_encoder")
    if isinstance(pipe_or_components, Mapping):
        missing = [name for name in names if pipe_or_components.get(name) is None]
        get = pipe_or_components.get
    else:
        missing = [name for name in names if getattr(pipe_or_components, name, None) is None]
        get = lambda name: getattr(pipe_or_components, name)  # noqa: E731
    if missing:
        raise ValueError(f"save_single_file needs unet, vae and text_encoder; missing {missing}")
    return tuple(get(name) for name in names)


def _for_file(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()  # safetensors stores dense tensors only


def save_single_file(pipe_or_components, path: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write unet + vae + text_encoder as one original-layout .safetensors file, atomically.

    `pipe_or_components` is a StableDiffusionPipeline (or anything with .unet/.vae/.text_encoder)
    or a mapping with those keys; `dtype` (e.g. torch.float16 or "float16") casts the floating
    tensors, None keeps them. Merge adapters into the UNet first: extra keys are refused."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tensors = to_original_layout(*_components(pipe_or_components))
    tensors = {key: _for_file(value, dtype) for key, value in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=METADATA)
    return path
