"""Export to one original-layout (CompVis/LDM) Stable Diffusion checkpoint.

The round trip reloads our file with diffusers' own single-file loader, which is the
independent check that our diffusers -> original mapping agrees with its original -> diffusers
converter; the SD 1.5 test checks the real architecture's names on the meta device."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from orthodiff.pipelines.single_file import save_single_file, to_original_layout

ROOT = Path(__file__).resolve().parents[1]
TINY_SD = ROOT / "assets" / "tiny-sd"
SD15_UNET = ROOT / "conf" / "model" / "sd15_unet.json"
# SD 1.5's VAE (stable-diffusion-v1-5/vae/config.json); the repository ships no VAE config.
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 vocab_size=100, max_position_embeddings=77)


def assert_same_parameters(expected, actual, name):
    want, got = dict(expected.named_parameters()), dict(actual.named_parameters())
    assert want.keys() == got.keys(), name
    differ = [key for key in want if not torch.equal(want[key], got[key])]
    assert not differ, f"{name}: {len(differ)} parameters differ, e.g. {differ[:3]}"


def test_round_trip_through_diffusers_single_file_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))

    # A local diffusers folder as `config` is all diffusers 0.42 needs offline.
    loaded = StableDiffusionPipeline.from_single_file(
        path, config=str(TINY_SD), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_parameters(getattr(pipe, name), getattr(loaded, name), name)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=generator)
    context = torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        want = pipe.unet(sample, 10, encoder_hidden_states=context).sample
        got = loaded.unet(sample, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    with safe_open(path, "pt") as file:
        assert file.metadata()["written_by"] == "orthodiff"
        assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in file.keys()

    half = save_single_file({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder},
                            tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(half, "pt") as file:
        assert {file.get_tensor(key).dtype for key in file.keys()} == {torch.float16}


def test_vae_mid_attention_becomes_1x1_convs_that_diffusers_reads_back(tmp_path, monkeypatch):
    """The shipped tiny VAE has no mid attention, so check that part on a small one that has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=16,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    path = save_single_file({"unet": pipe.unet, "vae": vae, "text_encoder": pipe.text_encoder},
                            tmp_path / "model.safetensors")
    with safe_open(path, "pt") as file:
        assert file.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [32, 32, 1, 1]
        assert file.get_slice("first_stage_model.decoder.mid.attn_1.proj_out.weight").get_shape() == [32, 32, 1, 1]
    vae.save_config(tmp_path / "config" / "vae")
    loaded = AutoencoderKL.from_single_file(path, config=str(tmp_path / "config"), subfolder="vae",
                                            local_files_only=True)
    assert_same_parameters(vae, loaded, "vae")


def test_sd15_architecture_maps_every_key_to_the_released_names():
    config = json.loads(SD15_UNET.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    state = to_original_layout(unet, vae, text_encoder)

    # The released v1-5 checkpoint holds 686 UNet and 248 VAE tensors; ours maps 1:1.
    unet_keys = [key for key in state if key.startswith("model.diffusion_model.")]
    vae_keys = [key for key in state if key.startswith("first_stage_model.")]
    text_keys = [key for key in state if key.startswith("cond_stage_model.transformer.text_model.")]
    assert len(unet_keys) == len(unet.state_dict()) == 686
    assert len(vae_keys) == len(vae.state_dict()) == 248
    assert len(text_keys) == len(text_encoder.state_dict())
    assert len(state) == len(unet_keys) + len(vae_keys) + len(text_keys)
    for key in ["model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.middle_block.2.out_layers.3.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.output_blocks.8.2.conv.weight",
                "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
                "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                "first_stage_model.encoder.down.2.downsample.conv.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.decoder.up.0.block.2.conv2.weight",
                "first_stage_model.decoder.norm_out.weight",
                "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"]:
        assert key in state, key
    for key in ["model.diffusion_model.input_blocks.12.0.in_layers.0.weight",
                "model.diffusion_model.output_blocks.11.2.conv.weight",
                "first_stage_model.encoder.down.3.downsample.conv.weight",
                "first_stage_model.decoder.up.0.upsample.conv.weight"]:
        assert key not in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)

    # diffusers' own original -> diffusers converters must give back every name and shape.
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for model, back in [(unet, convert_ldm_unet_checkpoint(state, dict(unet.config))),
                        (vae, convert_ldm_vae_checkpoint(state, dict(vae.config)))]:
        want = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert {key: tuple(value.shape) for key, value in back.items()} == want


def tiny_unet(**overrides):
    config = json.loads((TINY_SD / "unet" / "config.json").read_text()) | overrides
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def tiny_parts():
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads((TINY_SD / "vae" / "config.json").read_text()))
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    return vae, text_encoder


def test_unsupported_block_type_is_named():
    unet = tiny_unet(down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D"])
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        to_original_layout(unet, *tiny_parts())


def test_unmapped_keys_are_named():
    unet = tiny_unet()
    # e.g. an adapter that was not merged into the weights before export
    unet.down_blocks[0].resnets[0].register_parameter("oft_R", torch.nn.Parameter(torch.zeros(2, device="meta")))
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0\.oft_R"):
        to_original_layout(unet, *tiny_parts())

    vae, _ = tiny_parts()
    with torch.device("meta"):
        projected = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP))
    with pytest.raises(ValueError, match=r"text_projection\.weight"):
        to_original_layout(tiny_unet(), vae, projected)


def test_generate_samples_a_subject_adapter_on_a_single_file_base(tmp_path, monkeypatch):
    """generate.py base=<the tiny SD as one original-layout file> draws what the folder base
    draws, at the sampling settings the adapter recorded."""
    from PIL import Image

    from orthodiff.app.generate import GenerateConfig, generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    single = save_single_file(pipe, tmp_path / "tiny.safetensors")
    adapter = ROOT / "tests" / "fixtures" / "adapters_d8ec8e9" / "textual_inversion.safetensors"
    images = {}
    for name, base in (("folder", {}), ("single", {"base": str(single), "original_config": str(TINY_SD)})):
        out = generate(GenerateConfig(adapter=str(adapter), prompt="a photo of a sks", num_images=1, steps=2,
                                      out=str(tmp_path / name), **base))
        images[name] = np.asarray(Image.open(out / "sample_00.png"))
        record = json.loads((out / "generate.json").read_text())
        assert record["guidance"] == 4.0 and images[name].shape == (64, 64, 3)
    assert np.array_equal(images["single"], images["folder"])
