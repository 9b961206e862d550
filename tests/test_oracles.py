import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from orthodiff.data.shapes import MAX_SHAPES, NUM_LANDMARKS, keypoint_targets, make_scene, split_seeds
from orthodiff.eval.metrics import (
    classifier_scores,
    depth_rmse,
    frechet_distance,
    landmark_error,
    landmark_scores,
    segmentation_scores,
)
from orthodiff.eval.oracles import (
    ORACLES,
    ShapeClassifier,
    ShapeKeypointDetector,
    check_images,
    images_to_tensor,
    load_oracle,
    load_oracles,
    measure,
    scene_labels,
)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "oracles"
METRICS = json.loads((ASSETS / "metrics.json").read_text())
TEST_SCENES = [make_scene(seed) for seed in split_seeds("test", 200)]


@pytest.fixture(scope="module")
def oracles():
    torch.set_num_threads(1)
    return load_oracles(ASSETS)


# --- the shipped oracles score held-out scenes as metrics.json says ------------------
# "clean" is over all n test scenes; "clean_first_200" is the same measurement on the 200
# scenes re-scored here, so the comparison is like with like (the margins absorb numeric
# drift across machines, not sampling noise).

def _recorded(name):
    return METRICS["oracles"][name]["clean_first_200"]


def test_segmenter_scores_held_out_scenes_as_recorded(oracles):
    assert METRICS["oracles"]["segmenter"]["clean"]["mIoU"] >= 0.90  # the floor
    scores = measure("segmenter", oracles["segmenter"], TEST_SCENES)
    assert scores["mIoU"] >= _recorded("segmenter")["mIoU"] - 0.02
    assert scores["aAcc"] >= _recorded("segmenter")["aAcc"] - 0.02


def test_classifier_scores_held_out_scenes_as_recorded(oracles):
    assert METRICS["oracles"]["classifier"]["clean"]["pairs_exact"] >= 0.95  # the floor
    scores = measure("classifier", oracles["classifier"], TEST_SCENES)
    for key in ("pairs_exact", "kinds_exact", "colors_exact", "background_acc", "count_acc"):
        assert scores[key] >= _recorded("classifier")[key] - 0.02, key


def test_depth_estimator_rmse_is_no_worse_than_recorded(oracles):
    depth = METRICS["oracles"]["depth"]
    scores = measure("depth", oracles["depth"], TEST_SCENES)
    assert scores["rmse"] <= 1.1 * _recorded("depth")["rmse"]
    assert depth["ambiguity_floor"]["rmse"] <= depth["clean"]["rmse"]  # nothing beats it
    prediction = oracles["depth"].predict(images_to_tensor(TEST_SCENES[0].image))
    assert prediction.shape == (1, 64, 64) and prediction.dtype == np.float32


def test_keypoint_detector_error_is_no_worse_than_recorded(oracles):
    scores = measure("keypoints", oracles["keypoints"], TEST_SCENES)
    assert scores["error"] <= 1.1 * _recorded("keypoints")["error"]
    assert scores["detected"] >= _recorded("keypoints")["detected"] - 0.02
    landmarks, mask = oracles["keypoints"].predict(images_to_tensor(TEST_SCENES[0].image))
    assert landmarks.shape == (1, MAX_SHAPES, NUM_LANDMARKS, 2)
    assert mask.shape == (1, MAX_SHAPES, NUM_LANDMARKS)
    assert not landmarks[~mask].any()  # absent slots are zeros


def test_keypoint_decoding_of_exact_maps_recovers_the_landmarks_in_z_order():
    scenes = TEST_SCENES[:50]
    targets = keypoint_targets(scenes)
    maps = torch.cat([targets["shape"][:, None].float() * 20 - 10, targets["depth"][:, None],
                      targets["offsets"]], 1)
    detector = ShapeKeypointDetector()
    detector.forward = lambda images: maps  # decode the training targets themselves
    landmarks, mask = detector.predict(images_to_tensor(np.stack([s.image for s in scenes])))
    truth = np.stack([s.landmarks for s in scenes]), np.stack([s.landmark_mask for s in scenes])
    np.testing.assert_array_equal(mask, truth[1])  # exact depths give the z-order slots
    np.testing.assert_allclose(landmarks, truth[0], atol=1e-3)


def test_classifier_features_tell_a_shifted_world_from_the_real_one(oracles):
    classifier = oracles["classifier"]
    test = classifier.features(images_to_tensor(np.stack([s.image for s in TEST_SCENES])))
    val = images_to_tensor(np.stack([make_scene(seed).image for seed in split_seeds("val", 200)]))
    assert test.shape == (200, 2 * classifier.config.widths[-1] + 5 + 10 + 24)
    same_world = frechet_distance(test, classifier.features(val))
    # Red and blue swapped: a world of wrong colours. (Blur is no test: the features were
    # trained to shrug it off, like the maps they pool.)
    swapped = frechet_distance(test, classifier.features(val[:, [2, 1, 0]]))
    assert swapped > 3 * same_world


