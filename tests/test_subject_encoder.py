"""The encoder method (method=encoder): a subject encoder maps a new subject's images to the
token's word in one forward pass, refuses a base model it was not trained for, trains on
composite subjects that are never an evaluation subject, and its adapters go through
generate, the pipeline and the demo like Textual Inversion's."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orthodiff.adapter import load_adapter, read_adapter, save_adapter
from orthodiff.data.datasets import collate
from orthodiff.data.prior import base_model_digest
from orthodiff.data.subjects import SUBJECTS, subject_images
from orthodiff.data.subjects.composites import (
    COMBINATIONS,
    CompositeSubjectDataset,
    composite_backgrounds,
    composite_image,
    is_evaluation_subject,
    random_subject,
)
from orthodiff.models.base import load_base_model
from orthodiff.models.subject_encoder import ImageFeatures, SubjectEncoder, SubjectEncoderConfig
from orthodiff.pipelines import OrthodiffPipeline
from orthodiff.tasks import SubjectEncoderTask, SubjectTask
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-sd")
SHIPPED = ROOT / "assets" / "subject-encoder"


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """An encoder for the shipped tiny SD with a random (not zero) last layer, saved."""
    base = load_base_model(TINY)
    features = ImageFeatures(vae=base.vae)
    torch.manual_seed(0)
    encoder = SubjectEncoder(feature_channels=tuple(features.channels), base_model=TINY,
                             base_digest=base_model_digest(base))
    torch.nn.init.normal_(encoder.mlp[-1].weight, std=0.05)
    folder = tmp_path_factory.mktemp("encoder") / "subject_encoder"
    encoder.save_pretrained(folder)
    return folder


def test_composites_are_never_an_evaluation_subject_and_are_drawable():
    assert len(COMBINATIONS) > 400
    for name, subject in SUBJECTS.items():
        pattern = {"striped_square": "stripe", "badge_circle": "cross", "inlaid_triangle": "inlay"}[name]
        assert is_evaluation_subject(subject.class_word, pattern, subject.colors)
        assert (subject.class_word, pattern, tuple(subject.colors)) not in COMBINATIONS
    rng = np.random.default_rng(0)
    for seed in range(20):
        subject = random_subject(seed)
        image = composite_image(subject, composite_backgrounds(subject.colors)[-1], rng)
        colours = {tuple(c) for c in image.reshape(-1, 3)}
        assert len(colours) == 3  # background, body, pattern: every pixel exact
    item = CompositeSubjectDataset(0, 4)[1]
    assert item["reference"].shape == item["pixel_values"].shape == (3, 64, 64)
    assert item["text"].startswith(f"a sks {item['class_word']} on a")


def test_a_new_subject_gets_its_word_in_one_forward_pass(encoder_folder):
    module = SubjectTask(embedding=SubjectEncoderConfig(str(encoder_folder)), method="encoder")
    class_word = module.embedding.vectors.detach().clone()
    calls = []
    module.embedding.subject_encoder.register_forward_hook(lambda *args: calls.append(1))
    rng = np.random.default_rng(5)
    fresh = random_subject(10**9 + 5)  # a composite of the held-out seed range
    images = [composite_image(fresh, composite_backgrounds(fresh.colors)[0], rng) for _ in range(3)]
    word = module.encode_subject(images)
    assert len(calls) == 1 and word.shape == (64,) and module.extra_cost["encoded_images"] == 3
    assert (word - class_word[0]).norm() > 1e-3
    other = module.encode_subject(subject_images("badge_circle", 3)).clone()
    assert (other - word).norm() > 1e-3  # another subject, another word
    prompt = ["a sks square on a white background"]
    assert torch.equal(module.embedding.encode(module.token_ids(prompt))[0, 2],  # the token reads the word
                       module.embedding.encode(module.token_ids(prompt))[0, 2])
    # Zero-initialised, as training starts: the class word exactly.
    untrained = SubjectEncoder(**{**module.embedding.subject_encoder.config})
    features = module.embedding.image_features(torch.rand(2, 3, 64, 64))
    assert torch.equal(untrained(features, class_word[0]), class_word.expand(2, -1))


def test_the_encoder_refuses_a_base_model_it_was_not_trained_for(encoder_folder, tmp_path):
    config = json.loads((encoder_folder / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "base_digest": "0123456789abcdef",
                                                                "base_model": "some/other-model"}))
    (tmp_path / "other" / "diffusion_pytorch_model.safetensors").write_bytes(
        (encoder_folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"trained for base model 'some/other-model'.*experiment=subject_encoder"):
        SubjectTask(embedding=SubjectEncoderConfig(str(tmp_path / "other")))
    with pytest.raises(FileNotFoundError, match="no trained subject encoder there"):
        SubjectTask(embedding=SubjectEncoderConfig(str(tmp_path / "nowhere")))


def test_a_clip_image_encoder_gives_the_features_and_a_missing_one_is_one_line(tiny_clip):
    features = ImageFeatures(image_encoder=str(tiny_clip))
    maps = features(torch.rand(2, 3, 64, 64))
    assert len(maps) == len(features.channels) and all(m.shape[:2] == (2, 32) for m in maps)
    encoder = SubjectEncoder(feature_channels=tuple(features.channels), embedding_dim=64)
    assert encoder(maps, torch.zeros(64)).shape == (2, 64)
    with pytest.raises(FileNotFoundError) as error:
        ImageFeatures(image_encoder="/nowhere/clip-vit")
    assert "image_encoder='/nowhere/clip-vit' could not be loaded" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_encoder_task_trains_only_the_encoder_and_each_row_reads_its_word():
    torch.manual_seed(0)
    module = SubjectEncoderTask(val_steps=2)
    trainable = {name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"encoder"}
    batch = collate([CompositeSubjectDataset(0, 4)[k] for k in range(4)])
    words = torch.randn(4, 64) * 0.3
    with torch.no_grad(), module.token.per_row(words):
        rows = module.text_encoder(module.token_ids(batch["text"]))[0]
    for k in range(4):  # row k as Textual Inversion with words[k] gives it
        with torch.no_grad():
            module.token.vectors.copy_(words[k:k + 1])
            alone = module.text_encoder(module.token_ids(batch["text"][k:k + 1]))[0]
        torch.testing.assert_close(rows[k:k + 1], alone)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    assert module.encoder.mlp[-1].weight.abs().sum() > 0  # left its zero start


def test_an_encoder_adapter_is_a_textual_inversion_adapter_for_the_pipeline(encoder_folder, tmp_path):
    module = SubjectTask(embedding=SubjectEncoderConfig(str(encoder_folder)), method="encoder", val_steps=2)
    module.encode_subject(subject_images("striped_square", 4))
    path = save_adapter(tmp_path / "adapter.safetensors", module)
    _, meta = read_adapter(path)
    assert meta["method"] == "encoder" and meta["embedding"] == "textual_inversion"
    again = load_adapter(path)
    prompts = ["a sks square on a black background"]
    reference = module.eval().generate(prompts, steps=3, guidance=4.0, progress=False)
    torch.testing.assert_close(again.generate(prompts, steps=3, guidance=4.0, progress=False), reference)
    pipe = OrthodiffPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_adapter(path)
    images = pipe(prompts, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    torch.testing.assert_close(images, reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Perfusion's gate"):
        pipe(prompts, perfusion_beta=0.5)


def test_the_demo_takes_both_subject_adapters_without_a_condition(encoder_folder, tmp_path):
    pytest.importorskip("gradio")
    from orthodiff.app.demo import Demo

    encoded = SubjectTask(embedding=SubjectEncoderConfig(str(encoder_folder)), method="encoder", val_steps=2)
    encoded.encode_subject(subject_images("badge_circle", 2))
    perfusion = SubjectTask(embedding="perfusion", method="perfusion", val_steps=2)
    perfusion.embedding.encode(perfusion.token_ids(["a sks square"]))  # eval mode: no update
    demo = Demo(adapter_dirs=[])
    for name, module in (("encoder", encoded), ("perfusion", perfusion)):
        path = save_adapter(tmp_path / name / "adapter.safetensors", module)
        seen, samples, info = demo.generate(None, None, "upload", "a sks square on a white background", None,
                                            str(path), 2, 4.0, 0, 2, "auto", 0.9, 0.2, progress=lambda *a, **k: None)
        assert seen is None and len(samples) == 2 and np.asarray(samples[0][0]).shape == (64, 64, 3)
        assert "token 'sks'" in info and (("beta 0.9 tau 0.2" in info) == (name == "perfusion"))


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped subject encoder")
def test_the_shipped_encoder_fits_the_shipped_tiny_sd():
    """If this fails, assets/tiny-sd changed after the encoder was trained: retrain it
    (python train.py experiment=subject_encoder; README, subject-driven generation)."""
    encoder = SubjectEncoder.from_pretrained(SHIPPED)
    encoder.check_base(base_model_digest(load_base_model(TINY)), TINY)
    assert sum(p.numel() for p in encoder.parameters()) * 4 < 5 * 2**20  # a few MB


@pytest.mark.slow
def test_train_cli_encodes_a_subject_without_training_steps(encoder_folder, tmp_path):
    result = run_script(
        "train.py", ["experiment=dreambooth", "method=encoder", f"embedding.encoder={encoder_folder}",
         f"data.root={tmp_path / 'subjects'}", "data.subject=badge_circle", "data.samples_per_prompt=1",
         "data.no_token_prompts=4", "model.val_steps=2", "logger=csv", "validate_at_start=false",
         f"hydra.run.dir={tmp_path / 'run'}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cost"]["timed_steps"] == 0 and 0 < metrics["cost"]["encode_seconds"] < 10
    assert np.isfinite(metrics["final"]["subject_fidelity"])
    result = run_script("train.py", ["experiment=dreambooth", "method=encoder", "image_encoder=/nowhere/clip",
                                     f"hydra.run.dir={tmp_path / 'bad'}"], timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "image_encoder='/nowhere/clip' could not be loaded" in result.stderr
