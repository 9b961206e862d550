"""Control-consistency metrics, as plain functions on numpy arrays (tensors work too).

    segmentation_scores  mIoU / mAcc / aAcc, mmsegmentation's convention
    depth_rmse           per-image RMSE averaged over images (ControlNet++'s protocol),
                         in depth units and in 8-bit grey levels
    landmark_error       mean L2 in pixels over matched visible landmarks
    landmark_scores      the same plus how many shapes were found or invented
    classifier_scores    exact-match and per-label accuracies of ShapeClassifier heads
    frechet_distance     FID between two feature sets (ShapeClassifier.features here)
"""

from __future__ import annotations

from itertools import permutations

import numpy as np


def _numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def segmentation_scores(pred, target, num_classes: int, ignore_index: int | None = None) -> dict:
    """Scores of class maps `pred` against `target` (same shape, integer ids).

    Intersections and unions are summed over all images before dividing (as
    mmsegmentation does). IoU_c = |pred=c and target=c| / |pred=c or target=c|; a class
    in neither map is NaN and left out of mIoU; one predicted but absent from the target
    scores IoU 0. Acc_c = recall of class c, NaN where the target has none. aAcc is the
    fraction of all pixels right. Pixels whose target is `ignore_index` are skipped.
    Returns {"mIoU", "mAcc", "aAcc", "IoU": per-class list, "Acc": per-class list}."""
    pred, target = _numpy(pred).astype(np.int64), _numpy(target).astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    keep = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.size == 0:
        raise ValueError("no pixels to score")
    for name, ids in (("pred", pred), ("target", target)):
        if ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(f"{name} holds ids outside [0, {num_classes})")
    confusion = np.bincount(target * num_classes + pred,
                            minlength=num_classes ** 2).reshape(num_classes, num_classes)
    intersection = np.diag(confusion).astype(np.float64)
    area_target, area_pred = confusion.sum(1), confusion.sum(0)
    union = area_target + area_pred - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        acc = np.where(area_target > 0, intersection / area_target, np.nan)
    return {"mIoU": float(np.nanmean(iou)), "mAcc": float(np.nanmean(acc)),
            "aAcc": float(intersection.sum() / target.size),
            "IoU": iou.tolist(), "Acc": acc.tolist()}


