"""The shipped tiny Stable Diffusion and the script that makes it."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from orthodiff.models.tiny_sd import TINY_SD_PATH, build_clip_tokenizer
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_pipeline_loads_with_plain_diffusers_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)  # unchanged diffusers call
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a white background", num_inference_steps=4, height=64, width=64,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.01
    size_mb = sum(f.stat().st_size for f in TINY_SD_PATH.rglob("*") if f.is_file()) / 2**20
    assert size_mb <= 30, f"shipped tiny SD is {size_mb:.1f} MB"


def test_shipped_tokenizer_is_clip_bpe():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD_PATH / "tokenizer")
    assert len(tokenizer) == 49408
    # Ids of the real CLIP vocabulary: <|startoftext|> a photo of <|endoftext|>.
    assert tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert (TINY_SD_PATH / "tokenizer" / "vocab.json").exists() and (TINY_SD_PATH / "tokenizer" / "merges.txt").exists()


def write_bpe_fixture(path: Path):
    """A tiny merges file in the real format: a version line, then 'a b' merges."""
    merges = ["r e", "re d</w>", "c i", "ci r", "l e</w>", "cir c", "circ le</w>"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges) + "\n")


def test_build_clip_tokenizer_from_bpe_file(tmp_path):
    write_bpe_fixture(tmp_path / "bpe.txt.gz")
    tokenizer = build_clip_tokenizer(tmp_path / "bpe.txt.gz", tmp_path / "tok")
    assert len(tokenizer) == 512 + 7 + 2
    assert tokenizer.tokenize("red circle") == ["red</w>", "circle</w>"]
    assert tokenizer("red").input_ids[0] == 512 + 7 and tokenizer("red").input_ids[-1] == 512 + 8


@pytest.mark.slow
def test_pretraining_script_runs_resumes_and_exports(tmp_path):
    write_bpe_fixture(tmp_path / "bpe.txt.gz")
    script = ROOT / "scripts/pretrain_tiny_sd.py"
    common = [
        f"data_dir={tmp_path / 'shapes'}", "train_size=40",
        f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'out'}", f"bpe_vocab={tmp_path / 'bpe.txt.gz'}",
        "vae.steps=2", "vae.batch_size=4", "unet.batch_size=4", "unet.sample_every=100", "checkpoint_every_s=0",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    first = run_script(script, common + ["unet.steps=1"])
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_script(script, common + ["unet.steps=2"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "unet:  50%" in second.stderr, "the second run must resume the UNet at step 1 of 2"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    assert (tmp_path / "cache" / "samples_000002.png").exists()


@pytest.mark.slow
def test_a_width_ladder_rung_trains_only_a_wider_unet_on_the_shipped_parts(tmp_path):
    from diffusers import StableDiffusionPipeline

    ladder = [f"ladder.cache_dir='{tmp_path}/cache_w{{width}}'", f"ladder.out_dir='{tmp_path}/out_w{{width}}'"]
    script = ROOT / "scripts/pretrain_tiny_sd.py"
    run = run_script(script, ["unet_width=0.5", f"data_dir={tmp_path / 'shapes'}", "train_size=40", *ladder,
                              "unet.batch_size=4", "unet.steps=1", "unet.sample_every=100", "checkpoint_every_s=0",
                              f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert run.returncode == 0, run.stderr[-2000:]
    rung, shipped = StableDiffusionPipeline.from_pretrained(tmp_path / "out_w05"), StableDiffusionPipeline.from_pretrained(
        TINY_SD_PATH)
    assert list(rung.unet.config.block_out_channels) == [32, 48, 48]
    assert rung.unet.config.attention_head_dim == shipped.unet.config.attention_head_dim  # the head count: dims halve
    assert rung.vae.config.scaling_factor == shipped.vae.config.scaling_factor
    for frozen in ("vae", "text_encoder"):  # only the UNet differs
        theirs = getattr(shipped, frozen).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(rung, frozen).state_dict().items()), frozen
    bad = run_script(script, ["unet_width=3", f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert bad.returncode != 0 and "unet_width=3; the ladder's widths are 0.5, 2" in bad.stderr


def test_a_ladder_model_not_built_yet_names_the_command_that_builds_it(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from orthodiff.models.base import load_base_model

    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["model=tiny_w2"])
    assert cfg.model.resolution == 64 and cfg.model.pretrained.endswith("tiny-sd-w2")
    with pytest.raises(FileNotFoundError, match=r"python scripts/pretrain_tiny_sd.py unet_width=2"):
        load_base_model(cfg.model.pretrained)
