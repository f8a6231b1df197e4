"""Projection of a dense weight onto BTT-MoE experts (``init="project"``).

What it computes: the per-block truncated SVD of the weight (SPEC §3, BTT), one singular triplet per expert.
For every block (φ, γ) of the zero-padded weight, an ε×α matrix M = Σ_i σ_i u_i v_iᵀ, expert e receives
the e-th triplet scaled by k:

    B[φ, :, e, γ, 0] = sqrt(k σ_e) u_e        A[φ, 0, e, γ, :] = sqrt(k σ_e) v_e

A zero gate makes every logit tie; ties go to the lowest index, so every token is routed to experts
0..k-1 with weight 1/k each, and the layer's map at init is exactly Σ_{e<k} σ_e u_e v_eᵀ per block: the
rank-k BTT projection of the weight, the best map that any k rank-1 experts can form (Eckart–Young per
block, when d_in and d_out factor without padding). The remaining experts hold the next triplets, so once
the gate learns to route a token elsewhere, its experts still carry the weight's next-strongest directions.
With k = E the layer starts at the full rank-E BTT projection.
"""

from __future__ import annotations

import math

import torch

from einfx.errors import ProjectionError
from einfx.structures.sizes import Sizes

__all__ = ["project_experts"]


@torch.no_grad()
def project_experts(weight: torch.Tensor, sizes: Sizes, k: int, name: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cores (A, B) of a BTT-MoE layer fitted to ``weight`` (d_out, d_in) as described in the module doc.

    Args:
        weight: dense weight (d_out, d_in), finite.
        sizes: resolved sizes of the layer (BTT layout: β = δ = 1, ρ = E).
        k: experts per token.
        name: layer name for error messages.

    Returns:
        (A, B) in ``sizes.a_shape`` / ``sizes.b_shape``, in the weight's dtype and device.
    """
    s = sizes
    where = f"layer {name!r}: " if name else ""
    if s.beta != 1 or s.delta != 1:
        raise ProjectionError(
            f"{where}BTT-MoE projection needs β = δ = 1 (BTT layout), got sizes {s.describe()}")
    experts = s.rho
    work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    padded = torch.zeros(s.out_padded, s.in_padded, dtype=work.dtype, device=work.device)
    padded[: s.d_out, : s.d_in] = work
    # rows (φ, ε), columns (γ, α): block (φ, γ) is an ε×α matrix
    blocks = padded.reshape(s.phi, s.epsilon, s.gamma, s.alpha).permute(0, 2, 1, 3)
    try:
        u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)
    except RuntimeError as exc:  # non-convergence (torch.linalg.LinAlgError derives from RuntimeError)
        raise ProjectionError(f"{where}SVD of the {s.phi}x{s.gamma} blocks of shape "
                              f"{s.epsilon}x{s.alpha} failed: {exc}") from exc
    root = (sv[..., :experts] * k).sqrt()  # (φ, γ, E)
    b = u[..., :experts] * root.unsqueeze(-2)  # (φ, γ, ε, E)
    a = vh[..., :experts, :] * root.unsqueeze(-1)  # (φ, γ, E, α)
    A = a.permute(0, 2, 1, 3).reshape(s.a_shape)  # (φ, 1, E, γ, α)
    B = b.permute(0, 2, 3, 1).reshape(s.b_shape)  # (φ, ε, E, γ, 1)
    if not (math.isfinite(float(A.abs().sum())) and math.isfinite(float(B.abs().sum()))):
        raise ProjectionError(f"{where}BTT-MoE projection produced non-finite cores")
    return A.to(weight.dtype), B.to(weight.dtype)
