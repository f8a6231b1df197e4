"""Resolved integer sizes of a two-core einsum layer, and their exact costs.

Layout conventions (fixed across einfx):
    x[γ, β, α]              input, flattened with γ outermost and α innermost (d_in padded to γ·β·α)
    A[φ, δ, ρ, γ, α]        first core, stored as a 5-D tensor (size-1 indices kept in storage)
    B[φ, ε, ρ, γ, β]        second core
    y[φ, ε, δ]              output, flattened with φ outermost and δ innermost (truncated to d_out)
A dense layer has a single core ``weight`` of shape (d_out, d_in), like ``nn.Linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Sizes", "ORDERS"]

# Contraction orders of the two cores. "fold" multiplies A and B into a dense weight first.
ORDERS = ("xab", "xba", "fold")

INDEX_LETTERS = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "phi": "φ", "rho": "ρ"}


@dataclass(frozen=True)
class Sizes:
    """Integer index sizes of one layer. ``dense`` marks the single-weight dense layer."""

    d_in: int
    d_out: int
    alpha: int = 1
    beta: int = 1
    gamma: int = 1
    delta: int = 1
    epsilon: int = 1
    phi: int = 1
    rho: int = 1
    dense: bool = False

    @classmethod
    def for_dense(cls, d_in: int, d_out: int) -> "Sizes":
        return cls(d_in, d_out, alpha=d_in, epsilon=d_out, rho=min(d_in, d_out), dense=True)

    # -- shapes -------------------------------------------------------------------------------------
    @property
    def in_padded(self) -> int:
        return self.d_in if self.dense else self.gamma * self.beta * self.alpha

    @property
    def out_padded(self) -> int:
        return self.d_out if self.dense else self.phi * self.epsilon * self.delta

    @property
    def a_shape(self) -> tuple[int, int, int, int, int]:
        return (self.phi, self.delta, self.rho, self.gamma, self.alpha)

    @property
    def b_shape(self) -> tuple[int, int, int, int, int]:
        return (self.phi, self.epsilon, self.rho, self.gamma, self.beta)

    @property
    def padding(self) -> tuple[float, float]:
        """Relative padding of the input and of the output."""
        return (self.in_padded - self.d_in) / self.d_in, (self.out_padded - self.d_out) / self.d_out

    def as_dict(self) -> dict[str, int]:
        keys = ("alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho")
        return {k: getattr(self, k) for k in keys}

    def describe(self) -> str:
        """Compact text such as ``α32 γ32 | ε32 φ32 | ρ1`` (sizes of 1 omitted)."""
        if self.dense:
            return f"dense {self.d_out}x{self.d_in}"
        parts = []
        for group in (("alpha", "beta", "gamma"), ("delta", "epsilon", "phi"), ("rho",)):
            parts.append(" ".join(f"{INDEX_LETTERS[k]}{getattr(self, k)}" for k in group if getattr(self, k) > 1) or "-")
        return " | ".join(parts)

    # -- exact costs --------------------------------------------------------------------------------
    @property
    def params(self) -> int:
        """Number of weights in the cores (bias excluded)."""
        if self.dense:
            return self.d_in * self.d_out
        return math.prod(self.a_shape) + math.prod(self.b_shape)

    def macs_per_token(self, order: str = "xab") -> int:
        """Multiply-adds per input vector for an order of ``ORDERS`` (fold: the dense product only)."""
        f, d, r, g, a, b, e = self.phi, self.delta, self.rho, self.gamma, self.alpha, self.beta, self.epsilon
        if self.dense:
            return self.d_in * self.d_out
        if order == "xab":
            return f * d * r * g * a * b + f * e * r * g * b * d
        if order == "xba":
            return f * e * r * g * b * a + f * d * r * g * a * e
        if order == "fold":
            return self.in_padded * self.out_padded
        raise ValueError(f"unknown contraction order {order!r}; valid: {', '.join(ORDERS)}")

    def fold_macs(self) -> int:
        """Multiply-adds to build the dense weight from the cores once (0 for a dense layer)."""
        if self.dense:
            return 0
        return self.phi * self.delta * self.rho * self.gamma * self.alpha * self.epsilon * self.beta

    def best_token_order(self) -> str:
        """The cheaper of x·A·B and x·B·A in FLOPs (ties go to x·A·B)."""
        return "xab" if self.macs_per_token("xab") <= self.macs_per_token("xba") else "xba"

    def rank_bound(self) -> int:
        """Upper bound on rank(W): min(d_in, d_out, d_φ d_γ d_ρ · min(d_δ, d_α) · min(d_ε, d_β))."""
        if self.dense:
            return min(self.d_in, self.d_out)
        inner = self.phi * self.gamma * self.rho * min(self.delta, self.alpha) * min(self.epsilon, self.beta)
        return min(self.d_in, self.d_out, inner)
