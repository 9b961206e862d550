"""Hyperspherical energy and parameter counts: the quantities OFT claims to preserve and save."""

import torch
from torch import nn


def hyperspherical_energy(weight: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """HE(W) = sum_{i != j} ||w_i/|w_i| - w_j/|w_j| ||^-s over the rows (neurons) of W.

    Conv filters are flattened to rows. Computed in float64: the sum has ~n^2 terms.
    """
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = torch.cdist(unit, unit)
    off_diagonal = ~torch.eye(len(unit), dtype=torch.bool, device=unit.device)
    return (dist[off_diagonal] ** -s).sum()


def oft_parameter_count(in_features: int, block_size: int, block_share: bool = False) -> int:
    """Free parameters of one OFT layer: r * b(b-1)/2 (one block when shared)."""
    blocks = 1 if block_share else in_features // block_size
    return blocks * block_size * (block_size - 1) // 2


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
