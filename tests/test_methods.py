"""The compared methods: each trains only its own tensors, starts from (or, for T2I-Adapter,
near) the base model, round-trips through the adapter file, and errors name what is wrong."""

import json

import pytest
import torch
from safetensors.torch import save_file

from orthodiff.adapter import load_adapter, read_adapter, save_adapter
from orthodiff.data import ShapesDataset, collate
from orthodiff.models import FullFinetuneConfig, LoRAConfig
from orthodiff.oft import OFTConfig
from orthodiff.tasks import ControlTask

METHODS = {
    # name: (adapter, control network, the only trainable tensors' name fragments)
    "coft": (OFTConfig(num_blocks=4, coft=True, coft_norm="paper"), "hint", ("oft_generator", "control_network.")),
    "coft_rotation": (OFTConfig(num_blocks=4, coft=True), "hint", ("oft_generator", "control_network.")),
    "hint": (None, "hint", ("control_network.",)),
    "lora": (LoRAConfig(rank=2), "hint", ("lora_A", "lora_B", "control_network.")),
    "full": (FullFinetuneConfig(), "hint", ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "control_network.")),
    "controlnet": (None, "controlnet", ("control_network.",)),
    "t2i_adapter": (None, "t2i_adapter", ("control_network.",)),
    "t2i_adapter_light": (None, "t2i_adapter_light", ("control_network.",)),
}


def build(name, control="canny"):
    adapter, network, _ = METHODS[name]
    return ControlTask(control=control, adapter=adapter, control_network=network, method=name, val_steps=2)


@pytest.fixture(scope="module")
def batch(shapes_root):
    return collate([ShapesDataset(shapes_root, "train", "canny")[i] for i in range(4)])


def unet_output(module, batch, seed=0):
    torch.manual_seed(seed)
    latents = torch.randn(len(batch["text"]), module.unet.config.in_channels, 16, 16)
    t = torch.tensor([100, 400, 700, 900][: len(latents)])
    with torch.no_grad():
        return module(latents, t, module.encode_text(batch["text"]), batch["conditioning"])


def frozen_base_output(batch):
    module = ControlTask(control="canny", adapter=None, control_network="hint")
    return unet_output(module, batch)  # the hint encoder starts at zero: the base UNet


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_only_its_tensors_and_round_trips(name, batch, tmp_path):
    module = build(name)
    fragments = METHODS[name][2]
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(any(f in n for f in fragments) for n in trainable), trainable[:5]
    assert not any(p.requires_grad for p in module.vae.parameters())
    assert not any(p.requires_grad for p in module.text_encoder.parameters())

    if name != "t2i_adapter" and name != "t2i_adapter_light":  # T2I-Adapter is not zero-initialized
        torch.testing.assert_close(unet_output(module, batch), frozen_base_output(batch), atol=1e-5, rtol=0)

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    for _ in range(2):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_step()
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no trainable tensor moved"
    assert all(torch.isfinite(p).all() for p in module.parameters())

    path = save_adapter(tmp_path / "adapter.safetensors", module)
    tensors, meta = read_adapter(path)
    assert meta["method"] == name and meta["control_network"] == METHODS[name][1]
    assert set(tensors) == set(module.trainable_state_dict())
    reloaded = load_adapter(path)
    module.eval()
    torch.testing.assert_close(unet_output(reloaded, batch), unet_output(module, batch))

    images = reloaded.generate(batch["text"][:2], batch["conditioning"][:2], steps=2, progress=False)
    assert images.shape == (2, 3, 64, 64) and images.std() > 0.01  # a picture, not a blank the clamp hid


def test_lora_and_oft_share_targets_and_counts_are_as_designed():
    lora = build("lora")
    oft = build("coft")
    assert lora.adapted_layers == oft.adapted_layers and len(oft.adapted_layers) > 0
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if p.requires_grad and "lora_" in n)
    expected = 0
    for name in lora.adapted_layers:
        base = lora.unet.get_submodule(name).base_layer
        expected += 2 * (base.in_features + base.out_features)  # rank 2: A (2 x in) + B (out x 2)
    assert lora_params == expected