def depth_rmse(pred, target) -> dict:
    """RMSE of depth maps (N, H, W) (or one (H, W)) in the dataset's [0, 1] units.

    Like ControlNet++'s evaluation, the RMSE is computed per image and then averaged over
    images. Returns {"rmse": depth units, "rmse_8bit": the same in grey levels (x255),
    the scale of ControlNet++'s published depth RMSE}."""
    pred, target = _numpy(pred).astype(np.float64), _numpy(target).astype(np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    per_image = np.sqrt(((pred - target) ** 2).reshape(len(pred), -1).mean(1))
    rmse = float(per_image.mean())
    return {"rmse": rmse, "rmse_8bit": 255.0 * rmse}


def match_shapes(pred, pred_mask, target, target_mask) -> list[tuple[int, int]]:
    """Pairs (predicted slot, target slot) for one image: as many pairs as the smaller of
    the two shape counts, with the smallest total cost, the cost of a pair being the mean
    L2 over the landmarks visible in both. pred/target (S, K, 2), masks (S, K); a slot is
    a shape when any of its landmarks is present. Exhaustive search: S is MAX_SHAPES (3)."""
    pred_slots = np.flatnonzero(pred_mask.any(1))
    target_slots = np.flatnonzero(target_mask.any(1))
    if len(pred_slots) == 0 or len(target_slots) == 0:
        return []
    cost = np.full((len(pred_slots), len(target_slots)), 1e9)
    for a, i in enumerate(pred_slots):
        for b, j in enumerate(target_slots):
            both = pred_mask[i] & target_mask[j]
            if both.any():
                cost[a, b] = np.linalg.norm(pred[i][both] - target[j][both], axis=1).mean()
    transpose = len(pred_slots) > len(target_slots)
    small = cost.T if transpose else cost  # rows: the smaller set
    best = min(permutations(range(small.shape[1]), small.shape[0]),
               key=lambda cols: sum(small[r, c] for r, c in enumerate(cols)))
    pairs = [(r, c) for r, c in enumerate(best)]
    pairs = [(c, r) for r, c in pairs] if transpose else pairs
    return [(int(pred_slots[a]), int(target_slots[b])) for a, b in pairs]


def landmark_scores(pred, pred_mask, target, target_mask, match: bool = True) -> dict:
    """Landmark accuracy of predicted shapes against true ones.

    pred/target: (N, S, K, 2) pixel (x, y); masks (N, S, K) bool. With `match`, shapes are
    paired by match_shapes (the detector's slot order does not matter); without, slot i
    is compared with slot i (the dataset's z-order). Returns
      error     mean L2 in pixels over the landmarks visible in both members of a pair
      points    how many landmark pairs that mean is over
      detected  fraction of true shapes paired with a predicted one (recall)
      spurious  predicted shapes without a true partner, per image"""
    pred, target = _numpy(pred).astype(np.float64), _numpy(target).astype(np.float64)
    pred_mask, target_mask = _numpy(pred_mask).astype(bool), _numpy(target_mask).astype(bool)
    if pred.ndim == 3:  # one image
        pred, pred_mask = pred[None], pred_mask[None]
        target, target_mask = target[None], target_mask[None]
    if pred.shape != target.shape or pred_mask.shape != target_mask.shape:
        raise ValueError(f"shapes differ: pred {pred.shape} / {pred_mask.shape}, "
                         f"target {target.shape} / {target_mask.shape}")
    distances, paired, spurious = [], 0, 0
    for p, pm, t, tm in zip(pred, pred_mask, target, target_mask):
        if match:
            pairs = match_shapes(p, pm, t, tm)
        else:
            pairs = [(s, s) for s in range(len(p)) if pm[s].any() and tm[s].any()]
        for i, j in pairs:
            both = pm[i] & tm[j]
            distances.extend(np.linalg.norm(p[i][both] - t[j][both], axis=1))
        paired += len(pairs)
        spurious += int(pm.any(1).sum()) - len(pairs)
    shapes = int(target_mask.any(2).sum())
    return {"error": float(np.mean(distances)) if distances else float("nan"),
            "points": len(distances),
            "detected": paired / shapes if shapes else float("nan"),
            "spurious": spurious / len(pred)}


def landmark_error(pred, pred_mask, target, target_mask, match: bool = True) -> float:
    """Mean L2 distance in pixels over matched visible landmarks (see landmark_scores)."""
    return landmark_scores(pred, pred_mask, target, target_mask, match)["error"]


def classifier_scores(pred: dict, target: dict) -> dict:
    """Accuracies of ShapeClassifier.predict output against oracles.scene_labels.

    For each multi-label head (kinds, colors, pairs): "<head>_exact", the fraction of
    images whose predicted set equals the true set, and "<head>_label_acc", the fraction
    of (image, label) decisions right. For background and count: "<head>_acc".
    "all_exact": every head right on the image. The strictest single-head figure is
    pairs_exact: every shape's colour and kind, and no extra shape."""
    scores, right = {}, None
    for head, truth in target.items():
        guess, truth = _numpy(pred[head]), _numpy(truth)
        if guess.shape != truth.shape:
            raise ValueError(f"{head}: pred {guess.shape} and target {truth.shape} differ")
        if truth.ndim == 2:
            image_right = (guess == truth).all(1)
            scores[f"{head}_exact"] = float(image_right.mean())
            scores[f"{head}_label_acc"] = float((guess == truth).mean())
        else:
            image_right = guess == truth
            scores[f"{head}_acc"] = float(image_right.mean())
        right = image_right if right is None else right & image_right
    scores["all_exact"] = float(right.mean())
    return scores


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), as FID does:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the square
    root is computed from the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric,
    so no complex parts appear."""
    a, b = _numpy(features_a).astype(np.float64), _numpy(features_b).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"expected two feature sets (N, D) with N >= 2, got {a.shape}, {b.shape}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(0))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(cross.clip(0)).sum())
