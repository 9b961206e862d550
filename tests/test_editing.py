"""Attribute editing by a learned per-step prompt mix (orthodiff.editing, edit.py): the
schedule's gradient, the exact endpoints, inversion, the schedule file's refusals, the
objectives' figures on real shapes-world scenes, and edit.py's outputs and one-line errors."""

import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from orthodiff.adapter import save_adapter
from orthodiff.data.shapes import make_scene
from orthodiff.editing import (
    ClipObjective,
    Edit,
    ShapesObjective,
    build_objective,
    caption_changes,
    denoise,
    invert,
    load_edit_model,
    load_schedule,
    mix,
    paper_schedule,
    switch_schedule,
)
from orthodiff.editing.perceptual import PerceptualDistance
from orthodiff.editing.sampler import null_text
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.models.sampling import sample
from orthodiff.oft import OFTConfig
from orthodiff.tasks import ControlTask
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]
NEUTRAL = "a red circle on a black background"
WHITE = "a red circle on a white background"
SQUARE = "a red square on a black background"
ADDED = "a red circle and a blue square on a black background"
EDIT_MAIN = runpy.run_path(str(ROOT / "edit.py"))["main"]


@pytest.fixture(scope="module")
def tiny():
    return load_edit_model()


def scene(seed: int, color="red", kind="circle", background="black") -> np.ndarray:
    """A one-shape scene; the same seed gives the same layout whatever the colour, kind or
    background (each vocabulary has one entry, so the random draws are the same)."""
    return make_scene(seed, shapes=(kind,), colors=(color,), backgrounds=(background,)).image


def test_mix_orientation_and_per_sample_schedules():
    neutral, attribute = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    states = mix(torch.tensor([1.0, 0.25, 0.0]), neutral, attribute)
    assert [float(s.mean()) for s in states] == [0.0, 0.75, 1.0]  # lambda = 1 is the neutral prompt
    per_sample = mix(torch.tensor([[1.0, 0.0]]), neutral, attribute)[0]
    assert per_sample[0].eq(0).all() and per_sample[1].eq(1).all()
    assert switch_schedule(4, 1).tolist() == [1, 0, 0, 0] and paper_schedule(50).sum() == 20


@pytest.mark.parametrize("grad", [False, True])
def test_lambda_one_and_zero_reproduce_the_prompts_samples_exactly(tiny, grad):
    edit = Edit(tiny, NEUTRAL, WHITE, steps=4, guidance=7.5)
    noise = torch.cat([tiny.noise(0), tiny.noise(1)])
    neutral, attribute, empty = (e.expand(2, -1, -1) for e in (edit.neutral, edit.attribute, edit.empty))
    for lambdas, prompt in ((torch.ones(4), neutral), (torch.zeros(4), attribute)):
        with torch.set_grad_enabled(grad):  # with gradients the steps run checkpointed
            lambdas = lambdas.clone().requires_grad_(grad)
            latents = denoise(tiny.unet, tiny.scheduler_config, noise, mix(lambdas, neutral, attribute), empty, 7.5)
        reference = sample(tiny.unet, tiny.scheduler_config, noise, prompt, empty, 4, 7.5, progress=False)
        assert torch.equal(latents.detach(), reference)
        with torch.no_grad():
            assert torch.equal(edit.render(noise, lambdas.detach()), tiny.decode(reference))