def test_version_1_adapter_files_still_load(batch, tmp_path):
    """Format 1 (issue 4's files): "oft_config" + "control_encoder.*" keys."""
    module = build("coft")
    torch.nn.init.normal_(module.control_network.zero_conv.weight, std=0.05)
    tensors = {k.replace("control_network.", "control_encoder.", 1): v.contiguous()
               for k, v in module.trainable_state_dict().items()}
    oft = module.adapter_config
    metadata = {"format": "orthodiff-adapter", "format_version": "1", "base_model": "assets/tiny-sd",
                "target_fingerprint": module.target_fingerprint, "control": "canny",
                "oft_config": json.dumps(oft.__dict__),
                "control_encoder_config": json.dumps(dict(module.control_network.config))}
    save_file(tensors, tmp_path / "v1.safetensors", metadata=metadata)
    reloaded = load_adapter(tmp_path / "v1.safetensors")
    assert reloaded.hparams.method == "coft"
    module.eval()
    torch.testing.assert_close(unet_output(reloaded, batch), unet_output(module, batch))


def test_adapter_for_another_base_model_names_both(tmp_path):
    module = build("coft")
    path = save_adapter(tmp_path / "a.safetensors", module)
    tensors, meta = read_adapter(path)
    raw = {k: v.contiguous() for k, v in tensors.items()}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    metadata["target_fingerprint"] = "0123456789abcdef"
    metadata["base_model"] = "some/other-model"
    save_file(raw, tmp_path / "b.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"some/other-model.*assets/tiny-sd|assets/tiny-sd.*some/other-model"):
        load_adapter(tmp_path / "b.safetensors", pretrained="assets/tiny-sd")


def test_adapter_for_a_retrained_base_with_the_same_layers_is_refused(tmp_path):
    """An older tiny SD (same architecture, other weights, as v2 is to v3): the shape
    fingerprint matches, the weight signature does not."""
    import shutil

    from diffusers import UNet2DConditionModel

    from orthodiff.models.adapters import same_signature, target_signature
    from orthodiff.models.tiny_sd import TINY_SD_PATH

    older = tmp_path / "older-tiny-sd"
    shutil.copytree(TINY_SD_PATH, older)
    unet = UNet2DConditionModel.from_pretrained(older / "unet")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn_like(p))  # what retraining leaves: every weight moved
    unet.save_pretrained(older / "unet")
    trained = ControlTask(control="canny", adapter=OFTConfig(num_blocks=4, coft=True), control_network="hint",
                          method="coft", pretrained=str(older), val_steps=2)
    path = save_adapter(tmp_path / "older.safetensors", trained)
    with pytest.raises(ValueError, match=r"older-tiny-sd.*same shapes but other weights.*allow_other_base=True"):
        load_adapter(path, pretrained=str(TINY_SD_PATH))
    assert load_adapter(path, pretrained=str(TINY_SD_PATH), allow_other_base=True).hparams.method == "coft"
    assert load_adapter(path).hparams.pretrained == str(older)  # its own base still loads
    from orthodiff.pipelines import OrthodiffPipeline  # the inference path checks the same

    def pipe():
        return OrthodiffPipeline.from_pretrained(TINY_SD_PATH, safety_checker=None, requires_safety_checker=False)

    with pytest.raises(ValueError, match="same shapes but other weights"):
        pipe().load_adapter(path)
    assert pipe().load_adapter(path, allow_other_base=True).control == "canny"
    # One base in half precision is still that base.
    base = UNet2DConditionModel.from_pretrained(TINY_SD_PATH / "unet")
    assert same_signature(target_signature(base), target_signature(base.to(torch.bfloat16)))


def test_unknown_control_network_lists_the_choices():
    with pytest.raises(ValueError, match="t2i_adapter_light"):
        ControlTask(control="canny", adapter=None, control_network="t3i")
