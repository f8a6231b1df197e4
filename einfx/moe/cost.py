"""Which compute path a BTT-MoE layer runs, from a small FLOPs + bytes cost model (SPEC §5).

Three paths give the same outputs:
    masked: x·A for all E experts (one GEMM), scale the ρ slices of the intermediate by the (N, E) routing
            matrix, then ·B for all E experts (one GEMM). FLOPs grow with E.
    sparse: gather the k selected experts' slices of A and B per token and contract only those
            (broadcast multiply + sum). FLOPs grow with k, but every gathered weight is used by one token
            only, so the path is bound by memory traffic; it wins at small token counts (decoding) with
            many experts, where the masked path's cost is reading and permuting all E experts' cores.
    grouped: (eager only: data-dependent shapes) tokens sorted by expert, each expert's rank-1 BTT run on
            the tokens routed to it, outputs scaled and scattered back. FLOPs grow with k and the work stays
            GEMM-shaped; it pays a fixed overhead per expert, so it wins at large token counts.
Exported or traced graphs never take the grouped path (one ONNX file must serve every batch size).

``choose_path`` scores both with ``seconds = flops / rate + bytes / bandwidth`` using the constants of a
`PathProfile`. This is the one place to point at a calibrated device model (einfx.planning) later.
"""

from __future__ import annotations

from dataclasses import dataclass

from einfx.structures.sizes import Sizes

__all__ = ["PATHS", "STATIC_PATHS", "PathProfile", "PathCost", "CPU_PROFILE", "path_costs", "choose_path", "NOMINAL_TOKENS"]

PATHS = ("masked", "sparse", "grouped")
# Paths whose shapes do not depend on the routing (usable in exported graphs).
STATIC_PATHS = ("masked", "sparse")
# Token count assumed when it is unknown (symbolic batch while exporting): a typical training/inference batch.
NOMINAL_TOKENS = 1024


@dataclass(frozen=True)
class PathProfile:
    """Device rates for the two paths.

    Attributes:
        gemm_flops: FLOP/s of a large batched GEMM (the masked path).
        matvec_flops: FLOP/s of the sparse path's broadcast multiply + sum.
        bandwidth: bytes/s of memory traffic.
        expert_overhead: seconds of fixed work per expert on the grouped path (sorting, gathers, launches).
    """

    gemm_flops: float
    matvec_flops: float
    bandwidth: float
    expert_overhead: float = 1.5e-4


# Rough two-core CPU figures (float32); bench/moe.py prints the measured times next to the choice.
CPU_PROFILE = PathProfile(gemm_flops=60e9, matvec_flops=8e9, bandwidth=8e9)


@dataclass(frozen=True)
class PathCost:
    """Estimated cost of one path for a number of tokens (core contractions only, gate excluded)."""

    path: str
    flops: int
    bytes: int
    seconds: float


def path_costs(sizes: Sizes, k: int, tokens: int, dtype_bytes: int = 4,
               profile: PathProfile = CPU_PROFILE) -> dict[str, PathCost]:
    """{path: PathCost} for ``tokens`` tokens of a BTT-MoE layer with E = sizes.rho experts, k active."""
    s, n, e = sizes, tokens, sizes.rho
    per_expert_macs = s.macs_per_token("xab") // e
    core_elems = (s.phi * s.delta * s.gamma * s.alpha + s.phi * s.epsilon * s.gamma * s.beta)  # one expert
    inter = s.gamma * s.beta * s.phi * s.delta  # intermediate elements per token and expert
    io = n * (s.in_padded + s.out_padded)
    masked_flops = 2 * n * e * per_expert_macs
    # cores permuted (read + write) and read by the GEMMs; the intermediate is written, scaled (read +
    # write) and read again
    masked_bytes = dtype_bytes * (3 * e * core_elems + io + 4 * n * e * inter)
    sparse_flops = 2 * n * k * per_expert_macs
    # gathered slices written and read; their products with x (or the intermediate) written and read
    sparse_bytes = dtype_bytes * (4 * n * k * core_elems + io + 4 * n * k * inter)
    return {
        "masked": PathCost("masked", masked_flops, masked_bytes,
                           masked_flops / profile.gemm_flops + masked_bytes / profile.bandwidth),
        "sparse": PathCost("sparse", sparse_flops, sparse_bytes,
                           sparse_flops / profile.matvec_flops + sparse_bytes / profile.bandwidth),
        # rank-1 expert GEMMs run at lower efficiency than the masked path's one wide GEMM (counted as half
        # the rate); x rows gathered, intermediate written and read, outputs scaled and scattered
        "grouped": PathCost("grouped", sparse_flops, dtype_bytes * (2 * n * k * (s.in_padded + s.out_padded)
                                                                    + 2 * n * k * inter + e * core_elems),
                            2 * sparse_flops / profile.gemm_flops
                            + dtype_bytes * (2 * n * k * (s.in_padded + s.out_padded) + 2 * n * k * inter
                                             + e * core_elems) / profile.bandwidth
                            + e * profile.expert_overhead),
    }


def choose_path(sizes: Sizes, k: int, tokens: int | None = None, dtype_bytes: int = 4,
                profile: PathProfile = CPU_PROFILE, static: bool = False) -> str:
    """The path with the lowest estimated time; ties go to ``masked``, then ``sparse``.

    ``tokens=None`` (a symbolic batch) uses NOMINAL_TOKENS and implies ``static``; ``static`` restricts the
    choice to `STATIC_PATHS` (graphs being traced or exported).
    """
    costs = path_costs(sizes, k, NOMINAL_TOKENS if tokens is None else tokens, dtype_bytes, profile)
    allowed = STATIC_PATHS if static or tokens is None else PATHS
    return min(allowed, key=lambda p: (costs[p].seconds, PATHS.index(p)))
