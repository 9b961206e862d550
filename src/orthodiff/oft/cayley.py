"""The orthogonal math of OFT, kept apart from any layer.

A block's generator is the strict upper triangle of a skew-symmetric matrix Q
(b(b-1)/2 free numbers). Zero generator -> Q = 0 -> R = I: the base model exactly.

Sign convention, used by every path in this project (the original OFT code used
opposite signs in two places; PEFT's Neumann path approximates the transpose):

    R = (I + Q)(I - Q)^-1 = (I - Q)^-1 (I + Q)          (the two factors commute)

The Neumann path approximates (I - Q)^-1 ~ I + Q + ... + Q^(k-1), i.e. the SAME R.
"""

from contextlib import nullcontext

import torch


def skew_from_triangle(generator: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., b(b-1)/2) upper-triangle entries -> (..., b, b) skew-symmetric Q."""
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=generator.device)
    upper = generator.new_zeros(*generator.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = generator
    return upper - upper.transpose(-1, -2)


def cayley(q: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """Orthogonal R = (I + Q)(I - Q)^-1 for a batch of skew-symmetric Q, in float32.

    neumann_terms=None solves exactly (a batched linear solve); an integer k uses
    (I - Q)^-1 ~ sum_{j<k} Q^j, cheaper and orthogonal up to O(||Q||^k).
    Always float32 (or float64 if given float64), also under fp16/bf16 autocast:
    the solve is ill-conditioned in half precision.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The meta device (plan.py's shapes-only forward) has no autocast to switch off.
    off = nullcontext() if q.device.type == "meta" else torch.autocast(device_type=q.device.type, enabled=False)
    with off:
        q = q.to(dtype)
        eye = torch.eye(q.shape[-1], dtype=dtype, device=q.device)
        if neumann_terms is None:
            return torch.linalg.solve(eye - q, eye + q)
        inverse, power = eye + q, q
        for _ in range(neumann_terms - 2):
            power = power @ q
            inverse = inverse + power
        return (eye + q) @ inverse


def cayley_distance_sq(q_gram_eigenvalues: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """||cayley(scale * Q) - I||_F^2 from the eigenvalues lambda of Q^T Q.

    R - I = 2Q(I - Q)^-1 and Q is normal, so each eigenvalue i*theta of Q contributes
    |2i theta / (1 - i theta)|^2 = 4 theta^2 / (1 + theta^2), with theta^2 = lambda.
    """
    lam = q_gram_eigenvalues * scale.unsqueeze(-1) ** 2
    return (4 * lam / (1 + lam)).sum(-1)


@torch.no_grad()
def project_generator(generator: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """Shrink each block's generator so that ||cayley(Q_i) - I||_F <= eps exactly.

    A block already inside the ball is untouched. A block outside is scaled along its
    own direction, Q -> alpha Q, with alpha from the closed form above, so the bound holds
    exactly rather than to first order (the original code bounded ||Q||, which bounds
    ||R - I|| only to first order). As a function of s = alpha^2 the squared distance
    g(s) = sum 4 s lam / (1 + s lam) is increasing and concave, so Newton's method started
    at s = 0 climbs to the root from below: every iterate satisfies the bound, and it
    converges in a few steps (60 bisection steps cost this projection as much as a
    training step's forward and backward on the tiny model).
    """
    target = (eps * (1 - 1e-5)) ** 2  # margin absorbs float32 rounding in the forward's solve
    flat = generator.reshape(-1, generator.shape[-1]).to(torch.float64, copy=True)  # never the caller's tensor
    # ||R - I||_F <= 2 ||Q||_F: blocks whose generator is that small need no eigenvalues.
    q_norm = flat.norm(dim=-1) * 2**0.5
    outside = 4 * q_norm**2 > target
    if not outside.any():
        return generator
    q = skew_from_triangle(flat[outside], block_size)
    lam = torch.linalg.eigvalsh(q.mT @ q).clamp_min(0)
    one = torch.ones(len(q), dtype=torch.float64)
    s = torch.zeros_like(one)
    for _ in range(50):
        excess = cayley_distance_sq(lam, s.sqrt()) - target
        slope = (4 * lam / (1 + s.unsqueeze(-1) * lam) ** 2).sum(-1)  # g'(s)
        step = excess / slope.clamp_min(1e-300)
        s = s - step
        if (step.abs() <= 1e-15 * s).all():
            break
    alpha = torch.where(cayley_distance_sq(lam, one) <= target, one, s.sqrt())
    flat[outside] = flat[outside] * alpha.unsqueeze(-1)
    return flat.reshape(generator.shape).to(generator.dtype)


@torch.no_grad()
def project_generator_norm(generator: torch.Tensor, block_size: int, radius: float) -> torch.Tensor:
    """Scale each block's generator so that its full skew-symmetric Q_i (not the stored upper
    triangle, which has 1/sqrt(2) of Q's Frobenius norm) satisfies ||Q_i||_F <= radius:
    the original OFT code's COFT constraint (see OFTConfig.coft_norm)."""
    q_norm = generator.double().norm(dim=-1, keepdim=True) * 2**0.5
    scale = torch.where(q_norm > radius, radius / q_norm.clamp_min(1e-300), torch.ones_like(q_norm))
    return (generator.double() * scale).to(generator.dtype)
