"""SD 1.5's architecture at random init (model=sd15_random): the full-size training and
inference path as a dry run on a machine without the weights or network.

The UNet and the VAE are SD 1.5's real architectures (conf/model/sd15_unet.json,
sd15_vae.json); the text encoder is a 2-layer CLIP of SD 1.5's width 768 (sd15_random_text_encoder.json;
its 12 layers would only cost time here) with the tiny SD's copy of CLIP's tokenizer. The pipeline folder is built
once, seeded, on first use (about 3.8 GB, a minute on a CPU), and read like any other."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from orthodiff.models.tiny_sd import TINY_SD_PATH

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[3] / "conf" / "model"
RANDOM_SD15_NAME = "sd15-random"  # the folder name model=sd15_random's `pretrained` ends in
# SD 1.5's training schedule (its scheduler_config.json)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def is_random_sd15(path: Path) -> bool:
    return path.name == RANDOM_SD15_NAME


def build_random_sd15(path: Path, seed: int = 0) -> Path:
    """Write SD 1.5's architecture at random init (seeded: the same weights on every build) as a
    diffusers pipeline folder at `path`; written beside it, then renamed, so a killed build
    leaves nothing half-written."""
    log.info("building SD 1.5's architecture at random init in %s (once, ~3.8 GB)", path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_config(json.loads((CONFIGS / "sd15_vae.json").read_text())),
            text_encoder=CLIPTextModel(CLIPTextConfig(**json.loads((CONFIGS / "sd15_random_text_encoder.json").read_text()))),
            tokenizer=CLIPTokenizer.from_pretrained(TINY_SD_PATH / "tokenizer"),
            unet=UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15_unet.json").read_text())),
            scheduler=DDIMScheduler(**SCHEDULE), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.save_pretrained(partial)
    # the tokenizer's files as shipped (vocab.json and merges.txt too, which save_pretrained drops)
    shutil.copytree(TINY_SD_PATH / "tokenizer", partial / "tokenizer", dirs_exist_ok=True)
    partial.rename(path)
    return path