def test_schedule_gradient_matches_finite_differences():
    """d loss / d lambda_t through a 4-step chain and the VAE decoder (checkpointed), in
    float64, against central differences on two lambdas."""
    model = load_edit_model()
    model.unet.double(), model.vae.double()
    edit = Edit(model, NEUTRAL, SQUARE, steps=4, guidance=7.5)
    edit.neutral, edit.attribute, edit.empty = edit.neutral.double(), edit.attribute.double(), edit.empty.double()
    noise = model.noise(0).double()
    weights = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(lambdas):
        return (edit.render(noise, lambdas) * weights).sum()

    lambdas = torch.tensor([1.0, 0.7, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    loss(lambdas).backward()
    eps = 1e-4
    with torch.no_grad():
        for t in (1, 2):
            step = torch.zeros(4, dtype=torch.float64)
            step[t] = eps
            numeric = (loss(lambdas + step) - loss(lambdas - step)) / (2 * eps)
            assert abs(numeric) > 1e-2  # the test can fail: these lambdas matter
            assert torch.isclose(lambdas.grad[t], numeric, rtol=1e-4, atol=1e-9), (t, lambdas.grad[t], numeric)
    edit.checkpoint = False  # the same gradient without recomputation
    plain = lambdas.detach().clone().requires_grad_(True)
    loss(plain).backward()
    assert torch.allclose(plain.grad, lambdas.grad, rtol=1e-10)


@pytest.mark.slow
def test_inversion_redraws_the_image(tiny):
    """Unguided DDIM inversion's fixed-point refinement converges: every round count brings the
    reconstruction closer (plain rounds flipped between two points on tiny SD v3: odd and even
    counts gave 0.018 and 0.28); null-text inversion makes the guided chain retrace it far
    better than the plain inverted noise does."""
    edit = Edit(tiny, NEUTRAL, SQUARE, steps=10, guidance=7.5)
    latents = tiny.encode_image(images_to_tensor(scene(3)))
    text, empty = edit.neutral, edit.empty
    errors = []
    for refine in (0, 3, 4, 8):
        trajectory = invert(tiny.unet, tiny.scheduler_config, latents, text, empty, 10, guidance=1.0, refine=refine)
        with torch.no_grad():
            unguided = denoise(tiny.unet, tiny.scheduler_config, trajectory[-1], [text] * 10, empty, 1.0)
        errors.append(float((unguided - latents).abs().mean()))
    # measured on v3: 0.061, 0.029, 0.023, 0.011 (latents' mean magnitude 0.61)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.25 * errors[0], errors
    with torch.no_grad():
        guided = denoise(tiny.unet, tiny.scheduler_config, trajectory[-1], [text] * 10, empty, 7.5)
    uncond = null_text(tiny.unet, tiny.scheduler_config, trajectory, text, empty, 7.5, iterations=10)
    with torch.no_grad():
        retraced = denoise(tiny.unet, tiny.scheduler_config, trajectory[-1], [text] * 10, uncond, 7.5)
    error, plain_error = (retraced - latents).abs().mean(), (guided - latents).abs().mean()
    # measured: 0.107 against 0.214 on tiny SD v2, 0.072 against 0.094 on v3 (its plain guided chain
    # already retraces better; 10 null-text iterations per step close less of what is left)
    assert error < 0.85 * plain_error, (error, plain_error)


def test_shapes_objective_reads_true_edits_of_real_scenes():
    changes, _ = caption_changes(NEUTRAL, "a green square on a white background")
    assert [c.label for c in changes] == ["background black -> white", "circle red -> green", "red circle -> square"]
    assert [c.what for c in changes] == ["background", "colour", "kind"]
    added, _ = caption_changes(NEUTRAL, ADDED)
    assert [(c.what, c.label) for c in added] == [("count", "add a blue square")]
    with pytest.raises(ValueError, match="1 and 2 shapes"):
        caption_changes(NEUTRAL, "a blue square and a red circle on a black background")
    with pytest.raises(ValueError, match="same scene"):
        caption_changes(NEUTRAL, NEUTRAL)
    with pytest.raises(ValueError, match="clip_model="):
        build_objective("a photo of a person", "a photo of a person, smiling")
    with pytest.raises(ValueError, match="read 64 px images and this model draws 512 px"):
        build_objective(NEUTRAL, WHITE, resolution=512)

    seeds = range(4)
    neutral = images_to_tensor(np.stack([scene(s) for s in seeds]))
    for attribute, edited in ((WHITE, [scene(s, background="white") for s in seeds]),
                              ("a green circle on a black background", [scene(s, color="green") for s in seeds]),
                              (SQUARE, [scene(s, kind="square") for s in seeds])):
        objective = ShapesObjective(NEUTRAL, attribute)
        objective.prepare(neutral)
        scores = objective.scores(images_to_tensor(np.stack(edited)))
        assert scores["success"].mean() == 1 and scores["neutral_ok"].mean() == 1, (attribute, scores)
        # A square of the circle's circumradius covers 2 / pi of it: IoU 0.64 for a perfect kind edit.
        assert scores["content_iou"].min() > (0.6 if attribute == SQUARE else 0.95), (attribute, scores)
        assert scores["count_kept"].mean() == 1
        unchanged = objective.scores(neutral)
        assert unchanged["success"].sum() == 0 and unchanged["content_iou"].min() == 1
        true_edit, no_edit = objective.loss(images_to_tensor(np.stack(edited))), objective.loss(neutral)
        assert true_edit["direction"].shape == (4,) and (true_edit["direction"] < objective.direction_mark).all()
        assert true_edit["direction"].mean() < 0.2 * no_edit["direction"].mean(), (attribute, true_edit, no_edit)
        assert no_edit["content"].max() < 1e-3
        assert objective.passed(images_to_tensor(np.stack(edited))).all() and not objective.passed(neutral).any()

    # A count edit: a blue square pasted beside the red circle (on black, max composites the two).
    seeds = [s for s in range(40) if (scene(s).max(2) > 0).mean() + (scene(s + 100, "blue", "square").max(2) > 0).mean()
             - ((scene(s).max(2) > 0) | (scene(s + 100, "blue", "square").max(2) > 0)).mean() == 0][:4]
    neutral = images_to_tensor(np.stack([scene(s) for s in seeds]))
    added = images_to_tensor(np.stack([np.maximum(scene(s), scene(s + 100, "blue", "square")) for s in seeds]))
    objective = ShapesObjective(NEUTRAL, ADDED)
    objective.prepare(neutral)
    assert objective.scores(added)["success"].mean() == 1 and objective.scores(neutral)["success"].sum() == 0
    assert objective.loss(added)["direction"].max() < objective.direction_mark < objective.loss(neutral)["direction"].min()
    # Two changes at once: success asks for both, and each is read alone.
    both = ShapesObjective(NEUTRAL, "a green circle on a white background")
    both.prepare(neutral)
    white = both.scores(images_to_tensor(np.stack([scene(s, background="white") for s in seeds])))
    assert white["success"].sum() == 0 and white["reads background black -> white"].mean() == 1
    assert white["reads circle red -> green"].sum() == 0


def vgg_weights(path: Path, width: int = 4) -> Path:
    """A narrow random network in torchvision's vgg16 key layout (conv indices of features)."""
    generator = torch.Generator().manual_seed(0)
    state, channels = {}, 3
    for index in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28):
        state[f"features.{index}.weight"] = 0.3 * torch.randn(width, channels, 3, 3, generator=generator)
        state[f"features.{index}.bias"] = torch.zeros(width)
        channels = width
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, path)
    return path


