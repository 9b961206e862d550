"""Landmarks as dense maps, the keypoint detector's output (orthodiff.eval.oracles), and back.

The maps, (N, 2 + 2 * NUM_LANDMARKS, H, W):

    0       shape-pixel logit: > 0 where a shape is seen
    1       the depth of the shape seen there (the scene's depth encoding)
    2 ...   the seen shape's landmark offsets from the pixel, (x0, y0, x1, y1, ...) / OFFSET_SCALE,
            hidden landmarks included

`keypoint_targets` encodes scenes into the training targets of these maps and
`decode_keypoints` turns maps back into landmarks by dense voting; decoding the targets
themselves recovers every scene's landmarks in z-order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from orthodiff.data.shapes.catalogue import COLORS, MAX_SHAPES, NUM_LANDMARKS

# Landmark offsets are predicted in units of this many pixels, so targets are about +-1.
OFFSET_SCALE = 16.0


def keypoint_targets(scenes) -> dict[str, torch.Tensor]:
    """For every pixel of a list of Scenes: whether it shows a shape ("shape", bool), and
    for those pixels that shape's depth ("depth") and landmark offsets from the pixel /
    OFFSET_SCALE ("offsets", (N, 2 * NUM_LANDMARKS, H, W) as in the maps)."""
    n, size = len(scenes), scenes[0].image.shape[0]
    ys, xs = np.mgrid[:size, :size]
    grid = np.stack([xs, ys]).astype(np.float32)  # (2, H, W) pixel (x, y)
    offsets = np.zeros((n, NUM_LANDMARKS, 2, size, size), np.float32)
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            seen = (scene.image == COLORS[shape["color"]]).all(-1)  # colours are distinct
            points = scene.landmarks[shape["z"]][:, :, None]  # (5, 2, 1)
            offsets[i][:, :, seen] = (points - grid[:, seen][None]) / OFFSET_SCALE
    depth = np.stack([s.depth for s in scenes])
    return {"shape": torch.from_numpy(depth < 1), "depth": torch.from_numpy(depth),
            "offsets": torch.from_numpy(offsets.reshape(n, 2 * NUM_LANDMARKS, size, size))}


def decode_keypoints(maps: torch.Tensor, min_votes: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Float maps (N, 2 + 2 * NUM_LANDMARKS, H, W) -> landmarks (N, MAX_SHAPES, NUM_LANDMARKS, 2)
    float32 pixel (x, y) and mask (N, MAX_SHAPES, NUM_LANDMARKS) bool.

    Each shape pixel votes for its predicted centre; local maxima of the smoothed votes
    with at least `min_votes` votes within 5x5 pixels are shapes (at most MAX_SHAPES); a
    shape's landmarks and depth are the means over the pixels whose centre vote falls
    within `radius` pixels of its peak. Detected shapes come first, deepest first (the
    z-order where the image shows it); absent slots are zeros with mask False."""
    n, _, height, width = maps.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=maps.device),
                            torch.arange(width, device=maps.device), indexing="ij")
    grid = torch.stack([xs, ys]).to(maps).repeat(NUM_LANDMARKS, 1, 1)  # (10, H, W)
    points = (grid + maps[:, 2:] * OFFSET_SCALE).flatten(2)  # (N, 10, H * W)
    depth = maps[:, 1].flatten(1)
    voters = maps[:, 0].flatten(1) > 0
    centre = points[:, :2].round().long()
    inside = voters & (centre >= 0).all(1) & (centre[:, 0] < width) & (centre[:, 1] < height)
    votes = torch.zeros(n, height * width, device=maps.device)
    votes.scatter_add_(1, (centre[:, 1] * width + centre[:, 0]).clamp(0, height * width - 1),
                       inside.float())
    votes = votes.view(n, 1, height, width)
    # Peaks of the votes smoothed by a 5x5 binomial kernel; a ramp of 1e-6 breaks ties
    # so that a plateau gives one peak. Each peak's score is its 5x5 vote count.
    binomial = torch.tensor([1.0, 4, 6, 4, 1], device=maps.device) / 16
    kernel = (binomial[:, None] * binomial[None])[None, None]
    smooth = F.conv2d(votes, kernel, padding=2).flatten(1)
    smooth = smooth + 1e-6 * torch.linspace(0, 1, height * width, device=maps.device)
    smooth = smooth.view(n, 1, height, width)
    peaks = smooth * (smooth == F.max_pool2d(smooth, 5, 1, 2))
    index = peaks.flatten(1).topk(MAX_SHAPES, dim=1).indices  # (N, MAX_SHAPES)
    counts = (F.avg_pool2d(votes, 5, 1, 2) * 25).flatten(1).gather(1, index)
    present = counts >= min_votes
    peak_xy = torch.stack([index % width, index // width], -1).to(maps)  # (N, S, 2)
    # Pixels whose centre vote lands within `radius` of a peak belong to that shape.
    distance = (points[:, None, :2] - peak_xy[..., None]).norm(dim=2)  # (N, S, H * W)
    member = (voters[:, None] & (distance <= radius)).float()
    weight = member / member.sum(2, keepdim=True).clamp_min(1)
    landmarks = torch.einsum("nsp,nkp->nsk", weight, points)
    landmarks = landmarks.view(n, MAX_SHAPES, NUM_LANDMARKS, 2)
    shape_depths = torch.einsum("nsp,np->ns", weight, depth)
    present &= member.sum(2) > 0
    order = torch.where(present, shape_depths, -torch.inf).argsort(1, descending=True)
    landmarks = landmarks.gather(1, order[:, :, None, None].expand_as(landmarks))
    present = present.gather(1, order)  # deepest first: the z-order where it is visible
    landmarks = landmarks * present[:, :, None, None]
    mask = present[:, :, None].expand(-1, -1, NUM_LANDMARKS)
    return landmarks.cpu().numpy(), mask.cpu().numpy()
