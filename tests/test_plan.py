"""plan.py: memory of a training run from shapes alone (meta device), against a real forward on CPU."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from orthodiff.app.plan import architecture, measured_peak, plan
from orthodiff.data.control import CONTROL_CHANNELS
from orthodiff.models.adapters import adapt_unet
from orthodiff.models.control_networks import ControlInjector, build_control_network
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]


def config(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=list(overrides))


def measured_activations(cfg) -> int:
    """The same training forward on real CPU tensors (random weights of the same architecture), with
    torch's own attention kernel: the bytes of the distinct storages it saves for backward."""
    from diffusers import UNet2DConditionModel

    unet_config, vae_config, _ = architecture(cfg.model)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet = UNet2DConditionModel.from_config(unet_config)
    network = build_control_network(cfg.method.control_network, unet, CONTROL_CHANNELS[cfg.control.name], factor)
    adapt_unet(unet, instantiate(cfg.adapter) if cfg.get("adapter") else None)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    batch, resolution = cfg.data.batch_size, cfg.model.resolution
    latents = torch.randn(batch, unet.config.in_channels, resolution // factor, resolution // factor)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim)
    condition = torch.randn(batch, CONTROL_CHANNELS[cfg.control.name], resolution, resolution)
    storages = {}

    def keep(tensor):
        if not isinstance(tensor, nn.Parameter) and not isinstance(tensor._base, nn.Parameter):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with saved_tensors_hooks(keep, lambda tensor: tensor), ControlInjector(unet, network).control(condition):
        unet(latents, torch.randint(0, 1000, (batch,)), encoder_hidden_states=text)
    return sum(storages.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_plan_of_the_tiny_run_matches_a_real_forward(checkpointing):
    cfg = config("experiment=canny", "method=oft", "data.batch_size=8", f"model.gradient_checkpointing={checkpointing}")
    planned = plan(cfg)
    measured = measured_activations(cfg)
    assert planned.rows["activations"] * 2**30 == pytest.approx(measured, rel=0.15)
    assert planned.peak_gb * 2**30 == pytest.approx(measured_peak(cfg), rel=0.15)
    assert planned.parameters["UNet adapter parameters"] > 0 and planned.parameters["control network parameters"] > 0
    assert planned.rows["trainable weights"] == planned.rows["gradients"] == planned.rows["optimizer state"] / 2
    assert all(planned.fits(card) for card in (24, 40, 80))


@pytest.mark.slow
def test_the_plan_of_sd15s_architecture_matches_a_real_forward_at_a_small_size():
    cfg = config("experiment=canny_sd15", "trainer.precision=32-true", "data.batch_size=1", "model.resolution=128")
    planned = plan(cfg)
    assert planned.rows["activations"] * 2**30 == pytest.approx(measured_activations(cfg), rel=0.15)
    assert planned.parameters["UNet adapter parameters"] == 13_144_928  # OFT r=4 on SD 1.5 (reports/params.md)
    assert planned.parameters["frozen parameters"] == pytest.approx(1_066.2e6, rel=1e-4)  # UNet + VAE + CLIP text
    # the whole step's peak, on SD 1.5's UNet and VAE at random init (model=sd15_random: a 2-layer text encoder)
    random = config("experiment=canny_sd15", "model=sd15_random", "trainer.precision=32-true", "data.batch_size=1",
                    "model.resolution=128")
    assert plan(random).peak_gb * 2**30 == pytest.approx(measured_peak(random), rel=0.15)


@pytest.mark.slow
def test_plan_py_says_whether_the_papers_setting_fits_each_card():
    def run(*overrides):
        result = run_script("plan.py", ["experiment=canny_sd15", *overrides, "hydra.run.dir=outputs/plan_test"])
        assert result.returncode == 0, result.stderr[-2000:]
        return {line.split(":")[0]: line.split(": ")[1] for line in result.stdout.splitlines() if " GB card" in line}

    plain, checkpointed = run(), run("model.gradient_checkpointing=true")
    assert set(plain) == {"24 GB card", "40 GB card", "80 GB card"} and plain["80 GB card"] == "fits"
    assert plain["24 GB card"] == "does not fit" and checkpointed["24 GB card"] == "fits"
    bad = run_script("plan.py", ["experiment=canny", "trainer.precision=8-bit", "hydra.run.dir=outputs/plan_test"])
    assert bad.returncode != 0 and "trainer.precision='8-bit'" in bad.stderr
