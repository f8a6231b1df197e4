"""The cost model: predicted time of each primitive from FLOPs, bytes moved and launches.

    time = FLOPs / (rate · eff) + bytes / bandwidth + launches · launch_s + views · view_s
    eff  = Π_{d in (m, n, k)} d / (d + h)          (h = profile.gemm_half_dim; small GEMM dims run slowly)

Primitives: a (batched) GEMM (operands and result streamed once), a copy that keeps the
innermost run contiguous (copy bandwidth), a copy whose contiguous runs are shorter than 64 bytes (transpose
bandwidth, element-granular), and a view op (reshape/permute/expand: no bytes, a small fixed cost in eager mode).
A strided operand that the GEMM cannot read directly is charged as a copy by the planner, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfx.planning.profile import DeviceProfile

__all__ = ["PrimCost", "gemm_cost", "copy_cost", "view_cost", "gemm_efficiency", "ZERO"]


@dataclass(frozen=True)
class PrimCost:
    """FLOPs, bytes moved, kernel launches, view ops and predicted seconds of one or more primitives."""

    flops: int = 0
    bytes: int = 0
    launches: int = 0
    views: int = 0
    time: float = 0.0

    def __add__(self, other: "PrimCost") -> "PrimCost":
        return PrimCost(self.flops + other.flops, self.bytes + other.bytes, self.launches + other.launches,
                        self.views + other.views, self.time + other.time)


ZERO = PrimCost()


def _move_time(nbytes: int, bandwidth: float, profile: DeviceProfile) -> float:
    """Bytes up to the cache size at ``bandwidth``, the rest at (at most) memory bandwidth."""
    cached = min(nbytes, profile.cache_bytes)
    return cached / bandwidth + (nbytes - cached) / min(bandwidth, profile.memory_bandwidth)


def gemm_efficiency(m: int, n: int, k: int, profile: DeviceProfile) -> float:
    h = profile.gemm_half_dim
    return (m / (m + h)) * (n / (n + h)) * (k / (k + h))


def gemm_cost(batch: int, m: int, n: int, k: int, itemsize: int, dtype: str, profile: DeviceProfile) -> PrimCost:
    """A batched GEMM C[batch, m, n] = X[batch, m, k] · Y[batch, k, n] (operands read once, C written once)."""
    flops = 2 * batch * m * n * k
    nbytes = itemsize * batch * (m * k + k * n + m * n)
    time = flops / (profile.flops_rate(dtype) * gemm_efficiency(m, n, k, profile)) if flops else 0.0
    time += _move_time(nbytes, profile.copy_bandwidth, profile) + profile.launch_s
    return PrimCost(flops, nbytes, 1, 0, time)


def copy_cost(elements: int, itemsize: int, run: int, profile: DeviceProfile, block: int | None = None) -> PrimCost:
    """Materialize ``elements`` values in a new layout (read + write).

    ``run`` is the number of elements that stay contiguous (the trailing indices the source and the
    destination share, in order). Runs of at least 64 bytes move at copy bandwidth. Shorter runs are
    element-granular: at block bandwidth when single elements are shuffled inside many blocks of ``block``
    elements that fit in ``profile.cache_bytes`` (e.g. one token's features; the blocks are independent and
    run in parallel), else at transpose bandwidth (a whole-tensor transpose)
    (strided reads across pages: TLB and cache-line waste; short runs of 2-15 elements measured no faster).
    """
    nbytes = 2 * elements * itemsize
    if run * itemsize >= 64:
        bandwidth = profile.copy_bandwidth
    elif run == 1 and block is not None and block < elements and block * itemsize <= profile.cache_bytes:
        bandwidth = profile.block_bandwidth
    else:
        bandwidth = profile.transpose_bandwidth
    return PrimCost(0, nbytes, 1, 0, _move_time(nbytes, bandwidth, profile) + profile.launch_s)


def view_cost(profile: DeviceProfile, count: int = 1) -> PrimCost:
    return PrimCost(0, 0, 0, count, count * profile.view_s)