def test_clip_objective_and_perceptual_distances(tiny_clip, tmp_path):
    vgg = vgg_weights(tmp_path / "vgg16.pth")
    save_file({f"lin{k}.model.1.weight": torch.rand(1, 4, 1, 1) for k in range(5)}, tmp_path / "lpips.safetensors")
    images = images_to_tensor(np.stack([scene(0), scene(0, background="white")]))
    for lpips in (None, tmp_path / "lpips.safetensors"):
        distance = PerceptualDistance(vgg, lpips)
        assert distance(images, images).abs().max() < 1e-6 and (distance(images, images.flip(0)) > 0).all()
    objective = build_objective(NEUTRAL, WHITE, clip_model=str(tiny_clip), perceptual=str(vgg))
    assert isinstance(objective, ClipObjective) and objective.content_weight == 0.05
    objective.prepare(images[:1])
    edited = images[1:].clone().requires_grad_(True)
    parts = objective.loss(edited)
    parts["loss"].sum().backward()
    assert torch.isfinite(parts["loss"]) and edited.grad.abs().sum() > 0 and parts["content"] > 0
    scores = objective.scores(images[1:])
    assert abs(scores["clip_direction"][0] - (1 - parts["direction"].item())) < 1e-5
    assert not objective.passed(images[1:]).any()  # no pass mark without pass_cosine: the learner runs to its cap
    marked = build_objective(NEUTRAL, WHITE, clip_model=str(tiny_clip), perceptual=str(vgg), pass_cosine=-1.0)
    marked.prepare(images[:1])
    assert marked.passed(images[1:]).all() and marked.direction_mark == 2.0
    with pytest.raises(ValueError, match="same CLIP text embedding"):
        build_objective(NEUTRAL, NEUTRAL, clip_model=str(tiny_clip), perceptual=str(vgg))
    with pytest.raises(ValueError, match="perceptual="):
        build_objective(NEUTRAL, WHITE, clip_model=str(tiny_clip))
    with pytest.raises(FileNotFoundError, match="no downloads"):
        build_objective(NEUTRAL, WHITE, clip_model=str(tiny_clip), perceptual=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="could not be loaded"):
        build_objective(NEUTRAL, WHITE, clip_model=str(tmp_path / "no-clip"), perceptual=str(vgg))


