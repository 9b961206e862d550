"""Loading the frozen base model: a diffusers folder, a single-file checkpoint, or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from orthodiff.models.random_sd import build_random_sd15, is_random_sd15
from orthodiff.models.tiny_sd import TINY_SD_PATH, is_ladder_rung, missing_model_message

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass
class BaseModel:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # the training schedule; sampling builds DDIM from its config

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def resolve_pretrained(pretrained: str) -> str:
    """A local path as given, or relative to the repository (so `assets/tiny-sd` works from
    any working directory), else the string unchanged (a hub id). model=sd15_random's folder
    is built on first use."""
    path = Path(pretrained).expanduser()
    if path.exists():
        return str(path)
    if is_ladder_rung(path):  # a width-ladder model not built yet: say how to build it
        raise FileNotFoundError(missing_model_message(path))
    if is_random_sd15(path):  # model=sd15_random: nothing to download, built here once
        return str(build_random_sd15(path))
    in_repo = TINY_SD_PATH.parents[1] / pretrained
    return str(in_repo) if in_repo.exists() else pretrained


def load_pipeline(pretrained: str, pipeline_class=StableDiffusionPipeline, dtype: torch.dtype = torch.float32,
                  original_config: str | None = None) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline of `pipeline_class` from a diffusers pipeline folder, a
    single-file checkpoint (.safetensors / .ckpt in the original SD key layout; `original_config`
    is its config folder or YAML when diffusers cannot infer it offline), or a hub id such as
    "stable-diffusion-v1-5/stable-diffusion-v1-5" (needs network or the HF cache)."""
    source = resolve_pretrained(pretrained)
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if source.endswith(SINGLE_FILE_SUFFIXES):
            if not Path(source).is_file():
                raise FileNotFoundError(f"single-file checkpoint {source} does not exist")
            extra = {"config": original_config} if original_config else {}
            return pipeline_class.from_single_file(source, **kwargs, **extra)
        if Path(source).is_dir() and not (Path(source) / "model_index.json").is_file():
            raise FileNotFoundError(f"{source} is a folder but not a diffusers pipeline (no model_index.json)")
        return pipeline_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        raise RuntimeError(
            f"cannot load the base model {pretrained!r} (resolved to {source!r}): {error}\n"
            "Give a diffusers folder, a single-file .safetensors/.ckpt (with its config folder or YAML "
            "when offline), or a hub id with network access; the embedded default is model=tiny "
            "(assets/tiny-sd).") from error


def load_base_model(pretrained: str, dtype: torch.dtype = torch.float32,
                    original_config: str | None = None) -> BaseModel:
    """Load VAE, text encoder, tokenizer, UNet and scheduler of a Stable Diffusion model
    (load_pipeline says what `pretrained` and `original_config` may be)."""
    pipe = load_pipeline(pretrained, dtype=dtype, original_config=original_config)
    return BaseModel(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                     unet=pipe.unet, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
