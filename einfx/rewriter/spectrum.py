"""Projection error of a dense weight at every rank of a structure family, from one set of SVDs.

For the families whose optimal projection is a (block) truncated SVD (SPEC §3), the relative Frobenius error
at rank r is sqrt(Σ_{i>r} σ_i² / ‖W‖²) over the singular values σ of:

    low-rank, BTT, Monarch (β = δ = 1):   every (φ, γ) block W[φ, ε, γ, α]   (ε × α)
    Kronecker, Tensor-Train (γ = φ = 1):  the Van Loan rearrangement R[(ε, β), (δ, α)]

so the budget planner can compare ranks without projecting each one.
"""

from __future__ import annotations

import torch

from einfx.structures.functional import pad_input
from einfx.structures.sizes import Sizes

__all__ = ["rank_errors"]


def _padded(weight: torch.Tensor, s: Sizes) -> torch.Tensor:
    w = pad_input(weight, s)
    extra = s.out_padded - s.d_out
    return torch.cat([w, w.new_zeros(extra, w.shape[1])]) if extra else w


def rank_errors(weight: torch.Tensor, sizes: Sizes) -> torch.Tensor | None:
    """Relative projection error for ranks 0..max (index r: error at rank r), or ``None`` when the sizes
    mix all indices and no single SVD gives the optimum.

    Args:
        weight: the dense weight (d_out, d_in).
        sizes: the resolved sizes of the structure (any rank: only α…φ are used).
    """
    s = sizes
    w = _padded(weight.detach().double(), s)
    total = float((w * w).sum())
    if s.dense or total == 0.0:
        return None
    if s.beta == 1 and s.delta == 1:
        blocks = w.reshape(s.phi, s.epsilon, s.gamma, s.alpha).permute(0, 2, 1, 3)
    elif s.gamma == 1 and s.phi == 1:
        blocks = w.reshape(s.epsilon, s.delta, s.beta, s.alpha).permute(0, 2, 1, 3).reshape(
            1, s.epsilon * s.beta, s.delta * s.alpha)
    else:
        return None
    sv = torch.linalg.svdvals(blocks.reshape(-1, blocks.shape[-2], blocks.shape[-1]))  # (blocks, k)
    energy = (sv * sv).sum(0).flip(0).cumsum(0).flip(0)  # energy[r] = Σ_{i >= r} σ_i²
    errors = torch.cat([energy, energy.new_zeros(1)])
    return (errors.clamp_min(0) / total).sqrt()
