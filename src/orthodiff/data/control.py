"""Control signals: how each condition is annotated and how it enters the control encoder.

One place for the encodings, shared by the shapes world and the real datasets:

    canny      1 channel: the binary edge map of cv2.Canny(image, 100, 200) (the
               evaluation protocol's thresholds), 1.0 on edges.
    depth      1 channel in [0, 1], near = bright (ControlNet's and DPT's convention, what
               data/annotators.py writes); the shapes world stores far = bright and is
               inverted on loading, so one encoder convention holds for every dataset.
    seg        3 channels, colour-coded with `segmentation_palette` (as ControlNet's
               ADE20K model does). One-hot would need as many input channels as the
               dataset has classes (150 for ADE20K); a palette keeps one encoder design
               for every dataset and stays exact: each class has its own colour.
    landmarks  3 channels: each point drawn as a small disc coloured by its index, so
               the encoder can tell points apart (a centre from a vertex, a jaw point
               from an eye corner), not only where they are.

Every dataset yields the condition already encoded: `conditioning` (C, H, W) float in
[0, 1], C = condition_channels(control).

A joint control ("canny+seg", experiment=canny_seg) feeds one network several conditions
at once: their encodings stacked in the order named, then one presence channel per
condition (1 where it is given), zeros for a condition left out. The presence channels
keep "no seg map" apart from "all background" (seg's class 0 is black), so an adapter
trained with per-condition dropout also serves each condition alone.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

CONTROL_CHANNELS = {"canny": 1, "depth": 1, "seg": 3, "landmarks": 3}
CANNY_THRESHOLDS = (100, 200)


def check_control(control: str) -> str:
    if control not in CONTROL_CHANNELS:
        raise ValueError(f"unknown control {control!r}: choose one of {sorted(CONTROL_CHANNELS)}")
    return control


def control_parts(control: str) -> list[str]:
    """The conditions a control takes: "canny" -> ["canny"], the joint "canny+seg" -> ["canny", "seg"]."""
    parts = [check_control(part) for part in control.split("+")]
    if len(set(parts)) != len(parts):
        raise ValueError(f"control {control!r} names a condition twice")
    return parts


def condition_channels(control: str) -> int:
    """The control network's input channels: the conditions' own, plus a presence channel
    for each when there are several."""
    parts = control_parts(control)
    return sum(CONTROL_CHANNELS[part] for part in parts) + (len(parts) if len(parts) > 1 else 0)


def joint_condition(control: str, parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The network input of `control` from its conditions' encodings (each (..., C_i, H, W),
    None for one left out): a single control's own encoding; for a joint control the
    encodings stacked, zeros where left out, then the presence channels. None when none is given."""
    controls = control_parts(control)
    if len(parts) != len(controls):
        raise ValueError(f"control {control!r} takes {len(controls)} conditions, got {len(parts)}")
    given = next((part for part in parts if part is not None), None)
    if len(controls) == 1 or given is None:
        return given
    lead, size = given.shape[:-3], given.shape[-2:]
    blocks = [part if part is not None else given.new_zeros(*lead, CONTROL_CHANNELS[name], *size)
              for name, part in zip(controls, parts)]
    presence = [given.new_full((*lead, 1, *size), float(part is not None)) for part in parts]
    return torch.cat(blocks + presence, dim=-3)


def preview_condition(control: str, condition: torch.Tensor) -> torch.Tensor:
    """Encoded conditions (N, C, H, W) as RGB images to look at (N, 3, H, k W): a joint control's
    conditions side by side (presence channels left out), 1-channel ones as grey."""
    tiles, start = [], 0
    for name in control_parts(control):
        width = CONTROL_CHANNELS[name]
        tiles.append(condition[:, start:start + width].expand(-1, 3, -1, -1))
        start += width
    return torch.cat(tiles, dim=-1)


