"""Controllable generation: control encoder, UNet hook, Lightning module, scorers."""

import numpy as np
import pytest
import torch

from orthodiff.data import ShapesDataset, collate
from orthodiff.eval.control_metrics import ControlScorer, edge_scores
from orthodiff.models import ControlEncoder, ControlInjector
from orthodiff.oft import OFTConfig, oft_layers
from orthodiff.tasks import ControlTask, NonFiniteLossError


def test_control_encoder_matches_controlnet_hint_block_at_sd15_scale():
    encoder = ControlEncoder(in_channels=3, out_channels=320, downscale_factor=8)
    assert sum(p.numel() for p in encoder.parameters()) == 1_086_480  # BRIEF: 1.09 M
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 96, 96, 256, 320]
    assert sum(c.stride == (2, 2) for c in convs) == 3
    out = encoder(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 320, 8, 8) and out.abs().max() == 0  # zero-initialized last conv


def test_control_encoder_follows_vae_factor_and_round_trips(tmp_path):
    encoder = ControlEncoder(in_channels=1, out_channels=64, downscale_factor=4)
    torch.nn.init.normal_(encoder.zero_conv.weight)
    assert encoder(torch.rand(1, 1, 64, 64)).shape == (1, 64, 16, 16)
    encoder.save_pretrained(tmp_path)
    loaded = ControlEncoder.from_pretrained(tmp_path)
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(loaded(x), encoder(x))
    with pytest.raises(ValueError, match="downscale_factor=3"):
        ControlEncoder(downscale_factor=3)


def test_injector_adds_features_once_and_repeats_them_for_guidance():
    from orthodiff.models.tiny_sd import build_unet

    unet = build_unet()
    encoder = ControlEncoder(in_channels=1, out_channels=64, downscale_factor=4)
    injector = ControlInjector(unet, encoder)
    latents, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 64)
    base = unet(latents, t, text).sample
    condition = torch.rand(1, 1, 64, 64)
    with injector.control(condition):
        torch.testing.assert_close(unet(latents, t, text).sample, base)  # zero-initialized = base model
    torch.nn.init.normal_(encoder.zero_conv.weight, std=0.1)
    # The expected output: the encoder's features of the one condition added to conv_in's
    # output for both halves of the batch (batch 2 = [uncond; cond] of one image).
    features = encoder(condition)
    handle = unet.conv_in.register_forward_hook(lambda module, inputs, output: output + features.repeat(2, 1, 1, 1))
    expected = unet(latents, t, text).sample
    handle.remove()
    calls = []
    counter = encoder.register_forward_hook(lambda *args: calls.append(1))
    with injector.control(condition):
        controlled = unet(latents, t, text).sample
        again = unet(latents, t, text).sample  # a second UNet call (next sampling step) reuses the features
    counter.remove()
    assert len(calls) == 1, "the encoder runs once per condition, not once per UNet call"
    torch.testing.assert_close(controlled, expected)
    torch.testing.assert_close(again, expected)
    assert (controlled - base).abs().max() > 1e-3  # the features do reach the output
    injector.remove()
    with injector.control(condition):
        torch.testing.assert_close(unet(latents, t, text).sample, base)  # hook removed


@pytest.fixture(scope="module")
def module():
    return ControlTask(control="canny", adapter=OFTConfig(num_blocks=4, coft=True, eps=1e-3),
                         cache_latents=True, val_steps=2)


def test_module_trains_only_oft_and_encoder(module):
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("control_network.") or n.endswith("oft_generator") for n in trainable)
    assert set(module.trainable_state_dict()) == trainable
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == trainable


def test_training_steps_reduce_loss_and_respect_coft(module, shapes_root):
    torch.manual_seed(0)
    batch = collate([ShapesDataset(shapes_root, "train", "canny")[i] for i in range(8)])
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(12):
        torch.manual_seed(1)  # same noise and timesteps: the loss on this batch must fall
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses  # 0.384 -> 0.363 measured
    from orthodiff.oft.cayley import cayley, skew_from_triangle

    worst = max((cayley(skew_from_triangle(layer.oft_generator.detach().double(), layer.block_size))
                 - torch.eye(layer.block_size, dtype=torch.float64))
                .flatten(1).norm(dim=1).max().item() for layer in oft_layers(module.unet))
    assert 0 < worst <= 1e-3 * (1 + 1e-6)
    assert module.control_network.zero_conv.weight.abs().max() > 0


