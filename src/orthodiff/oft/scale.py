"""How much rotation COFT allows at a width, and the eps that gives a small model SD 1.5's.

The paper convention bounds a block's full skew generator, ||Q_i||_F <= rho = eps * b^2 / sqrt(r)
(eps * b^2 with block sharing). A b x b skew matrix turns floor(b/2) planes; spread evenly,
each plane's generator entry is q = rho / sqrt(2 floor(b/2)) and the Cayley transform turns
that plane by 2 atan(q). That angle grows with b, so one eps is a loose bound on SD 1.5's
80-320-wide blocks and a tight one on tiny SD's 16-24-wide ones (BRIEF: "What the miniature
can and cannot say").

The scale-matched eps of a model is the paper-convention eps at which the median over its
adapted layers of that per-plane angle budget equals SD 1.5's median at the paper's eps
(1e-3, r = 4).
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from .cayley import skew_from_triangle

PAPER_EPS = 1e-3  # the OFT paper's control setting, paper convention
ON_RADIUS = 1 - 1e-3  # a block whose ||Q_i||_F is within 0.1 % of its radius sits on it


def paper_radius(eps: float, block_size: int, num_blocks: int, block_share: bool = False) -> float:
    """The paper convention's bound on ||Q_i||_F (OFTLayer.paper_radius for a layer)."""
    radius = eps * block_size**2
    return radius if block_share else radius / num_blocks**0.5


def plane_angle_budget(eps: float, block_size: int, num_blocks: int, block_share: bool = False) -> float:
    """Degrees per plane that the paper radius allows when spread evenly over the block's planes."""
    q = paper_radius(eps, block_size, num_blocks, block_share) / math.sqrt(2 * (block_size // 2))
    return math.degrees(2 * math.atan(q))


def layer_widths(model: nn.Module, targets) -> list[int]:
    """The input size OFT rotates in each target layer (in_features; a convolution's
    in_channels x kernel area). Works on the meta device."""
    from .layer import target_modules

    widths = []
    for name in target_modules(model, targets):
        module = model.get_submodule(name)
        widths.append(module.in_features if isinstance(module, nn.Linear)
                      else module.in_channels * math.prod(module.kernel_size))
    return widths


def median_angle_budget(eps: float, widths: list[int], num_blocks: int) -> float:
    """The median over layers of plane_angle_budget, each layer split into num_blocks blocks."""
    return statistics.median(plane_angle_budget(eps, w // num_blocks, num_blocks) for w in widths)


def scale_matched_eps(widths: list[int], reference_widths: list[int], num_blocks: int = 4,
                      reference_eps: float = PAPER_EPS) -> float:
    """The paper-convention eps at which `widths`' median angle budget equals the reference
    model's (SD 1.5's adapted layers) at reference_eps. The budget grows with eps, so a
    bisection on log eps finds it (to 1e-6 relative)."""
    target = median_angle_budget(reference_eps, reference_widths, num_blocks)
    low, high = math.log(1e-8), math.log(1e3)
    if not median_angle_budget(math.exp(low), widths, num_blocks) < target < median_angle_budget(math.exp(high), widths,
                                                                                                 num_blocks):
        raise ValueError(f"no eps in [1e-8, 1e3] gives a median angle budget of {target:.3g} degrees")
    while high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (middle, high) if median_angle_budget(math.exp(middle), widths, num_blocks) < target else (low, middle)
    return math.exp((low + high) / 2)


@torch.no_grad()
def rotation_stats(layers: list) -> dict[str, float]:
    """Where trained OFT layers' blocks sit: the share of blocks on their paper-convention radius
    (COFT layers only; nan without any: cells.blocks_of leaves it out) and the median rotation
    angle per plane (degrees) over every plane of every block. A skew Q's eigenvalues are +-i q_k,
    one pair per plane, and the Cayley transform turns plane k by 2 atan(q_k)."""
    on_radius, blocks, angles = 0, 0, []
    for layer in layers:
        q = skew_from_triangle(layer.oft_generator.detach().double(), layer.block_size)
        if layer.coft and layer.coft_norm == "paper":
            norms = q.flatten(1).norm(dim=1)
            on_radius += int((norms >= ON_RADIUS * layer.paper_radius).sum())
            blocks += len(norms)
        # Eigenvalues of the symmetric Q^T Q are q_k^2, each twice; an odd b adds a zero.
        squared = torch.linalg.eigvalsh(q.mT @ q).clamp_min(0)
        per_plane = squared.sqrt()[:, 1::2] if layer.block_size % 2 == 0 else squared.sqrt()[:, 2::2]
        angles.append(torch.rad2deg(2 * torch.atan(per_plane)).flatten())
    median = float(torch.cat(angles).median()) if angles else math.nan
    return {"share on radius": on_radius / blocks if blocks else math.nan, "median angle per plane (deg)": median}
