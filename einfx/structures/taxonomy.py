"""The (ω, ψ, ν) taxonomy of SPEC §1: parameter sharing, rank and compute intensity.

The θ formulas are the authors' asymptotic ones for square layers. The exact counterparts are computed from
the resolved integer sizes: ω = log(MACs/params), ψ = log(rank bound), ν = log(MACs) − 1, all over log d,
with d = sqrt(d_in·d_out) (d itself for square layers). MACs use the cheaper of the two token orders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from einfx.structures.structure import Structure

__all__ = ["Taxonomy", "taxonomy", "theta_taxonomy"]


@dataclass(frozen=True)
class Taxonomy:
    """ω (parameter sharing), ψ (rank), ν (compute intensity): from θ, and exact at the real sizes."""

    omega: float
    psi: float
    nu: float
    omega_exact: float
    psi_exact: float
    nu_exact: float
    theta: tuple[float, ...]


def theta_taxonomy(theta) -> tuple[float, float, float]:
    """(ω, ψ, ν) from a θ 7-tuple by the formulas of SPEC §1."""
    a, b, g, d, e, f, r = theta
    omega = min(a + d, b + e) - min(a, e)
    psi = min(1.0, 2.0 + r - a - e)
    nu = 1.0 + r - min(a, e)
    return omega, psi, nu


def taxonomy(structure: Structure, d_in: int, d_out: int) -> Taxonomy:
    """The taxonomy of ``structure`` at a (d_in, d_out) layer.

    Example:
        >>> t = taxonomy(Structure.btt(rank=1), 1024, 1024)
        >>> (t.omega, t.psi, t.nu)
        (0.0, 1.0, 0.5)
    """
    theta = structure.theta_for(d_in, d_out)
    omega, psi, nu = theta_taxonomy(theta)
    sizes = structure.resolve(d_in, d_out)
    macs = min(sizes.macs_per_token("xab"), sizes.macs_per_token("xba")) if not sizes.dense else d_in * d_out
    log_d = 0.5 * (math.log(d_in) + math.log(d_out))
    if log_d <= 0:
        return Taxonomy(omega, psi, nu, 0.0, 0.0, 0.0, theta)
    return Taxonomy(
        omega=omega,
        psi=psi,
        nu=nu,
        omega_exact=math.log(macs / sizes.params) / log_d,
        psi_exact=math.log(sizes.rank_bound()) / log_d,
        nu_exact=math.log(macs) / log_d - 1.0,
        theta=theta,
    )