def test_epsilon_prediction_and_nonfinite_loss(module, shapes_root):
    from diffusers import DDPMScheduler

    batch = collate([ShapesDataset(shapes_root, "train", "canny")[i] for i in range(2)])
    original = module.noise_scheduler
    module.noise_scheduler = DDPMScheduler.from_config(original.config, prediction_type="epsilon")
    try:
        assert torch.isfinite(module.training_step(batch, 0))
        batch["conditioning"][0, 0, 0, 0] = float("nan")
        with pytest.raises(NonFiniteLossError, match="last checkpoint"):
            module.training_step(batch, 0)
    finally:
        module.noise_scheduler = original


def test_generate_and_scorers(module, shapes_root):
    dataset = ShapesDataset(shapes_root, "val", "canny", max_items=4)
    batch = collate([dataset[i] for i in range(4)])
    images = module.generate(batch["text"], batch["conditioning"], seed=3, steps=3, progress=False)
    again = module.generate(batch["text"], batch["conditioning"], seed=3, steps=3, progress=False)
    assert images.shape == (4, 3, 64, 64) and torch.equal(images, again)  # fixed seeds
    source = ((batch["pixel_values"] + 1) / 2)
    scorer = ControlScorer("canny")
    scorer.update(source, batch)
    assert scorer.compute() == {"canny_iou": 1.0, "canny_f1": 1.0}
    blank = np.zeros((64, 64, 3), np.uint8)
    assert edge_scores(blank, (source[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)) == (0.0, 0.0)
    for control, key, bound in (("seg", "seg_miou", 0.8), ("depth", "depth_rmse", 0.12)):
        data = ShapesDataset(shapes_root, "val", control)
        real = collate([data[i] for i in range(len(data))])
        scorer = ControlScorer(control, num_classes=data.num_classes)
        scorer.update((real["pixel_values"] + 1) / 2, real)
        value = scorer.compute()[key]
        assert value >= bound if key == "seg_miou" else value <= bound, (control, value)


def test_shapes_depth_condition_is_near_bright_and_target_keeps_dataset_units(shapes_root):
    item = ShapesDataset(shapes_root, "val", "depth")[0]
    depth, condition = item["target"]["depth"], item["conditioning"][0]
    background = depth == 1.0
    assert background.any() and (~background).any()
    assert condition[background].max() == 0  # far background -> dark
    torch.testing.assert_close(condition[~background], 1 - depth[~background], atol=1 / 255, rtol=0)


@pytest.mark.parametrize("method", ["oft", "controlnet"])
def test_gradient_checkpointing_keeps_the_gradients_and_saves_fewer_activations(shapes_root, method):
    from torch.autograd.graph import saved_tensors_hooks

    adapter, network = (OFTConfig(num_blocks=4), "hint") if method == "oft" else (None, "controlnet")
    batch = collate([ShapesDataset(shapes_root, "train", "canny")[i] for i in range(4)])
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = ControlTask(control="canny", adapter=adapter, control_network=network, method=method,
                             gradient_checkpointing=checkpointing)
        trainable = dict((n, p) for n, p in module.named_parameters() if p.requires_grad)
        with torch.no_grad():  # away from the zero init, so every gradient is non-trivial
            for p in trainable.values():
                p.add_(1e-2 * torch.randn_like(p))
        saved = []  # the tensors the forward keeps for backward (inside a checkpoint: only its inputs)

        def keep(tensor, saved=saved):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        torch.manual_seed(1)
        with saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = module.training_step(batch, 0)
        loss.backward()
        results[checkpointing] = ({n: p.grad for n, p in trainable.items()}, sum(saved))
    (plain, plain_bytes), (checkpointed, checkpointed_bytes) = results[False], results[True]
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert checkpointed_bytes < 0.7 * plain_bytes, (checkpointed_bytes, plain_bytes)
