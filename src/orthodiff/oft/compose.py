"""Composing rotations: several OFT adapters on one frozen layer.

Two adapters trained apart each rotate the same input space, W' = W R_a and W' = W R_b.
Three ways to apply both, all on batches (..., b, b) of rotations:

    product   R = R_1^s_1 R_2^s_2 ... R_n^s_n: W' = W R_1 R_2, i.e. the FIRST adapter is
              folded into W first and the second rotates the input of that merged layer
              (what merging A and then training-free applying B on top gives). Order matters
              unless the rotations commute; a scale s is a fractional power R^s.
    mean      the weighted geodesic (Karcher) mean on the rotation group, weights = scales:
              symmetric in its arguments, the mean of R with itself is R, and for commuting
              rotations mean(R_a, R_b) = (R_a R_b)^(1/2) (half of each).
    power     R^s = exp(s log R): the identity at s = 0, R at s = 1, R^T at s = -1.

Why the matrix log/exp of the rotations and not the Cayley generators: the group's
geodesics are t -> A exp(t log(A^T B)), so only exp/log give a mean that is a point on
the geodesic between the two, that is symmetric, and that halves commuting rotations;
averaging Cayley generators (cayley((Q_a + Q_b) / 2)) is none of these (cayley(Q)^2 is
not cayley(2Q)). The log is computed through the Cayley generator anyway, because that is
stable: Q = (R - I)(R + I)^-1 is skew with eigenvalues i tan(theta / 2), and
log R = 2 atan(Q), evaluated with a Hermitian eigendecomposition of -iQ, which stays
exact when eigenvalues repeat (an identity block). It needs every plane turned by less
than 180 degrees, which any Cayley rotation is; the product of two may not be, and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COMPOSE_MODES = ("product", "mean")


def _eye_like(r: torch.Tensor) -> torch.Tensor:
    return torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)


def inverse_cayley(r: torch.Tensor) -> torch.Tensor:
    """The skew Q with cayley(Q) = R: (R - I)(R + I)^-1, for orthogonal R whose planes turn by
    less than 180 degrees (R + I invertible). Float64."""
    r = r.double()
    eye = _eye_like(r)
    smallest = torch.linalg.svdvals(r + eye)[..., -1]
    if (smallest < 1e-6).any():  # an eigenvalue -1: a half turn, which no Cayley generator reaches
        raise ValueError("a composed rotation turns a plane by 180 degrees, which the Cayley form cannot hold: "
                         "lower the scales or compose with mode=mean")
    q = torch.linalg.solve(r + eye, r - eye)  # the two factors commute
    return (q - q.mT) / 2  # skew up to rounding; make it exact


def triangle_from_skew(q: torch.Tensor) -> torch.Tensor:
    """(..., b, b) skew Q -> its (..., b(b-1)/2) upper triangle, skew_from_triangle's inverse."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, offset=1, device=q.device)
    return q[..., rows, cols]


def rotation_log(r: torch.Tensor) -> torch.Tensor:
    """The skew S with exp(S) = R and every plane's angle in (-pi, pi): log R = 2 atan(Q) for
    R's Cayley generator Q, through the Hermitian -iQ's eigendecomposition. Float64."""
    q = inverse_cayley(r)
    angles, vectors = torch.linalg.eigh(-1j * q.to(torch.complex128))  # -iQ = V diag(phi) V^H
    log = 1j * (vectors * (2 * torch.atan(angles)).to(vectors.dtype).unsqueeze(-2)) @ vectors.mH
    log = log.real
    return (log - log.mT) / 2


def rotation_exp(s: torch.Tensor) -> torch.Tensor:
    """exp(S) of a skew S: orthogonal."""
    return torch.linalg.matrix_exp(s.double())


def rotation_power(r: torch.Tensor, s: float) -> torch.Tensor:
    """R^s = exp(s log R); s = 0 is the identity exactly and s = 1 is R itself."""
    if s == 1:
        return r.double()
    if s == 0:
        return _eye_like(r.double()).clone()
    return rotation_exp(s * rotation_log(r))


def geodesic_mean(rotations: torch.Tensor, weights: Sequence[float] | None = None, steps: int = 50) -> torch.Tensor:
    """The weighted Karcher mean of rotations (n, ..., b, b) on the rotation group, batched over
    the middle dimensions: the M with sum_i w_i log(M^T R_i) = 0. For two rotations the first
    step from R_1 lands on the geodesic point R_1 exp(w_2 / (w_1 + w_2) log(R_1^T R_2)), and
    the next confirms it. Weights must be >= 0; all zero gives the identity."""
    rotations = rotations.double()
    weights = torch.ones(len(rotations), dtype=torch.float64) if weights is None else \
        torch.tensor(list(weights), dtype=torch.float64)
    if len(weights) != len(rotations) or (weights < 0).any():
        raise ValueError(f"geodesic_mean: {len(weights)} weights for {len(rotations)} rotations, all >= 0 "
                         f"(got {weights.tolist()})")
    if weights.sum() == 0:
        return _eye_like(rotations[0]).clone()
    weights = (weights / weights.sum()).to(rotations.device).view(-1, *[1] * (rotations.ndim - 1))
    mean = rotations[int(weights.flatten().argmax())]
    for _ in range(steps):
        step = (weights * rotation_log(mean.mT.unsqueeze(0) @ rotations)).sum(0)
        mean = mean @ rotation_exp(step)
        if step.abs().max() < 1e-12:
            break
    return mean


def compose_rotations(rotations: torch.Tensor, scales: Sequence[float] | None = None,
                      mode: str = "product") -> torch.Tensor:
    """Several adapters' rotations (n, ..., b, b) of one layer as one (see the module's
    docstring): mode "product" (R_1^s_1 R_2^s_2 ..., first adapter folded first) or "mean"
    (geodesic mean weighted by the scales). Float64."""
    if mode not in COMPOSE_MODES:
        raise ValueError(f"compose mode {mode!r}: choose one of {COMPOSE_MODES}")
    scales = [1.0] * len(rotations) if scales is None else [float(s) for s in scales]
    if len(scales) != len(rotations):
        raise ValueError(f"{len(scales)} scales for {len(rotations)} adapters")
    if mode == "mean":
        return geodesic_mean(rotations, scales)
    composed = rotation_power(rotations[0], scales[0])
    for rotation, scale in zip(rotations[1:], scales[1:]):
        composed = composed @ rotation_power(rotation, scale)
    return composed
