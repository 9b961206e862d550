"""Subject-driven generation: SubjectTask's methods, prior preservation, the scorer,
adapters on disk and `python train.py experiment=dreambooth method=<m>`."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from orthodiff.adapter import load_adapter, read_adapter, save_adapter
from orthodiff.data.subjects import EVAL_PROMPTS, expected_labels, reference_images, subject_images
from orthodiff.eval.oracles import images_to_tensor
from orthodiff.eval.subject_metrics import SubjectScorer
from orthodiff.models import LoRAConfig
from orthodiff.oft import OFTConfig
from orthodiff.tasks import SubjectTask
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]


def _batch(n=2):
    pixels = images_to_tensor(np.stack(subject_images("striped_square", n))) * 2 - 1
    return {"pixel_values": pixels, "text": ["a sks square on a white background"] * n, "index": torch.arange(n)}


def _train(module, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = module.training_step(_batch(), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_step()


def _unet_state(module):
    return {k: v.clone() for k, v in module.unet.state_dict().items()}


@pytest.mark.parametrize("embedding", ["textual_inversion", "pplus"])
def test_embedding_methods_train_only_the_token_vectors(embedding):
    torch.manual_seed(0)
    module = SubjectTask(embedding=embedding)
    width = module.text_encoder.config.hidden_size
    layers = 1 if embedding == "textual_inversion" else 7  # the tiny UNet's cross-attention layers
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == width * layers
    unet, text = _unet_state(module), {k: v.clone() for k, v in module.text_encoder.state_dict().items()}
    before = module.generate(["a sks square on a white background"], steps=2, progress=False)
    plain = module.generate(["a circle on a black background"], steps=2, progress=False)
    _train(module)
    assert all(torch.equal(v, module.unet.state_dict()[k]) for k, v in unet.items())
    assert all(torch.equal(v, module.text_encoder.state_dict()[k]) for k, v in text.items())
    after = module.generate(["a sks square on a white background"], steps=2, progress=False)
    assert (after - before).abs().max() > 1e-3  # the token's meaning moved
    # Prompts without the token are exactly the base model's.
    assert torch.equal(plain, module.generate(["a circle on a black background"], steps=2, progress=False))


def test_pplus_gives_each_cross_attention_layer_its_own_vector():
    module = SubjectTask(embedding="pplus")
    _train(module, steps=2)
    vectors = module.embedding.token.vectors
    assert vectors.shape[0] == 7 and not torch.allclose(vectors[0], vectors[1])


@pytest.mark.parametrize("adapter", [OFTConfig(num_blocks=4, coft=True, eps=1e-2), LoRAConfig(rank=4)])
def test_unet_adapter_round_trips_through_its_file(adapter, tmp_path):
    torch.manual_seed(0)
    module = SubjectTask(adapter=adapter, method="coft" if isinstance(adapter, OFTConfig) else "lora")
    _train(module)
    path = save_adapter(tmp_path / "adapter.safetensors", module)
    again = load_adapter(path)
    assert isinstance(again, SubjectTask) and again.hparams.token == "sks"
    prompts = ["a sks square on a black background"]
    assert torch.allclose(module.eval().generate(prompts, steps=2, progress=False),
                          again.generate(prompts, steps=2, progress=False), atol=1e-5)
    with pytest.raises(ValueError, match="load_adapter"):  # not a control adapter for the pipeline
        from orthodiff.adapter import attach_adapter

        attach_adapter(again.unet, path)


def test_prior_images_come_from_the_base_model_and_are_cached(tmp_path):
    kwargs = dict(adapter=OFTConfig(num_blocks=4), prior_loss_weight=1.0, num_class_images=4,
                  prior_cache_dir=str(tmp_path), val_steps=2, class_prompt="a square on a white background")
    module = SubjectTask(**kwargs)
    module.setup("fit")
    assert module.class_moments.shape[0] == 4
    folder = next(tmp_path.iterdir())
    record = json.loads((folder / "record.json").read_text())
    assert record["base_model_digest"] == module.base_digest
    stamp = (folder / "0000.png").stat().st_mtime_ns
    again = SubjectTask(**kwargs)  # another run on the same base: the cache is reused, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.setup("fit")
    assert (folder / "0000.png").stat().st_mtime_ns == stamp
    assert torch.allclose(module.class_moments, again.class_moments, atol=1e-4)  # same images, re-encoded
    loss = module.prior_loss(2)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_bad_settings_get_clear_errors():
    with pytest.raises(ValueError, match="one piece"):
        SubjectTask(embedding="textual_inversion", token="xyzzyplugh")
    with pytest.warns(UserWarning, match="one piece"):  # finetuning learns any string
        SubjectTask(adapter=OFTConfig(num_blocks=4), token="xyzzyplugh")
    with pytest.raises(ValueError, match="adapter=none"):
        SubjectTask(embedding="pplus", adapter=OFTConfig(num_blocks=4))
    with pytest.raises(ValueError, match="prior_loss_weight=0"):
        SubjectTask(embedding="textual_inversion", prior_loss_weight=1.0)
    with pytest.raises(ValueError, match="choose from"):
        SubjectTask(embedding="dreamboth")


def test_scorer_ranks_the_subject_above_other_subjects_and_reads_the_prompts():
    scorer = SubjectScorer(subject_images("badge_circle"))
    scores = {}
    for name in ("badge_circle", "striped_square"):
        specs = [expected_labels("badge_circle", e) for e in EVAL_PROMPTS[:4]]
        images = [im for k, e in enumerate(EVAL_PROMPTS[:4]) for im in reference_images(name, e, n=2, seed=k)]
        scorer.reset()
        scorer.update(images_to_tensor(np.stack(images)), [e["prompt"] for e in EVAL_PROMPTS[:4] for _ in range(2)],
                      [s for s in specs for _ in range(2)])
        scores[name] = scorer.compute()
    assert scores["badge_circle"]["subject_fidelity"] > scores["striped_square"]["subject_fidelity"] + 0.2
    assert scores["badge_circle"]["background_accuracy"] == 1.0  # ideal images on the asked backgrounds
    assert 0 < scores["badge_circle"]["diversity"] < 1


SUBJECT_METHODS = ["textual_inversion", "coft", "lora", "full", "pplus", "perfusion"]


@pytest.mark.slow
def test_train_cli_runs_each_method(tmp_path):
    # One Hydra multirun, one process: the methods' runs share the start-up (imports, base model).
    result = run_script(
        "train.py", ["-m", "experiment=dreambooth", f"method={','.join(SUBJECT_METHODS)}",
         f"data.root={tmp_path / 'subjects'}", "data.subject=inlaid_triangle", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "data.samples_per_prompt=2", "data.no_token_prompts=4", "model.val_steps=2",
         "logger=csv", f"module.prior_cache_dir={tmp_path / 'class'}", "module.num_class_images=4",
         f"hydra.sweep.dir={tmp_path / 'runs'}", "hydra.sweep.subdir=${method.name}"], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in SUBJECT_METHODS:
        run = tmp_path / "runs" / method
        metrics = json.loads((run / "metrics.json").read_text())
        for key in ("subject_fidelity", "prompt_fidelity", "diversity", "no_token_kind"):
            assert np.isfinite(metrics["final"][key]), (method, key)
        assert read_adapter(run / "adapter.safetensors")[1]["method"] == method
        assert list((run / "samples").glob("step_*.png")), method
    assert (tmp_path / "subjects" / "inlaid_triangle" / "00.png").is_file()  # written on first use
    out = tmp_path / "generated"  # generate.py takes a subject adapter without a condition
    result = run_script("generate.py", [f"adapter={tmp_path / 'runs' / 'textual_inversion'}", "num_images=2",
                                        "prompt=a sks triangle on a black background", "steps=2", f"out={out}"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "generate.json").read_text())["token"] == "sks"
    assert len(list(out.glob("sample_*.png"))) == 2


def test_a_control_run_refuses_a_subject_method_before_reading_data(tmp_path):
    """train.py's first check (app.train.check_method_fits), in process: one line naming both."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from orthodiff.app.train import check_method_fits

    # A data root that does not exist: the refusal must not name (or need) the data.
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        cfg = compose("train", overrides=["experiment=canny", "method=textual_inversion",
                                          f"data.train.root={tmp_path / 'nowhere'}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as @hydra.main does: the message names the experiment chosen
    try:
        with pytest.raises(SystemExit) as refused:
            check_method_fits(cfg)
    finally:
        HydraConfig.instance().cfg = None  # no Hydra run left behind for the worker's next test
    message = str(refused.value)
    assert message.startswith("train.py: method=textual_inversion does not fit experiment=canny")
    assert "experiment=dreambooth" in message and "nowhere" not in message and "\n" not in message


GENERATED = subject_images("badge_circle", 2, seed=5)  # stand-ins for generated images
PROMPT = "a sks circle on a white background"


def _fidelity_scores(scorer):
    scorer.update(images_to_tensor(np.stack(GENERATED)), [PROMPT] * 2, [{}] * 2)
    return scorer.compute()


def _cosines(folder, kind, references):
    """Independent re-statement of the scores with transformers alone: mean cosine of the
    generated vs the reference image embeddings (DINO's CLS token, CLIP's projected image
    embedding), and CLIP-T as CLIPScore defines it (max(cos, 0) of image and prompt)."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPTokenizer

    processor = AutoImageProcessor.from_pretrained(folder)
    model = (CLIPModel if kind == "clip" else AutoModel).from_pretrained(folder).eval()

    def embed(images):
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        if kind == "clip":
            output = model.get_image_features(pixel_values=pixels)
            return output if torch.is_tensor(output) else output.pooler_output
        return model(pixel_values=pixels).last_hidden_state[:, 0]

    with torch.no_grad():
        generated = torch.nn.functional.normalize(embed(GENERATED), dim=1)
        fidelity = float((generated @ torch.nn.functional.normalize(embed(references), dim=1).T).mean())
        if kind != "clip":
            return fidelity, None
        ids = CLIPTokenizer.from_pretrained(folder)([PROMPT], padding=True, return_tensors="pt")
        text = model.get_text_features(**ids)
        text = torch.nn.functional.normalize(text if torch.is_tensor(text) else text.pooler_output, dim=1)
        return fidelity, float((generated @ text.T).clamp(min=0).mean())


def test_real_subject_evaluators_load_local_models(tiny_clip, tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    references = subject_images("badge_circle", 3)
    dino = _fidelity_scores(SubjectScorer(references, "dino", dino_model=str(tmp_path / "dino")))
    clip = _fidelity_scores(SubjectScorer(references, "clip", clip_model=str(tiny_clip)))
    dino_fidelity, _ = _cosines(tmp_path / "dino", "dino", references)
    clip_fidelity, clip_text = _cosines(tiny_clip, "clip", references)
    assert dino["subject_fidelity"] == pytest.approx(dino_fidelity, abs=1e-4)
    assert clip["subject_fidelity"] == pytest.approx(clip_fidelity, abs=1e-4)
    assert clip_text > 0.01  # the fixture's seed gives a positive cosine: the floor at 0 is not what is tested
    assert clip["prompt_fidelity"] == pytest.approx(clip_text, abs=1e-4)
    assert "prompt_fidelity" not in dino  # CLIP-T needs CLIP
    with pytest.raises(FileNotFoundError, match="local folder"):
        SubjectScorer(references, "dino", dino_model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dino_model="):
        SubjectScorer(references, "dino")


@pytest.mark.slow
def test_train_cli_on_a_real_subject_folder(tmp_path):
    import cv2

    folder = tmp_path / "photos" / "toy"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):  # photos of another size than the model's: centre-cropped and resized
        cv2.imwrite(str(folder / f"{k}.jpg"), rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    (folder / "class.txt").write_text("toy\n")
    result = run_script(
        "train.py", ["experiment=dreambooth", "method=coft", "data=dreambooth_folder",
         f"data.root={tmp_path / 'photos'}", "data.subject=toy", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "data.samples_per_prompt=1", "data.val_batch_size=8", "model.val_steps=2", "logger=csv",
         "validate_at_start=false", f"hydra.run.dir={tmp_path / 'run'}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "subject_fidelity" in metrics["final"] and "no_token_kind" not in metrics["final"]


def test_dreambooth_config_finetunes_the_whole_unet():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import orthodiff.app.train  # noqa: F401  registers the config's subject_class resolver

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=dreambooth", "method=full"])
    module = instantiate(cfg.module, adapter=instantiate(cfg.adapter))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in module.unet.parameters())
    assert cfg.optimized_metric == "val/subject_fidelity" and cfg.module.prior_loss_weight == 1.0
