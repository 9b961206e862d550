import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from orthodiff.data.shapes import make_scene, split_seeds
from orthodiff.eval.image_metrics import (
    INCEPTION_WEIGHTS,
    ShapesFeatures,
    caption_labels,
    clip_score,
    feature_extractor,
    image_quality,
    parse_caption,
    prompt_alignment,
    prompt_recognition,
)
from orthodiff.eval.metrics import frechet_distance
from orthodiff.eval.oracles import images_to_tensor, load_oracle, scene_labels

ROOT = Path(__file__).resolve().parents[1]
SCENES = [make_scene(seed) for seed in split_seeds("test", 200)]
CAPTIONS = [scene.caption for scene in SCENES]
REAL = images_to_tensor(np.stack([scene.image for scene in SCENES]))  # (200, 3, 64, 64)
FIRST, SECOND = REAL[:100], REAL[100:]
NOISE = torch.rand(FIRST.shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    return load_oracle("classifier")


@pytest.fixture(scope="module")
def quality():
    """Shapes-feature FID/KID of 100 real images against themselves, against 100 other
    real images, and against 100 noise images."""
    torch.set_num_threads(1)
    return {name: image_quality(FIRST, other, kid_subset_size=50)
            for name, other in (("self", FIRST), ("real", SECOND), ("noise", NOISE))}


# --- FID and KID -------------------------------------------------------------------------

def test_fid_is_zero_on_the_same_set_and_large_on_noise(quality):
    assert abs(quality["self"]["fid"]) < 1e-3
    # Two real halves differ by sampling alone (FID's small-sample bias); noise is far.
    assert quality["real"]["fid"] > 1.0
    assert quality["noise"]["fid"] > 5 * quality["real"]["fid"]


def test_kid_is_near_zero_on_the_same_set_and_large_on_noise(quality):
    # The unbiased estimator of a set against itself is slightly negative, -(2/m) times
    # the kernel's diagonal excess, not exactly 0; noise is an order of magnitude above.
    assert abs(quality["self"]["kid_mean"]) < 0.1 * quality["noise"]["kid_mean"]
    assert quality["real"]["kid_mean"] < 0.2 * quality["noise"]["kid_mean"]
    assert quality["noise"]["kid_mean"] > 5 * quality["noise"]["kid_std"]


def test_results_name_the_extractor_and_the_sample_sizes(quality):
    result = quality["noise"]
    assert result["fid_extractor"] == "shapes" and result["num_features"] == 295
    assert (result["n_real"], result["n_generated"]) == (100, 100)
    assert result["kid_subset_size"] == 50 and "kid_note" not in result


def test_torchmetrics_fid_equals_the_project_frechet_distance(classifier, quality):
    expected = frechet_distance(classifier.features(FIRST), classifier.features(SECOND))
    assert quality["real"]["fid"] == pytest.approx(expected, rel=1e-4)


def test_shapes_features_work_as_a_torchmetrics_feature_module(quality):
    # Used directly as feature=, batch by batch; 128 px images are resized to 64 px.
    fid = FrechetInceptionDistance(feature=ShapesFeatures(), normalize=True)
    for start in range(0, 100, 30):
        fid.update(FIRST[start:start + 30], real=True)
        fid.update(SECOND[start:start + 30], real=False)
    assert float(fid.compute()) == pytest.approx(quality["real"]["fid"], rel=1e-4)
    upscaled = torch.nn.functional.interpolate(SECOND, scale_factor=2.0, mode="nearest")
    fid.reset()
    fid.update(FIRST, real=True)
    fid.update(upscaled, real=False)
    assert float(fid.compute()) < 0.5 * quality["noise"]["fid"]


def test_small_sets_clamp_the_kid_subset_and_say_so():
    result = image_quality(FIRST[:12], SECOND[:7], kid_subset_size=1000, kid_subsets=5)
    assert result["kid_subset_size"] == 7 and "clamped from 1000 to 7" in result["kid_note"]
    assert math.isfinite(result["fid"]) and math.isfinite(result["kid_mean"])
    with pytest.raises(ValueError, match="at least 2 real and 2 generated"):
        image_quality(FIRST[:5], SECOND[:1])


def test_images_outside_the_unit_range_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_quality(FIRST * 2 - 1, SECOND)


def test_missing_inception_weights_say_which_file_and_how_to_provide_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        image_quality(FIRST[:4], SECOND[:4], extractor="inception",
                      weights=tmp_path / "missing.pth")
    message = str(error.value)
    assert INCEPTION_WEIGHTS in message and "missing.pth" in message
    assert "Pass its path" in message and "network access" in message
    with pytest.raises(ValueError, match="choose from"):
        feature_extractor("vgg")


def test_a_weights_file_that_is_not_inception_is_refused_clearly(tmp_path):
    garbage = tmp_path / INCEPTION_WEIGHTS
    garbage.write_bytes(b"not a state dict")
    if importlib.util.find_spec("torch_fidelity") is None:
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            feature_extractor("inception", garbage)
    else:
        with pytest.raises(ValueError, match="not the FID Inception state dict"):
            feature_extractor("inception", garbage)


def test_inception_extractor_runs_from_a_local_weights_file(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    from torchmetrics.image.fid import NoTrainInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as patch:  # the architecture without weights, to save it
        patch.setattr(NoTrainInceptionV3, "load_state_dict", lambda self, state: None)
        model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                   feature_extractor_weights_path=str(empty))
    torch.manual_seed(0)
    for weight in model.parameters():  # the default init makes features vanish (~1e-12)
        if weight.ndim == 4:
            torch.nn.init.kaiming_normal_(weight, nonlinearity="relu")
    weights = tmp_path / INCEPTION_WEIGHTS
    torch.save(model.state_dict(), weights)
    torch.set_num_threads(1)
    real, noise = FIRST[:5], NOISE[:5]
    same = image_quality(real, real, extractor="inception", weights=weights)
    different = image_quality(real, noise, extractor="inception", weights=weights)
    assert same["fid_extractor"] == "inception" and same["num_features"] == 2048
    # torchmetrics' own FID on the same weights gives the same number.
    reference = FrechetInceptionDistance(normalize=True,
                                         feature_extractor_weights_path=str(weights))
    reference.update(real, real=True)
    reference.update(noise, real=False)
    assert different["fid"] == pytest.approx(float(reference.compute()), rel=1e-5)
    assert abs(same["fid"]) < 1e-3 * different["fid"]


# --- CLIP score ---------------------------------------------------------------------------

def test_clip_score_with_a_local_model_is_the_mean_cosine(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images, captions = FIRST[:4], CAPTIONS[:4]
    result = clip_score(images, captions, tiny_clip, batch_size=3)
    assert result["clip_model"] == str(tiny_clip)

    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    pixels = processor(images=[scene.image for scene in SCENES[:4]], return_tensors="pt")
    text = processor(text=captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixels["pixel_values"])
        text_embeds = model.get_text_features(**text)
    unwrap = lambda out: out if torch.is_tensor(out) else out.pooler_output  # noqa: E731
    cosine = torch.cosine_similarity(unwrap(image_embeds), unwrap(text_embeds))
    assert (cosine > 0).all()  # the fixture's seed: nothing floored
    assert math.isfinite(result["clip_score"])
    assert result["clip_score"] == pytest.approx(100 * cosine.mean().item(), abs=1e-3)


def test_missing_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        clip_score(FIRST[:1], CAPTIONS[:1], tmp_path / "no-clip")


# --- shapes world: captions and prompt recognition ------------------------------------------

def test_caption_labels_equal_scene_labels():
    scenes = SCENES + [make_scene(seed) for seed in range(300)]
    labels, expected = caption_labels([s.caption for s in scenes]), scene_labels(scenes)
    assert labels.keys() == expected.keys()
    for key in expected:
        assert labels[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(labels[key], expected[key], err_msg=key)
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}  # every list form was parsed


def test_parse_caption_reads_the_grammar_and_refuses_anything_else():
    assert parse_caption("a red triangle, a blue circle and an orange cross on a light gray "
                         "background") == ([("red", "triangle"), ("blue", "circle"),
                                            ("orange", "cross")], "light gray")
    for caption in ("a pink circle on a white background", "a red circle",
                    "a red hexagon on a black background", "a red circle on a blue background",
                    "red circle on a white background"):
        with pytest.raises(ValueError, match="caption"):
            parse_caption(caption)


def test_prompt_alignment_scores_real_images_by_their_captions(classifier):
    images, scenes = FIRST, SCENES[:100]
    scores = prompt_alignment(images, CAPTIONS[:100], classifier, batch_size=40)
    assert scores == prompt_recognition(classifier.predict(images), scene_labels(scenes))
    assert scores["prompted_pairs_recognized"] >= 0.95
    shifted = prompt_alignment(images, CAPTIONS[1:101], classifier)  # another scene's caption
    assert shifted["prompted_pairs_recognized"] < 0.5
