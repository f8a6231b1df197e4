"""Spectral (μP) initialization and structure-aware learning-rate multipliers, SPEC §2.

Each core is read as a matrix with a fan-in and a fan-out (order x→A→B):
    A: fan_in = d_α,          fan_out = d_δ·d_φ·d_ρ
    B: fan_in = d_β·d_γ·d_ρ,  fan_out = d_ε
and initialized N(0, σ²) with σ = sqrt(min(fan_in, fan_out)) / fan_in.
"""

from __future__ import annotations

import math

import torch

from einfx.structures.sizes import Sizes

__all__ = ["core_fans", "spectral_std", "init_cores_", "lr_multipliers"]


def core_fans(sizes: Sizes) -> dict[str, tuple[int, int]]:
    """{core name: (fan_in, fan_out)} for the cores of a layer."""
    s = sizes
    if s.dense:
        return {"weight": (s.d_in, s.d_out)}
    return {"A": (s.alpha, s.delta * s.phi * s.rho), "B": (s.beta * s.gamma * s.rho, s.epsilon)}


def spectral_std(fan_in: int, fan_out: int) -> float:
    """σ = sqrt(min(fan_in, fan_out)) / fan_in."""
    return math.sqrt(min(fan_in, fan_out)) / fan_in


@torch.no_grad()
def init_cores_(cores: dict[str, torch.Tensor], sizes: Sizes, zero_last: bool = False,
                generator: torch.Generator | None = None) -> None:
    """Initialize the cores in place; ``zero_last`` zeroes the last core (B, or the dense weight)."""
    fans = core_fans(sizes)
    for name, tensor in cores.items():
        std = spectral_std(*fans[name])
        if zero_last and name in ("B", "weight"):
            tensor.zero_()
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor) * std)


def lr_multipliers(sizes: Sizes, optimizer: str = "adam") -> dict[str, float]:
    """Per-core learning-rate multipliers relative to a dense layer's.

    Adam: (d_in / fan_in) / n_cores. SGD: (fan_out / fan_in) / (d_out / d_in) / n_cores. A dense layer
    gets 1 for its weight.
    """
    fans = core_fans(sizes)
    n = len(fans)
    if optimizer not in ("adam", "sgd"):
        raise StructureError(f"unknown optimizer kind {optimizer!r}; valid: adam, sgd")
    out = {}
    for name, (fi, fo) in fans.items():
        if sizes.dense:
            out[name] = 1.0
        elif optimizer == "adam":
            out[name] = (sizes.in_padded / fi) / n
        else:
            out[name] = (fo / fi) / (sizes.out_padded / sizes.in_padded) / n
    return out