def test_learning_lowers_the_loss_and_per_sample_schedules_are_independent(tiny):
    edit = Edit(tiny, NEUTRAL, SQUARE, steps=4, guidance=7.5)
    noise = torch.cat([tiny.noise(0), tiny.noise(1)])
    objective = ShapesObjective(NEUTRAL, SQUARE)
    joint = edit.learn(noise, objective, iterations=3, init=paper_schedule(4)[:, None].repeat(1, 2))
    assert joint.history[-1]["loss"] < joint.history[0]["loss"] and joint.lambdas.shape == (4, 2)
    assert joint.iterations == [3, 3] and len(joint.loss) == 2 and joint.seconds > 0
    alone = edit.learn(noise[1:], objective, iterations=3)
    # A batch of 2 and a batch of 1 round differently in the UNet's kernels (3e-4 seen after
    # 3 Adam steps on one torch build); a loss mixed across samples would move it far more.
    assert torch.allclose(joint.lambdas[:, 1], alone.lambdas, atol=2e-3), (joint.lambdas[:, 1], alone.lambdas)
    assert joint.loss[1] == pytest.approx(alone.loss[0], rel=1e-2)  # the returned (last) schedule's objective


def test_the_adaptive_learner_ends_at_or_above_the_best_switch_where_the_papers_budget_may_not(tiny):
    """Kind edit, 4 steps, seeds 0 and 1, ranked as the learner ranks (an edit that passes
    first, then the lower loss), every schedule rendered again here: the adaptive learner's
    result ranks at least as high as every hard switch and the paper's init on each seed,
    while the paper's budget (3 Adam steps here) ends below the best switch on seed 1
    (measured: switch k=1 passes at loss 0.15; the paper's schedule does not pass, 3.66), so
    the first assertion is not implied by learning at all."""
    edit, objective = Edit(tiny, NEUTRAL, SQUARE, steps=4), ShapesObjective(NEUTRAL, SQUARE)
    noise = torch.cat([tiny.noise(0), tiny.noise(1)])
    init = paper_schedule(4)[:, None].repeat(1, 2)
    adaptive = edit.learn(noise, objective, iterations=3, init=init, adaptive=True)
    paper = edit.learn(noise, objective, iterations=3, init=init)
    with torch.no_grad():
        objective.prepare(edit.render(noise, torch.ones(4)))

        def rank(lambdas):  # per seed: (passed, -loss)
            images = edit.render(noise, lambdas)
            return list(zip(objective.passed(images).tolist(), (-objective.loss(images)["loss"]).tolist()))

        switches = [rank(switch_schedule(4, k)) for k in (1, 2, 3)] + [rank(paper_schedule(4))]
        learned, papers = rank(adaptive.lambdas), rank(paper.lambdas)
    for seed in (0, 1):
        best = max(s[seed] for s in switches)
        assert learned[seed][0] >= best[0] and (learned[seed][0] > best[0] or learned[seed][1] >= best[1] - 1e-4), (
            seed, learned[seed], best)
        assert -learned[seed][1] == pytest.approx(adaptive.loss[seed], abs=1e-4)  # it reports what it returns
        assert adaptive.passed[seed] == learned[seed][0]
    assert papers[1] < max(s[1] for s in switches), (papers, switches)
    assert adaptive.start[1] == "switch k=1" and adaptive.iterations[1] == 0  # passed in place at the sweep


