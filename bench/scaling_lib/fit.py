"""Compute-optimal frontiers, power-law fits and compute multipliers (pure numpy).

    points (C, L) -> frontier: the lower envelope, the best loss reached at or below each compute
    frontier -> fit_power_law: L(C) = a·C^(−b) + c, grid over c plus log-linear least squares for (a, b)
    two frontiers -> compute_multiplier: C_ref(L*) / C(L*) at a loss L* both reached (> 1: fewer FLOPs
    than the reference for the same loss)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Frontier", "PowerLaw", "Multiplier", "frontier", "fit_power_law", "compute_multiplier", "common_loss"]


@dataclass(frozen=True)
class Frontier:
    """The lower envelope of (compute, loss) points: compute increasing, loss strictly decreasing."""

    compute: tuple[float, ...]
    loss: tuple[float, ...]

    def compute_at(self, loss: float) -> float | None:
        """Compute needed to reach ``loss``, interpolated log-log between frontier points; None outside."""
        c, l = np.log(np.asarray(self.compute)), np.log(np.asarray(self.loss))
        target = math.log(loss)
        if not (l.min() - 1e-12 <= target <= l.max() + 1e-12):
            return None
        # the loss decreases along the frontier; np.interp wants increasing x
        return float(np.exp(np.interp(target, l[::-1], c[::-1])))


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = a·C^(−b) + c, fitted on a frontier.

    Attributes:
        a, b, c: the parameters (C in FLOPs).
        rmse_log: root-mean-square residual of log L.
        points: how many points were fitted.
    """

    a: float
    b: float
    c: float
    rmse_log: float
    points: int

    def __call__(self, compute) -> np.ndarray:
        return self.a * np.power(np.asarray(compute, dtype=float), -self.b) + self.c

    def compute_for(self, loss: float) -> float | None:
        """The compute at which the fitted curve reaches ``loss`` (None at or below the floor c)."""
        if loss <= self.c or self.a <= 0 or self.b <= 0:
            return None
        return float(((loss - self.c) / self.a) ** (-1.0 / self.b))


@dataclass(frozen=True)
class Multiplier:
    """How many times less compute a curve needs than the reference to reach ``loss``."""

    loss: float
    compute_ref: float
    compute: float

    @property
    def value(self) -> float:
        return self.compute_ref / self.compute


def frontier(compute, loss) -> Frontier:
    """The compute-optimal frontier of points (C_i, L_i): keep a point if its loss is below that of every
    point with less (or equal) compute. Raises ValueError on empty, mismatched or non-positive input."""
    c = np.asarray(compute, dtype=float)
    l = np.asarray(loss, dtype=float)
    if c.shape != l.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(f"frontier needs two 1-D arrays of equal, non-zero length; got {c.shape} and {l.shape}")
    ok = np.isfinite(c) & np.isfinite(l)
    if not ok.any():
        raise ValueError("frontier: no finite (compute, loss) point")
    c, l = c[ok], l[ok]
    if (c <= 0).any() or (l <= 0).any():
        raise ValueError("frontier: compute and loss must be positive (they are fitted in log space)")
    order = np.lexsort((l, c))  # by compute, ties by loss
    keep_c, keep_l = [], []
    best = math.inf
    for i in order:
        if l[i] < best:
            best = l[i]
            keep_c.append(float(c[i]))
            keep_l.append(float(l[i]))
    return Frontier(tuple(keep_c), tuple(keep_l))


def _fit_fixed_c(x: np.ndarray, logl: np.ndarray, c: float) -> tuple[float, float, float]:
    """Least squares of log(L − c) = α − b·x; returns (α, b, SSE of log L)."""
    y = np.log(np.exp(logl) - c)
    design = np.stack([np.ones_like(x), -x], axis=1)
    (alpha, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    pred = np.log(c + np.exp(alpha - b * x))
    return float(alpha), float(b), float(np.sum((pred - logl) ** 2))


def fit_power_law(compute, loss, grid: int = 400) -> PowerLaw:
    """Fit L = a·C^(−b) + c to points (usually a frontier) by minimizing the squared error of log L.

    For each floor c on a grid over [0, min L) the best (a, b) is linear least squares in log space; the
    best grid cell is then refined by golden-section search. Needs at least 3 points; b is kept > 0 (a
    curve that does not decrease has no compute-optimal scaling; ValueError if none does).
    """
    c_arr = np.asarray(compute, dtype=float)
    l_arr = np.asarray(loss, dtype=float)
    if c_arr.shape != l_arr.shape or c_arr.ndim != 1 or c_arr.size < 3:
        raise ValueError(f"fit_power_law needs >= 3 points in two 1-D arrays of equal length; got "
                         f"{c_arr.shape} and {l_arr.shape}")
    if (c_arr <= 0).any() or (l_arr <= 0).any():
        raise ValueError("fit_power_law: compute and loss must be positive")
    x0 = float(np.mean(np.log(c_arr)))
    x = np.log(c_arr) - x0  # centred for conditioning; a is converted back below
    logl = np.log(l_arr)
    top = float(l_arr.min())
    # dense near the smallest loss, where the floor usually lies
    fracs = np.unique(np.concatenate([np.linspace(0.0, 0.99, grid // 2), 1.0 - np.logspace(-2, -5, grid // 2)]))

    def score(frac: float) -> float:
        _, b, sse = _fit_fixed_c(x, logl, frac * top)
        return sse if b > 0 else math.inf

    scores = np.array([score(f) for f in fracs])
    if not np.isfinite(scores).any():
        raise ValueError("fit_power_law: the loss does not decrease with compute for any floor c")
    i = int(np.argmin(scores))
    lo, hi = fracs[max(i - 1, 0)], fracs[min(i + 1, len(fracs) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if score(m1) <= score(m2):
            hi = m2
        else:
            lo = m1
    frac = min((fracs[i], (lo + hi) / 2), key=score)
    alpha, b, sse = _fit_fixed_c(x, logl, frac * top)
    a = math.exp(alpha + b * x0)  # L − c = e^α (C / e^x0)^(−b)
    return PowerLaw(a=a, b=b, c=frac * top, rmse_log=math.sqrt(sse / len(x)), points=len(x))


def common_loss(ref: Frontier, other: Frontier) -> float | None:
    """The lowest loss both frontiers reach (None when their loss ranges do not overlap)."""
    loss = max(min(ref.loss), min(other.loss))
    if loss > min(max(ref.loss), max(other.loss)):
        return None
    return loss


def compute_multiplier(ref: Frontier, other: Frontier, loss: float | None = None) -> Multiplier | None:
    """C_ref(L*) / C_other(L*) read off both frontiers at ``loss`` (default: `common_loss`).

    Returns None when either frontier does not reach the loss. Above 1: ``other`` needs less compute.
    """
    loss = common_loss(ref, other) if loss is None else loss
    if loss is None:
        return None
    c_ref, c_other = ref.compute_at(loss), other.compute_at(loss)
    if c_ref is None or c_other is None:
        return None
    return Multiplier(loss=loss, compute_ref=c_ref, compute=c_other)