def drop_conditions(control: str, condition: torch.Tensor, probability: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-condition dropout of a batch (N, C, H, W) of joint conditions: each sample's each
    condition, with its presence channel, is zeroed with `probability`, independently, so
    the adapter learns every condition alone and every pair. A single control is returned as it is."""
    controls = control_parts(control)
    if len(controls) == 1 or probability <= 0:
        return condition
    keep = (torch.rand(condition.shape[0], len(controls), generator=generator) >= probability).to(condition)
    widths = [CONTROL_CHANNELS[name] for name in controls]
    channel_keep = torch.cat([keep[:, k:k + 1].expand(-1, width) for k, width in enumerate(widths)] + [keep], dim=1)
    return condition * channel_keep[:, :, None, None]


def canny_edges(image: np.ndarray, thresholds=CANNY_THRESHOLDS) -> np.ndarray:
    """(H, W) uint8 edge map (0 or 255) of an (H, W, 3) RGB or (H, W) uint8 image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"canny_edges needs uint8 pixels, got {image.dtype}")
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.Canny(gray, *thresholds)


def segmentation_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, class 0 black, all distinct (deterministic).

    The bits of the class id are spread over the three channels' high bits (the
    PASCAL VOC palette construction), so ids up to 2**24 get distinct colours."""
    ids = np.arange(num_classes)
    palette = np.zeros((num_classes, 3), np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


def colorize_segmentation(class_map: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) integer class ids -> (H, W, 3) uint8 colour-coded map."""
    class_map = np.asarray(class_map)
    if class_map.size and (class_map.min() < 0 or class_map.max() >= num_classes):
        raise ValueError(f"segmentation map holds ids outside [0, {num_classes}): "
                         f"min {class_map.min()}, max {class_map.max()}")
    return segmentation_palette(num_classes)[class_map]


def landmark_colors(num_points: int) -> np.ndarray:
    """(num_points, 3) uint8 distinct colours, one per landmark index (never black)."""
    return segmentation_palette(num_points + 1)[1:]


def render_points(points, size: tuple[int, int], colors=None, radius: float = 1.5,
                  mask=None) -> np.ndarray:
    """(H, W, 3) uint8 image with each point (x, y in pixels) drawn as a filled disc in its
    index's colour. `points` is (K, 2) or (S, K, 2) (S sets of K points, coloured alike);
    `mask` (same leading shape) hides absent points."""
    points = np.asarray(points, np.float64)
    points = points.reshape(-1, points.shape[-2], 2) if points.ndim == 3 else points[None]
    mask = np.ones(points.shape[:2], bool) if mask is None else np.asarray(mask, bool).reshape(points.shape[:2])
    colors = landmark_colors(points.shape[1]) if colors is None else np.asarray(colors, np.uint8)
    height, width = size
    image = np.zeros((height, width, 3), np.uint8)
    for group, present in zip(points, mask):
        for index, (point, on) in enumerate(zip(group, present)):
            if on:  # 4 bits of sub-pixel precision
                center = tuple(int(v) for v in np.round(point * 16))
                cv2.circle(image, center, round(radius * 16), tuple(int(c) for c in colors[index]),
                           -1, cv2.LINE_8, shift=4)
    return image


def encode_condition(control: str, condition: np.ndarray) -> torch.Tensor:
    """A condition image as stored on disk (uint8: edges / depth as grey, seg and landmarks
    as colour) -> the encoder's input (C, H, W) float in [0, 1]."""
    check_control(control)
    condition = np.asarray(condition)
    channels = CONTROL_CHANNELS[control]
    if channels == 1 and condition.ndim == 3:
        condition = cv2.cvtColor(condition, cv2.COLOR_RGB2GRAY)
    if channels == 3 and condition.ndim == 2:
        condition = np.repeat(condition[..., None], 3, axis=2)
    tensor = torch.from_numpy(np.array(condition)).float() / 255.0  # a copy: PIL arrays are read-only
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