def test_oracles_refuse_other_input_conventions(oracles):
    image = images_to_tensor(TEST_SCENES[0].image)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracles["segmenter"].predict(image * 2 - 1)
    with pytest.raises(ValueError, match="uint8"):
        check_images((image * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="64, 64"):
        check_images(image[:, :, :32])


def test_predict_restores_the_training_flag(oracles):
    segmenter = oracles["segmenter"]
    segmenter.train()
    try:
        segmenter.predict(images_to_tensor(TEST_SCENES[0].image))
        assert segmenter.training
    finally:
        segmenter.eval()


def test_folders_are_self_describing_and_small():
    total = 0
    for name in ORACLES:
        config = json.loads((ASSETS / name / "config.json").read_text())
        assert config["_class_name"].startswith("Shape")
        total += (ASSETS / name / "diffusion_pytorch_model.safetensors").stat().st_size
    assert total <= 8 * 2 ** 20


def test_loader_names_the_missing_folder_and_the_script(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_oracle("depth", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "depth") in str(error.value)
    assert "scripts/train_oracles.py" in str(error.value)
    with pytest.raises(ValueError, match="unknown oracle"):
        load_oracle("clip", ASSETS)


def test_save_and_load_round_trip(tmp_path):
    model = ShapeClassifier(widths=(4, 8), color_width=4).eval()
    model.save_pretrained(tmp_path / "classifier")
    loaded = load_oracle("classifier", tmp_path)
    images = images_to_tensor(np.stack([s.image for s in TEST_SCENES[:4]]))
    torch.testing.assert_close(loaded.features(images), model.features(images))


# --- metric helpers on hand-made arrays ---------------------------------------------

def test_segmentation_scores_perfect_and_known_confusion():
    target = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
    perfect = segmentation_scores(target, target, num_classes=3)
    assert perfect["mIoU"] == perfect["mAcc"] == perfect["aAcc"] == 1.0
    pred = np.array([[0, 0, 1, 2], [0, 1, 2, 2]])
    scores = segmentation_scores(pred, target, num_classes=3)
    # class 0: I 3, U 4; class 1: I 1, U 3; class 2: I 2, U 3
    assert scores["IoU"] == pytest.approx([3 / 4, 1 / 3, 2 / 3])
    assert scores["mIoU"] == pytest.approx((3 / 4 + 1 / 3 + 2 / 3) / 3)
    assert scores["mAcc"] == pytest.approx((3 / 4 + 1 / 2 + 2 / 2) / 3)
    assert scores["aAcc"] == pytest.approx(6 / 8)


def test_segmentation_scores_skip_absent_classes_and_count_false_positives():
    target = np.zeros((2, 2), int)
    scores = segmentation_scores(np.array([[0, 0], [0, 3]]), target, num_classes=4)
    assert math.isnan(scores["IoU"][1]) and scores["IoU"][3] == 0.0
    assert scores["mIoU"] == pytest.approx((3 / 4 + 0) / 2)
    assert scores["mAcc"] == pytest.approx(3 / 4)  # only classes in the target
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores(target + 4, target, num_classes=4)


def test_depth_rmse_is_per_image_then_averaged_and_in_8bit_levels():
    target = np.ones((2, 4, 4))
    pred = target.copy()
    pred[0] -= 0.2  # image 0 off by 0.2 everywhere, image 1 exact
    scores = depth_rmse(pred, target)
    assert scores["rmse"] == pytest.approx(0.1)
    assert scores["rmse_8bit"] == pytest.approx(25.5)
    assert depth_rmse(target[0], target[0])["rmse"] == 0.0


def test_landmark_error_matches_shapes_regardless_of_slot_order():
    target = np.zeros((1, 3, 5, 2))
    target[0, 0] = 10
    target[0, 1] = 40
    target_mask = np.zeros((1, 3, 5), bool)
    target_mask[0, :2] = True
    pred = target[:, [1, 0, 2]].copy()  # the two shapes swapped
    pred[..., 0] += 3  # and 3 px right, 4 px down: every point 5 px off
    pred[..., 1] += 4
    pred_mask = target_mask[:, [1, 0, 2]]
    assert landmark_error(pred, pred_mask, target, target_mask) == pytest.approx(5.0)
    unmatched = landmark_error(pred, pred_mask, target, target_mask, match=False)
    assert unmatched > 30  # slot by slot the swap costs the distance between shapes
    pred_mask = pred_mask.copy()
    pred_mask[0, 2] = True  # an extra predicted shape (at the origin)
    scores = landmark_scores(pred, pred_mask, target, target_mask)
    assert scores["error"] == pytest.approx(5.0) and scores["spurious"] == 1.0
    assert scores["detected"] == 1.0 and scores["points"] == 10
    missed = landmark_scores(pred, np.zeros_like(pred_mask), target, target_mask)
    assert missed["detected"] == 0.0 and math.isnan(missed["error"])


def test_classifier_scores_exact_and_per_label():
    labels = scene_labels(TEST_SCENES[:10])
    perfect = classifier_scores(labels, labels)
    assert all(v == 1.0 for v in perfect.values())
    wrong = {k: v.copy() for k, v in labels.items()}
    wrong["pairs"][0, :] = ~wrong["pairs"][0, :]  # all 24 pair labels wrong on image 0
    wrong["count"][1] += 1
    scores = classifier_scores(wrong, labels)
    assert scores["pairs_exact"] == pytest.approx(0.9)
    assert scores["pairs_label_acc"] == pytest.approx(1 - 24 / 240)
    assert scores["count_acc"] == pytest.approx(0.9)
    assert scores["all_exact"] == pytest.approx(0.8)
    assert labels["pairs"].sum(1).tolist() == labels["count"].tolist()


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4 I): |m|^2 + 3 * (1 + 4 - 2 * 2), up to sampling noise
    b = 2 * rng.standard_normal((4000, 3)) + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(5 + 3, rel=0.05)


def test_the_shipped_oracles_load_from_any_working_directory(tmp_path, monkeypatch):
    """edit.py, eval.py and train.py run from outside the repository find assets/oracles, as
    they find assets/tiny-sd."""
    from orthodiff.app.preflight import check_oracle
    from orthodiff.eval.oracles import load_oracle

    monkeypatch.chdir(tmp_path)
    check_oracle("clip_model", None, "classifier")  # raises MissingResourceError when not found
    assert load_oracle("classifier") is not None
