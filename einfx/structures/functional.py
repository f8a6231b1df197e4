"""Pure functional contraction of a two-core einsum layer (no nn.Module, no parameters).

``contract(x, A, B, sizes, order)`` runs the contraction with batched matmuls, reshapes and permutes only
(no einsum), so that traced and exported graphs hold MatMul/Transpose/Reshape. ``reference(x, A, B, sizes)``
is the full 7-index einsum of SPEC §1, kept as the independent oracle for tests. ``fold(A, B, sizes)``
builds the dense (d_out, d_in) weight. Layouts are those of `einfx.structures.sizes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from einfx.structures.sizes import ORDERS, Sizes

__all__ = ["contract", "reference", "fold", "pad_input", "unpad_output"]


def pad_input(x: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    """Zero-pad the last dimension from d_in to the factorized input size."""
    extra = sizes.in_padded - sizes.d_in
    return F.pad(x, (0, extra)) if extra else x


def unpad_output(y: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    """Truncate the last dimension from the factorized output size to d_out."""
    return y[..., : sizes.d_out] if sizes.out_padded != sizes.d_out else y


def _xab(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: Sizes) -> torch.Tensor:
    n = x2.shape[0]
    f, d, r, g, a, b, e = s.phi, s.delta, s.rho, s.gamma, s.alpha, s.beta, s.epsilon
    # contract α, batched over γ: (γ, N·β, α) @ (γ, α, φ·δ·ρ)
    xg = x2.reshape(n, g, b, a).permute(1, 0, 2, 3).reshape(g, n * b, a)
    ag = A.permute(3, 4, 0, 1, 2).reshape(g, a, f * d * r)
    t = torch.matmul(xg, ag).reshape(g, n, b, f, d, r)
    # contract (γ, β, ρ), batched over φ: (φ, N·δ, γ·β·ρ) @ (φ, γ·β·ρ, ε)
    t = t.permute(3, 1, 4, 0, 2, 5).reshape(f, n * d, g * b * r)
    bf = B.permute(0, 3, 4, 2, 1).reshape(f, g * b * r, e)
    y = torch.matmul(t, bf).reshape(f, n, d, e)
    return y.permute(1, 0, 3, 2).reshape(n, f * e * d)


def _xba(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: Sizes) -> torch.Tensor:
    n = x2.shape[0]
    f, d, r, g, a, b, e = s.phi, s.delta, s.rho, s.gamma, s.alpha, s.beta, s.epsilon
    # contract β, batched over γ: (γ, N·α, β) @ (γ, β, φ·ε·ρ)
    xg = x2.reshape(n, g, b, a).permute(1, 0, 3, 2).reshape(g, n * a, b)
    bg = B.permute(3, 4, 0, 1, 2).reshape(g, b, f * e * r)
    u = torch.matmul(xg, bg).reshape(g, n, a, f, e, r)
    # contract (γ, α, ρ), batched over φ: (φ, N·ε, γ·α·ρ) @ (φ, γ·α·ρ, δ)
    u = u.permute(3, 1, 4, 0, 2, 5).reshape(f, n * e, g * a * r)
    af = A.permute(0, 3, 4, 2, 1).reshape(f, g * a * r, d)
    y = torch.matmul(u, af).reshape(f, n, e, d)
    return y.permute(1, 0, 2, 3).reshape(n, f * e * d)


def fold(A: torch.Tensor, B: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    """The dense weight W (d_out, d_in) equal to the layer's linear map (padding removed)."""
    s = sizes
    f, d, r, g, a, b, e = s.phi, s.delta, s.rho, s.gamma, s.alpha, s.beta, s.epsilon
    # W[φ,ε,δ,γ,β,α] = Σ_ρ B[φ,ε,ρ,γ,β] A[φ,δ,ρ,γ,α], as a batched matmul over (φ, γ)
    bm = B.permute(0, 3, 1, 4, 2).reshape(f * g, e * b, r)
    am = A.permute(0, 3, 2, 1, 4).reshape(f * g, r, d * a)
    w = torch.matmul(bm, am).reshape(f, g, e, b, d, a)
    w = w.permute(0, 2, 4, 1, 3, 5).reshape(f * e * d, g * b * a)
    return w[: s.d_out, : s.d_in]


def contract(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, sizes: Sizes, order: str = "xab") -> torch.Tensor:
    """y = W x for x of shape (..., d_in), without bias, computed in the given order of ``ORDERS``."""
    lead = x.shape[:-1]
    x2 = pad_input(x, sizes).reshape(-1, sizes.in_padded)
    if order == "xab":
        y = _xab(x2, A, B, sizes)
    elif order == "xba":
        y = _xba(x2, A, B, sizes)
    elif order == "fold":
        w = fold(A, B, sizes)
        return torch.matmul(x, w.t())
    else:
        raise ValueError(f"unknown contraction order {order!r}; valid: {', '.join(ORDERS)}")
    return unpad_output(y, sizes).reshape(*lead, sizes.d_out)


def reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    """The full 7-index einsum of SPEC §1 (the oracle; slow, for tests)."""
    s = sizes
    lead = x.shape[:-1]
    xp = pad_input(x, s).reshape(-1, s.gamma, s.beta, s.alpha)
    y = torch.einsum("fdrga,fergb,ngba->nfed", A, B, xp)
    return unpad_output(y.reshape(-1, s.out_padded), s).reshape(*lead, s.d_out)
