"""Integer factorization of a layer dimension into the sizes that a θ target asks for.

SPEC §1: a side of dimension n with exponents (θ1, θ2, θ3) summing to 1 wants sizes n^θi. Real sizes are
integers whose product m is n (exact) or slightly larger (the input is zero-padded, the output truncated).
Exact factorizations are preferred: the closest exact one is taken when its distance to the target (in log
space, relative to log n) is at most ``EXACT_DISTANCE``. Otherwise every candidate, padded or not, is scored
by that distance plus a penalty proportional to the padding. Candidates whose relative padding exceeds the
tolerance, or whose distance exceeds ``MAX_DISTANCE`` (a different structure in disguise, e.g. a prime n
"factored" as n x 1), are refused; when none is left the caller raises a clear error.

A side whose features the model reads in groups (attention's heads: 384 = 12 heads x 32) may ask for its
outermost size to be the group count (``outer``): the factorization 12 x 32 instead of 16 x 24 keeps each head's
features in one block of the layer's layout, so the exported relayout and the head split become one Transpose
(`einfx.export.relayouts`). The request is honoured when it divides n exactly within ``MAX_DISTANCE``.
"""

from __future__ import annotations

import math
from functools import lru_cache

__all__ = ["factor_side", "PADDING_WEIGHT", "EXACT_DISTANCE", "MAX_DISTANCE"]

# How much one unit of relative padding costs against one unit of relative log distance. Padding wastes
# compute and memory in proportion, so a padded factorization must be clearly closer to the target.
PADDING_WEIGHT = 10.0
# An exact factorization whose sizes are all within a factor n**0.1 of their targets beats any padded one.
EXACT_DISTANCE = 0.1
# Beyond this distance a factorization no longer has the shape the structure asks for.
MAX_DISTANCE = 0.3


def _divisors(m: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= m:
        if m % i == 0:
            small.append(i)
            if i * i != m:
                large.append(m // i)
        i += 1
    return small + large[::-1]


def _splits(m: int, slots: int) -> list[tuple[int, ...]]:
    """All ordered ways to write m as a product of `slots` positive integers."""
    if slots == 1:
        return [(m,)]
    out = []
    for d in _divisors(m):
        for rest in _splits(m // d, slots - 1):
            out.append((d,) + rest)
    return out


def _distance(sizes: tuple[int, ...], targets: tuple[float, ...], log_n: float) -> float:
    return math.sqrt(sum((math.log(s) - t) ** 2 for s, t in zip(sizes, targets))) / log_n


@lru_cache(maxsize=4096)
def factor_side(n: int, thetas: tuple[float, ...], tolerance: float, outer: int = 1
                ) -> tuple[tuple[int, ...], int, float] | None:
    """Factor dimension ``n`` into ``len(thetas)`` integer sizes close to ``n ** theta``.

    Args:
        n: the dimension (≥ 1).
        thetas: the exponents, one per slot, summing to 1. A zero exponent always gets size 1.
        tolerance: the largest relative padding (m - n) / n allowed.
        outer: the size wanted for the outermost active slot (the last one: the slowest-varying feature
            index), 1 for none; ignored unless exactly two slots are active, ``outer`` divides n and the
            exact split is within ``MAX_DISTANCE``.
        A side with a single active slot always factors exactly (the slot takes n).

    Returns:
        ``(sizes, m, distance)`` with ``prod(sizes) == m >= n``, or ``None`` when no candidate within the
        tolerance exists. Ties go to the exact factorization, then to the lexicographically largest sizes.
    """
    active = [i for i, t in enumerate(thetas) if t > 0]
    if n == 1 or not active:
        return (tuple(1 for _ in thetas), 1, 0.0) if n == 1 else None
    log_n = math.log(n)
    targets = tuple(thetas[i] * log_n for i in active)
    if outer > 1 and len(active) == 2 and n % outer == 0 and n // outer > 1:
        split = (n // outer, outer)
        dist = _distance(split, targets, log_n)
        if dist <= MAX_DISTANCE:
            return _place(thetas, active, split), n, dist
    best: tuple[float, tuple[int, ...], int, float] | None = None
    m_max = math.floor(n * (1.0 + tolerance) + 1e-9)
    exact = min(((_distance(sp, targets, log_n), sp) for sp in _splits(n, len(active))),
                key=lambda c: (c[0], tuple(-v for v in c[1])))
    if exact[0] <= EXACT_DISTANCE:
        return _place(thetas, active, exact[1]), n, exact[0]
    for m in range(n, m_max + 1):
        pad = (m - n) / n
        if best is not None and PADDING_WEIGHT * pad > best[0]:
            break  # no larger m can beat the best score found so far
        for split in _splits(m, len(active)):
            dist = _distance(split, targets, log_n)
            if dist > MAX_DISTANCE:
                continue
            score = dist + PADDING_WEIGHT * pad
            if best is None or score < best[0] - 1e-12 or (abs(score - best[0]) <= 1e-12 and split > best[1] and m == best[2]):
                best = (score, split, m, dist)
    if best is None:
        return None
    return _place(thetas, active, best[1]), best[2], best[3]


def _place(thetas, active, split) -> tuple[int, ...]:
    sizes = [1] * len(thetas)
    for i, s in zip(active, split):
        sizes[i] = s
    return tuple(sizes)