def test_the_adaptive_learner_gives_up_on_a_plateau_and_stops_where_the_edit_passes(tiny):
    """A loss the lambdas cannot move: PATIENCE steps, not the cap. An edit that passes in
    place from the start: no steps at all."""
    from orthodiff.editing.editor import PATIENCE

    class Flat:
        direction_mark = 0.5

        def __init__(self, made: bool):
            self.made = made

        def prepare(self, neutral):
            pass

        def loss(self, edited):
            flat = edited.mean((1, 2, 3)) * 0 + 1.0
            return {"loss": flat, "content": flat, "direction": flat * (0.1 if self.made else 1)}

        def passed(self, edited):
            return np.full(len(edited), self.made)

    edit = Edit(tiny, NEUTRAL, WHITE, steps=2)
    stuck = edit.learn(tiny.noise(0), Flat(False), iterations=20, adaptive=True)
    assert stuck.iterations == [PATIENCE] and len(stuck.history) == PATIENCE and not stuck.passed[0]
    made = edit.learn(tiny.noise(0), Flat(True), iterations=20, adaptive=True)
    assert made.iterations == [0] and made.passed == [True] and made.history == []


@pytest.fixture(scope="module")
def oft_adapter(tmp_path_factory):
    module = ControlTask(control="canny", adapter=OFTConfig(num_blocks=4), method="oft", val_steps=3)
    with torch.no_grad():
        for parameter in (p for p in module.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    return save_adapter(tmp_path_factory.mktemp("adapter") / "oft.safetensors", module.eval())


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """The tiny SD with one UNet weight changed: another base model."""
    import shutil

    folder = tmp_path_factory.mktemp("other") / "tiny-sd-other"
    shutil.copytree(ROOT / "assets" / "tiny-sd", folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_in.bias.add_(0.01)
    unet.save_pretrained(folder / "unet")
    return folder


def edit_cli(*args: str) -> None:
    EDIT_MAIN(list(args))


def test_edit_py_learns_writes_and_transfers(tmp_path, capsys):
    out = tmp_path / "learned"
    edit_cli(f"prompt={NEUTRAL}", f"attribute={SQUARE}", "steps=4", "budget=paper", "iterations=2", f"out={out}",
             "switches=1,2")
    assert "learned schedule" in capsys.readouterr().out
    lambdas, meta = load_schedule(out / "schedule.safetensors")
    assert lambdas.shape == (4,) and meta["steps"] == "4" and meta["sampler"] == "ddim" and meta["guidance"] == "7.5"
    assert meta["prompt"] == NEUTRAL and meta["attribute"] == SQUARE and meta["base_model"] == "assets/tiny-sd"
    record = json.loads((out / "edit.json").read_text())
    assert len(record["iterations"]) == 2 and {"loss", "content", "direction"} <= set(record["iterations"][0])
    assert set(record["scores"]) == {"edited", "neutral", "attribute_alone", "paper_init", "switch_1", "switch_2"}
    assert record["scores"]["neutral"]["content_iou"] == 1.0 and record["schedule"]["lambda"] == pytest.approx(
        lambdas.tolist(), abs=1e-5)
    assert np.asarray(Image.open(out / "grid.png")).shape == (64, 192, 3)
    for name in ("neutral", "edited"):
        assert np.asarray(Image.open(out / f"{name}.png")).shape == (64, 64, 3)

    # The transfer case: another seed, no optimisation, the file's steps and guidance.
    edit_cli(f"prompt={NEUTRAL}", f"attribute={SQUARE}", f"schedule={out / 'schedule.safetensors'}", "seed=3",
             f"out={tmp_path / 'applied'}", "switches=none")
    record = json.loads((tmp_path / "applied" / "edit.json").read_text())
    assert not (tmp_path / "applied" / "schedule.safetensors").exists() and record["iterations"] == []
    assert record["steps"] == 4 and record["schedule"]["lambda"] == pytest.approx(lambdas.tolist(), abs=1e-5)

    # A real image, through inversion.
    Image.fromarray(scene(7)).save(tmp_path / "real.png")
    edit_cli(f"prompt={NEUTRAL}", f"attribute={SQUARE}", f"schedule={out / 'schedule.safetensors'}",
             f"image={tmp_path / 'real.png'}", f"out={tmp_path / 'real'}", "switches=none", "null_iterations=3")
    record = json.loads((tmp_path / "real" / "edit.json").read_text())
    assert (tmp_path / "real" / "reconstruction.png").is_file() and record["source"].startswith("image")
    assert record["scores"]["neutral"]["content_iou"] > 0.8  # the reconstruction keeps the real shape


def test_edit_py_adaptive_budget_and_a_two_attribute_edit(tmp_path, capsys, caplog):
    out = tmp_path / "adaptive"
    edit_cli(f"prompt={NEUTRAL}", f"attribute={SQUARE}", "steps=4", "iterations=2", f"out={out}")
    record = json.loads((out / "edit.json").read_text())
    learner = record["learner"]
    assert learner["budget"] == "adaptive" and learner["iterations"] == 2 and 0 <= learner["iterations_taken"] <= 2
    assert learner["start"] in ("init", "switch k=1", "switch k=3") and len(record["iterations"]) <= 2
    assert record["seconds"]["learn"] > 0 and "adaptive budget: from switch" in capsys.readouterr().out
    _, meta = load_schedule(out / "schedule.safetensors")
    assert meta["budget"] == "adaptive" and meta["start"] == learner["start"]

    # Two attributes at once: one warning line, and each change measured alone beside the joint success.
    caplog.clear()
    edit_cli(f"prompt={NEUTRAL}", "attribute=a green circle on a white background", "steps=2", "budget=paper",
             "iterations=0", f"out={tmp_path / 'two'}")
    assert "changes 2 things at once (background black -> white; circle red -> green)" in caplog.text
    scores = json.loads((tmp_path / "two" / "edit.json").read_text())["scores"]
    for name in ("edited", "attribute_alone"):
        assert {"success", "reads background black -> white", "reads circle red -> green"} <= set(scores[name])
    assert scores["neutral"]["reads background black -> white"] == 0


def test_a_schedule_for_another_model_or_step_count_is_refused(tmp_path, oft_adapter, other_base):
    out = tmp_path / "learned"
    edit_cli(f"prompt={NEUTRAL}", f"attribute={WHITE}", "steps=4", "iterations=1", f"out={out}", "switches=none")
    schedule = f"schedule={out / 'schedule.safetensors'}"
    cases = [(("steps=5",), "has 4 steps"),
             ((f"base={other_base}",), "was learned on base model 'assets/tiny-sd'"),
             ((f"adapter={oft_adapter}",), "learn a schedule for this model")]
    for args, message in cases:
        with pytest.raises(SystemExit) as error:
            edit_cli(f"prompt={NEUTRAL}", f"attribute={WHITE}", schedule, f"out={tmp_path / 'x'}", *args)
        assert message in str(error.value) and "\n" not in str(error.value), (args, str(error.value))


def test_an_adapted_model_edits_the_same_way(tiny, oft_adapter):
    adapted = load_edit_model(adapter=str(oft_adapter))
    assert adapted.digest != tiny.digest and adapted.base_model.endswith("tiny-sd")
    edit, base_edit = Edit(adapted, NEUTRAL, SQUARE, steps=4), Edit(tiny, NEUTRAL, SQUARE, steps=4)
    noise = tiny.noise(0)
    with torch.no_grad():
        latents = denoise(adapted.unet, adapted.scheduler_config, noise, [edit.neutral] * 4, edit.empty, 7.5)
        reference = sample(adapted.unet, adapted.scheduler_config, noise, edit.neutral, edit.empty, 4, 7.5,
                           progress=False)
        assert torch.equal(latents, reference)
        assert (edit.render(noise, torch.ones(4)) - base_edit.render(noise, torch.ones(4))).abs().max() > 1e-3
    learned = edit.learn(noise, ShapesObjective(NEUTRAL, SQUARE), iterations=1)
    assert learned.lambdas.shape == (4,) and np.isfinite(learned.history[0]["loss"])


def test_edit_py_bad_input_is_one_line(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_text("junk")
    base = [f"prompt={NEUTRAL}", f"attribute={WHITE}", "steps=2", "iterations=0", f"out={tmp_path / 'o'}"]
    cases = [
        ([f"attribute={WHITE}"], "missing required argument(s): prompt=..."),
        ([*base[1:], "prompt= "], "prompt= is empty"),
        ([*base, f"image={tmp_path / 'notes.png'}"], "notes.png is not a readable image"),
        ([*base, f"image={tmp_path / 'absent.png'}"], "absent.png: no such file"),
        ([*base, f"schedule={tmp_path / 'other.safetensors'}"], "is not an edit schedule"),
        ([*base, f"schedule={tmp_path / 'junk.safetensors'}"], "is not a safetensors file"),
        ([*base, f"schedule={tmp_path / 'missing.safetensors'}"], "no such file"),
        ([*base, "switches=0,9"], "switch steps must lie in 1..1"),
        ([*base, f"base={tmp_path / 'nowhere'}"], "nowhere"),
        ([f"prompt={NEUTRAL}", "attribute=a photo of a dog", "steps=2"], "need clip_model= and perceptual="),
        ([*base, "stepz=3"], "keys prompt, attribute"),
        ([*base[:1], f"attribute={NEUTRAL} ", *base[2:]], "attribute= is the prompt itself"),
        ([*base, "budget=fast"], "budget='fast': choose adaptive or paper"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as error:
            edit_cli(*args)
        text = str(error.value)
        assert message in text and "\n" not in text, (args, text)
    # As a process: the line on stderr, no traceback.
    result = run_script(ROOT / "edit.py", [f"attribute={WHITE}"], cwd=tmp_path)
    assert result.returncode != 0 and "edit.py: missing required argument(s): prompt=..." in result.stderr
    assert "Traceback" not in result.stderr


def test_nothing_below_the_entry_points_imports_editing():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_layering import import_graph

    graph = import_graph()
    assert "editing" in graph and graph["editing"] <= {"oft", "models", "data", "eval", "tasks", "adapter", "files"}
    for part in ("oft", "models", "data", "eval", "tasks", "adapter", "pipelines"):
        assert "editing" not in graph.get(part, set()), part


@pytest.mark.slow
def test_reproduce_table_edit_writes_the_report(tmp_path):
    """table=edit at a toy size: every method's row for generated and real images (both
    budgets), the verdict lines, the switch curves and mean-lambda plots, the sample grid,
    and an untuned pair's row with the success rate of its kind (the real settings take
    hours)."""
    import csv

    pair = "[['a blue triangle on a white background','a yellow triangle on a white background']]"
    toy = ["edit.steps=3", "edit.seeds=2", "edit.learn_seeds=1", "edit.real_images=1", "edit.iterations=1",
           "edit.null_iterations=1", "edit.cap=1", "edit.pair_seeds=1", f"edit.pairs={pair}"]
    result = run_script("reproduce.py", ["table=edit", f"out_dir={tmp_path}", f"runs_dir={tmp_path / 'runs'}", *toy],
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "edit.csv")))
    methods = {(row["edit"], row["images"], row["method"]) for row in rows}
    for edit in ("background", "colour", "kind", "count"):
        assert (edit, "generated", "learned (own schedule)") in methods
        assert (edit, "generated", "paper budget (own schedule)") in methods
        assert (edit, "generated", "switch k=1") in methods and (edit, "generated", "attribute alone") in methods
        assert (edit, "real (inverted)", "transferred (seed-0 schedule)") in methods
    assert all((float(row["success"]) * 2).is_integer() for row in rows)  # a share of 2 seeds (or 1 real image)
    learned = [row for row in rows if row["method"] == "learned (own schedule)"]
    assert all(0 <= float(row["Adam steps"]) <= 1 and float(row["seconds per edit"]) > 0 for row in learned)
    pairs = list(csv.DictReader(open(tmp_path / "edit_pairs.csv")))
    assert [(row["kind"], row["seeds"]) for row in pairs] == [("colour", "1")]
    report = (tmp_path / "edit.md").read_text()
    assert "python reproduce.py table=edit" in report and report.count("transferred to real images:") == 4
    assert "| colour | 1 |" in report and "the learned row is " in report and "took " in report
    for name in ("edit_samples.png", "edit_switch.png", "edit_lambdas.png"):
        assert (tmp_path / name).is_file() and f"]({name})" in report


@pytest.mark.slow
def test_table_edit_run_again_learns_and_inverts_nothing_and_gives_the_same_rows(tmp_path, monkeypatch):
    """table=edit keeps its learned schedules in cells_archive/edit (committed: a new machine
    resumes too) and its inversion in runs_dir/edit: run again (a killed table resumed), it
    learns and inverts nothing and every score row is the same."""
    import csv

    from hydra import compose, initialize_config_dir

    from orthodiff.editing import Edit
    from orthodiff.reproduce import edit

    toy = ["edit.steps=2", "edit.seeds=2", "edit.learn_seeds=1", "edit.real_images=1", "edit.iterations=1",
           "edit.null_iterations=1", "edit.cap=1", "edit.pair_seeds=1", "edit.refine=1",
           "~edit.attributes", "+edit.attributes={colour: 'a green circle on a black background'}",
           "edit.pairs=[['a blue triangle on a white background','a blue circle on a white background']]"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("reproduce", overrides=["table=edit", f"out_dir={tmp_path}", f"runs_dir={tmp_path / 'runs'}", *toy])

    def rows(name):
        return [{k: v for k, v in row.items() if "second" not in k and "s/seed" not in k}
                for row in csv.DictReader(open(tmp_path / name))]

    edit.table(cfg)
    first = rows("edit.csv"), rows("edit_pairs.csv")
    assert [p.name.split("-")[0] for p in (tmp_path / "runs" / "edit").glob("*.pt")] == ["inversion"]
    kept = list((tmp_path / "cells" / "edit").glob("*.pt"))  # transfer, learned, the pair's: small enough for git
    assert len(kept) == 3 and all(p.stat().st_size < 64_000 for p in kept), [(p.name, p.stat().st_size) for p in kept]
    for slow in ("learn", "invert"):
        monkeypatch.setattr(Edit, slow, lambda *a, **k: pytest.fail("learned or inverted again"))
    edit.table(cfg)
    assert (rows("edit.csv"), rows("edit_pairs.csv")) == first

def test_table_edit_refuses_a_bad_pair_before_loading_a_model(tmp_path, monkeypatch):
    """reproduce.py table=edit, in process (reproduce.py prints the ValueError as one line):
    the pair is refused before a model loads or a report is written."""
    from hydra import compose, initialize_config_dir

    from orthodiff.reproduce import edit, reproduce

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the pairs were checked")

    monkeypatch.setattr(edit, "load_edit_model", no_model)
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("reproduce", overrides=["table=edit", f"out_dir={tmp_path}",
                                              f"edit.pairs=[['{NEUTRAL}','{NEUTRAL}']]"])
    with pytest.raises(ValueError, match="same scene"):
        reproduce(cfg)
    assert not (tmp_path / "edit.md").exists()
