"""Two conditions at once: the rotation group's composition (product, geodesic mean, powers),
several adapters trained apart composed in the pipeline (OFT, LoRA, ControlNet, refusals),
merge and export of a composed pair, generate.py's adapter=[A,B] form."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from orthodiff.adapter import attach_adapter, save_adapter
from orthodiff.app.export import ExportConfig, export
from orthodiff.data.datasets import ShapesDataset, collate
from orthodiff.models import ControlInjector, LoRAConfig
from orthodiff.models.adapters import fold_adapter
from orthodiff.oft import OFTConfig, OFTLinear, cayley, compose_oft, compose_rotations, geodesic_mean, rotation_power
from orthodiff.oft.cayley import skew_from_triangle
from orthodiff.oft.compose import inverse_cayley, rotation_exp, rotation_log, triangle_from_skew
from orthodiff.pipelines import OrthodiffPipeline
from orthodiff.tasks import ControlTask
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-sd")
EYE = torch.eye(6, dtype=torch.float64)


def rotations(n: int, b: int = 6, blocks: int = 3, scale: float = 0.4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q = skew_from_triangle(scale * torch.randn(n, blocks, b * (b - 1) // 2, generator=generator, dtype=torch.float64), b)
    return cayley(q)


def orthogonality(r: torch.Tensor) -> float:
    return float((r.mT @ r - torch.eye(r.shape[-1], dtype=r.dtype)).abs().max())


# --- the math ------------------------------------------------------------------------------

def test_log_exp_and_the_inverse_cayley_round_trip():
    r = rotations(1)[0]
    assert (rotation_exp(rotation_log(r)) - r).abs().max() < 1e-12
    q = inverse_cayley(r)
    assert (q + q.mT).abs().max() == 0 and (cayley(q) - r).abs().max() < 1e-12
    assert torch.equal(skew_from_triangle(triangle_from_skew(q), 6), q)
    identity = rotation_log(EYE.expand(2, 6, 6))  # a repeated eigenvalue: eigh stays exact
    assert identity.abs().max() < 1e-14
    half_turn = torch.diag(torch.tensor([-1.0, -1.0, 1, 1, 1, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="180 degrees"):
        inverse_cayley(half_turn)


def test_product_mean_and_powers_are_orthogonal_and_scale_zero_is_the_identity():
    a, b = rotations(2)
    pair = torch.stack([a, b])
    for mode in ("product", "mean"):
        assert orthogonality(compose_rotations(pair, [1.0, 0.7], mode)) < 1e-12
    assert orthogonality(rotation_power(a, 0.3)) < 1e-12
    assert torch.equal(compose_rotations(pair, [0.0, 0.0]), EYE.expand(3, 6, 6))
    assert torch.equal(compose_rotations(pair, [1.0, 0.0]), a)  # the second left out
    assert (compose_rotations(pair, [1.0, 0.0], "mean") - a).abs().max() < 1e-12
    assert torch.equal(compose_rotations(pair, [0.0, 0.0], "mean"), EYE.expand(3, 6, 6))
    assert (rotation_power(a, 0.3) @ rotation_power(a, 0.5) - rotation_power(a, 0.8)).abs().max() < 1e-12
    assert (rotation_power(a, -1) - a.mT).abs().max() < 1e-12
    assert (compose_rotations(pair) - a @ b).abs().max() < 1e-15  # the named order
    assert (a @ b - b @ a).abs().max() > 1e-2  # which matters: these do not commute


def test_the_geodesic_mean_is_symmetric_idempotent_and_halves_commuting_rotations():
    a, b = rotations(2, seed=1)
    mean = geodesic_mean(torch.stack([a, b]))
    assert (geodesic_mean(torch.stack([b, a])) - mean).abs().max() < 1e-12
    assert (geodesic_mean(torch.stack([a, a])) - a).abs().max() < 1e-12
    # The midpoint of the geodesic: as far from each, a^T m = m^T b.
    assert (a.mT @ mean - mean.mT @ b).abs().max() < 1e-12
    # Commuting rotations (one orthogonal frame, planes turned by different angles): mean = (ab)^(1/2).
    frame = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))[0]

    def planes(*angles):
        s = torch.zeros(6, 6, dtype=torch.float64)
        for k, angle in enumerate(angles):
            s[2 * k, 2 * k + 1], s[2 * k + 1, 2 * k] = -angle, angle
        return frame @ rotation_exp(s) @ frame.mT

    c, d = planes(0.3, -0.8, 1.1), planes(0.9, 0.2, -0.4)
    assert (c @ d - d @ c).abs().max() < 1e-12
    assert (geodesic_mean(torch.stack([c, d])) - rotation_power(c @ d, 0.5)).abs().max() < 1e-10
    # Weights: 3:1 lands a quarter of the way from c to d.
    assert (geodesic_mean(torch.stack([c, d]), [3, 1]) - rotation_power(c, 0.75) @ rotation_power(d, 0.25)).abs().max() < 1e-10


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(12, 5), nn.Linear(12, 5)


def oft_part(model, config: OFTConfig, seed: int) -> tuple[OFTConfig, dict]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("to_q", "to_k"):
        if any(name == t for t in config.targets):
            stored = 1 if config.block_share else 3
            tensors[f"{name}.oft_generator"] = 0.3 * torch.randn(stored, 6, generator=generator)
    return config, tensors


def test_the_composed_layer_is_the_two_layers_in_sequence_and_stays_cached():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 12)
    first = oft_part(model, OFTConfig(num_blocks=3, targets=["to_q", "to_k"]), 1)
    second = oft_part(model, OFTConfig(num_blocks=3, block_share=True, targets=["to_q"]), 2)
    config, tensors = compose_oft(model, [first, second])
    assert config.targets == ["to_q", "to_k"] and not config.coft and config.cayley == "exact"
    composed = OFTLinear(model.to_q, config)
    composed.load_state_dict({"oft_generator": tensors["to_q.oft_generator"]}, strict=False)
    # In sequence: the first adapter merged into W, the second applied to that merged layer.
    a = OFTLinear(nn.Linear(12, 5), first[0])
    a.base_layer.load_state_dict(model.to_q.state_dict())
    a.load_state_dict({"oft_generator": first[1]["to_q.oft_generator"]}, strict=False)
    a.merge()
    b = OFTLinear(a.base_layer, second[0])
    b.load_state_dict({"oft_generator": second[1]["to_q.oft_generator"]}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(composed(x), b(x), atol=1e-6, rtol=0)
        assert composed.rotation() is composed.rotation()  # a plain generator: the cache still holds
        assert orthogonality(composed.rotation().double()) < 1e-5
    # A Neumann adapter enters with the exact rotation its Neumann path approximates.
    neumann = compose_oft(model, [first, (OFTConfig(num_blocks=3, block_share=True, cayley="neumann",
                                                    targets=["to_q"]), second[1])])[1]
    torch.testing.assert_close(neumann["to_q.oft_generator"], tensors["to_q.oft_generator"], atol=0, rtol=0)
    # to_k: only the first adapts it, so it keeps the first's rotation
    torch.testing.assert_close(tensors["to_k.oft_generator"], first[1]["to_k.oft_generator"], atol=1e-6, rtol=0)
    other = oft_part(model, OFTConfig(block_size=6, targets=["to_q"]), 3)
    with pytest.raises(ValueError, match="to_q: 3 blocks of 4 in adapter 1's layout, 2 of 6 in adapter 2's"):
        compose_oft(model, [first, other])
    with pytest.raises(ValueError, match="adapter 2 has tensors for no target layer"):
        compose_oft(model, [first, (second[0], {**second[1], "to_v.oft_generator": torch.zeros(1, 6)})])


# --- adapters trained apart, composed in the pipeline ---------------------------------------

METHODS = {"oft": (lambda: OFTConfig(num_blocks=4), "hint"), "lora": (lambda: LoRAConfig(rank=2), "hint"),
           "controlnet": (lambda: None, "controlnet")}


def train_two_steps(shapes_root, control: str, method: str, path: Path) -> Path:
    """Two AdamW steps at a high lr on 4 fixture scenes, saved as train.py saves an adapter."""
    adapter, network = METHODS[method]
    torch.manual_seed(0)
    module = ControlTask(control=control, adapter=adapter(), control_network=network, method=method, val_steps=2)
    data = ShapesDataset(shapes_root, "train", control, 64, max_items=4)
    batch = collate([data[i] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-2)
    latents, text = module.encode_images(batch["pixel_values"]), module.encode_text(batch["text"])
    for _ in range(2):
        loss = module.diffusion_loss(latents, lambda noisy, t: module(noisy, t, text, module.condition(batch)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        module.after_step()
    return save_adapter(path, module.eval())


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    return {(control, method): train_two_steps(shapes_root, control, method, root / f"{control}-{method}.safetensors")
            for method in METHODS for control in ("canny", "seg")}


@pytest.fixture(scope="module")
def scene(shapes_root):
    canny, seg = (ShapesDataset(shapes_root, "val", control, 64, max_items=1)[0] for control in ("canny", "seg"))
    return {"canny": canny["conditioning"][None], "seg": seg["conditioning"][None], "text": canny["text"]}


def pipeline() -> OrthodiffPipeline:
    pipe = OrthodiffPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_output(unet, injector, conditions) -> torch.Tensor:
    torch.manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 16, 16)
    t, text = torch.tensor([50, 900]), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), injector.control(conditions):
        return unet(latents, t, encoder_hidden_states=text).sample


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_a_composed_pair_is_the_first_merged_then_the_second_and_merges_exactly(method, trained, scene):
    canny, seg = trained["canny", method], trained["seg", method]
    conditions = [scene["canny"], scene["seg"]]
    pipe = pipeline().load_adapters([canny, seg])
    composed = unet_output(pipe.unet, pipe.injector, conditions)
    # The reference: a UNet with the canny adapter folded into its weights, then the seg adapter on top.
    reference = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    canny_network, _ = attach_adapter(reference, canny)
    fold_adapter(reference)
    seg_network, _ = attach_adapter(reference, seg, allow_other_base=True)  # its weights now hold the canny adapter
    expected = unet_output(reference, ControlInjector(reference, [canny_network, seg_network]), conditions)
    torch.testing.assert_close(composed, expected, atol=1e-5, rtol=0)
    alone = unet_output(reference, ControlInjector(reference, [canny_network, seg_network]), [scene["canny"], None])
    assert (composed - alone).abs().max() > 1e-4  # the seg condition acts
    assert pipe.merge() > 0  # merged == unmerged
    torch.testing.assert_close(unet_output(pipe.unet, pipe.injector, conditions), composed, atol=1e-5, rtol=0)
    pipe.unmerge()
    torch.testing.assert_close(unet_output(pipe.unet, pipe.injector, conditions), composed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_scales_zero_and_the_mean_of_an_adapter_with_itself_leave_it_alone(method, trained, scene):
    canny, seg = trained["canny", method], trained["seg", method]
    single = pipeline().load_adapter(canny)
    alone = unet_output(single.unet, single.injector, scene["canny"])
    muted = pipeline().load_adapters([canny, seg], scales=[1.0, 0.0])
    torch.testing.assert_close(unet_output(muted.unet, muted.injector, [scene["canny"], scene["seg"]]), alone,
                               atol=1e-5, rtol=0)
    twice = pipeline().load_adapters([canny, canny], mode="mean")
    torch.testing.assert_close(unet_output(twice.unet, twice.injector, [scene["canny"], None]), alone, atol=1e-5, rtol=0)


def test_controlnets_add_their_residuals_as_diffusers_multicontrolnet_does(trained, scene):
    pipe = pipeline().load_adapters([trained["canny", "controlnet"], trained["seg", "controlnet"]], scales=[1.0, 0.6])
    composed = unet_output(pipe.unet, pipe.injector, [scene["canny"], scene["seg"]])
    torch.manual_seed(0)
    latents = torch.randn(2, pipe.unet.config.in_channels, 16, 16)
    t, text = torch.tensor([50, 900]), torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    multi = MultiControlNetModel(list(pipe.control_networks))
    with torch.no_grad():
        down, mid = multi(latents, t, text, controlnet_cond=[scene["canny"].expand(2, -1, -1, -1),
                                                             scene["seg"].expand(2, -1, -1, -1)],
                          conditioning_scale=[1.0, 0.6], return_dict=False)
        pipe.injector.remove()
        expected = pipe.unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
    torch.testing.assert_close(composed, expected, atol=1e-5, rtol=0)
    assert all(isinstance(n, ControlNetModel) for n in pipe.control_networks)


def test_a_hint_adapter_and_a_controlnet_meet_the_unet_side_by_side(trained, scene):
    pipe = pipeline().load_adapters([trained["canny", "oft"], trained["seg", "controlnet"]])
    images = pipe(scene["text"], control_image=[np.uint8(scene["canny"][0, 0].numpy() * 255), None], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and pipe.last_conditions[1] is None
    with pytest.raises(ValueError, match=r"take 2 conditions \(canny, seg\)"):
        pipe("x", control_image="edges.png")


def test_incompatible_pairs_are_refused_in_one_line_naming_both_files(trained, tmp_path):
    oft, lora = trained["canny", "oft"], trained["seg", "lora"]
    cases = [([oft, lora], "their UNet adapters are of different kinds")]
    with safe_open(str(oft), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "other-base.safetensors",
              metadata={**metadata, "target_fingerprint": "0123456789abcdef", "base_model": "some/other-model"})
    cases.append(([trained["seg", "oft"], tmp_path / "other-base.safetensors"], "was trained on base model 'some/other-model'"))
    coarse = ControlTask(control="seg", adapter=OFTConfig(num_blocks=2), method="oft", val_steps=2)
    save_adapter(tmp_path / "r2.safetensors", coarse)
    cases.append(([oft, tmp_path / "r2.safetensors"], "block layouts must agree to compose"))
    for paths, message in cases:
        with pytest.raises(ValueError) as error:
            pipeline().load_adapters(paths)
        text = str(error.value)
        assert message in text and str(paths[0]) in text and str(paths[1]) in text and "\n" not in text, text


def test_export_folds_a_composed_pair_into_one_plain_unet(trained, scene, tmp_path):
    paths = [trained["canny", "oft"], trained["seg", "oft"]]
    out = export(ExportConfig(adapter=[str(p) for p in paths], out=str(tmp_path / "merged"), scales=[1.0, 0.5]))
    plain = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert not any("oft_" in k for k in plain.unet.state_dict())
    from orthodiff.models import ControlEncoder

    networks = [ControlEncoder.from_pretrained(out / f"control_network_{k}") for k in (1, 2)]
    assert '"scale": 0.5' in (out / "control_network_2" / "orthodiff.json").read_text()
    conditions = [scene["canny"], scene["seg"]]
    exported = unet_output(plain.unet, ControlInjector(plain.unet, networks, [1.0, 0.5]), conditions)
    composed = pipeline().load_adapters(paths, scales=[1.0, 0.5])
    torch.testing.assert_close(exported, unet_output(composed.unet, composed.injector, conditions), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_generate_cli_composes_two_adapters(trained, scene, tmp_path):
    Image.fromarray(np.uint8(scene["canny"][0, 0].numpy() * 255)).save(tmp_path / "edges.png")
    Image.fromarray(np.uint8(scene["seg"][0].permute(1, 2, 0).numpy() * 255)).save(tmp_path / "seg.png")
    adapters = f"adapter=[{trained['canny', 'oft']},{trained['seg', 'oft']}]"
    result = run_script("generate.py", [adapters, f"condition=[{tmp_path / 'edges.png'},{tmp_path / 'seg.png'}]",
                                        "scales=[1.0,0.5]", "compose=mean", "prompt=a red circle", "num_images=2", "steps=2",
                                        f"out={tmp_path / 'out'}"], timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    assert grid.shape == (64, 64 * 4, 3)  # canny | seg | 2 samples
    wrong = run_script("generate.py", [adapters, f"condition={tmp_path / 'edges.png'}", "prompt=x"], timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert wrong.returncode != 0 and "1 condition(s) for 2 (canny, seg)" in wrong.stderr and "Traceback" not in wrong.stderr



# --- one adapter trained on both conditions -------------------------------------------------

def test_a_joint_condition_stacks_its_parts_with_presence_and_drops_each_alone():
    from orthodiff.data.control import condition_channels, drop_conditions, joint_condition, preview_condition

    canny, seg = torch.ones(2, 1, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert condition_channels("canny+seg") == 6 and condition_channels("seg") == 3
    both = joint_condition("canny+seg", [canny, seg])
    assert both.shape == (2, 6, 4, 4) and both[:, 4:].min() == 1  # both present
    only_edges = joint_condition("canny+seg", [canny, None])
    assert only_edges[:, 1:4].abs().max() == 0 and only_edges[:, 4].min() == 1 and only_edges[:, 5].max() == 0
    assert joint_condition("canny+seg", [None, None]) is None and joint_condition("seg", [seg]) is seg
    assert preview_condition("canny+seg", both).shape == (2, 3, 4, 8)
    with pytest.raises(ValueError, match="names a condition twice"):
        condition_channels("seg+seg")
    batch = joint_condition("canny+seg", [torch.ones(4000, 1, 2, 2), torch.ones(4000, 3, 2, 2)])
    dropped = drop_conditions("canny+seg", batch, 0.3, torch.Generator().manual_seed(0))
    edges_kept, seg_kept = dropped[:, 4, 0, 0], dropped[:, 5, 0, 0]
    assert torch.equal(dropped[:, 0, 0, 0], edges_kept) and torch.equal(dropped[:, 1:4, 0, 0].amin(1), seg_kept)
    assert abs(1 - edges_kept.mean().item() - 0.3) < 0.03 and abs(1 - seg_kept.mean().item() - 0.3) < 0.03
    assert abs(((1 - edges_kept) * (1 - seg_kept)).mean().item() - 0.09) < 0.02  # independently
    assert torch.equal(drop_conditions("canny", canny, 0.3), canny)


@pytest.fixture(scope="module")
def joint_run(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("joint")
    result = run_script("train.py", [
        "experiment=canny_seg", f"data.train.root={shapes_root}", "data.val.max_items=4", "data.batch_size=4",
        "data.val_batch_size=4", "model.val_steps=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
        "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={out}"], timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_experiment_canny_seg_trains_one_adapter_on_both_that_serves_each_alone(joint_run, scene):
    import json

    from orthodiff.adapter import load_adapter, read_adapter

    final = json.loads((joint_run / "metrics.json").read_text())["final"]
    assert {"canny_iou", "seg_miou"} <= set(final)  # both conditions scored on the same samples
    tensors, meta = read_adapter(joint_run / "adapter.safetensors")
    assert meta["control"] == "canny+seg" and tensors["control_network.blocks.0.weight"].shape[1] == 6
    pipe = pipeline().load_adapter(joint_run / "adapter.safetensors")
    assert pipe.conditions == ["canny", "seg"]
    module = load_adapter(joint_run / "adapter.safetensors")
    edges = np.uint8(scene["canny"][0, 0].numpy() * 255)
    for given, parts in (([edges, None], [scene["canny"], None]), ([None, np.uint8(scene["seg"][0].permute(1, 2, 0).numpy() * 255)],
                                                                   [None, scene["seg"]])):
        images = pipe(scene["text"], control_image=given, num_inference_steps=3, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
        from orthodiff.data.control import joint_condition

        reference = module.generate([scene["text"]], joint_condition("canny+seg", parts), seed=0, steps=3,
                                    guidance=4.0, progress=False)
        torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)


# --- table=multi ---------------------------------------------------------------------------

def test_retention_gain_kept_and_condition_maps_round_trip(shapes_root):
    from orthodiff.reproduce.multi import condition_array, gain_kept, retention

    assert retention(0.3, 0.4, higher=True) == pytest.approx(0.75) and retention(8.0, 6.0, higher=False) == pytest.approx(0.75)
    assert math.isnan(retention(0.3, 0.0, higher=True))
    assert gain_kept(0.25, 0.4, 0.1) == pytest.approx(0.5) and gain_kept(7.0, 4.0, 10.0) == pytest.approx(0.5)  # RMSE: lower
    assert math.isnan(gain_kept(0.2, 0.1, 0.1))
    from orthodiff.pipelines import load_condition

    for control in ("canny", "seg", "depth"):  # the encoded maps the table hands the pipeline come back exactly
        encoded = ShapesDataset(shapes_root, "val", control, 64, max_items=1)[0]["conditioning"]
        assert torch.equal(load_condition(condition_array(encoded), control, (64, 64), "never")[0], encoded), control


def test_the_demo_composes_a_second_adapter_with_its_condition(trained, scene):
    from orthodiff.app.demo import Demo

    demo = Demo(adapter_dirs=[], device="cpu")
    edges = np.uint8(scene["canny"][0, 0].numpy() * 255)
    seg = np.uint8(scene["seg"][0].permute(1, 2, 0).numpy() * 255)
    seen, samples, info = demo.generate(edges, None, "upload", "a red circle", None, str(trained["canny", "oft"]),
                                        2, 4.0, 0, 1, "never", second_path=str(trained["seg", "oft"]),
                                        second_condition=seg, second_scale=0.5, compose="mean",
                                        progress=lambda *args, **kwargs: None)
    assert seen.shape == (64, 128, 3) and np.array_equal(seen[:, 64:], seg)  # both conditions, side by side
    assert len(samples) == 1 and "oft + oft adapter, canny + seg control" in info and "scale 0.5 (mean)" in info
