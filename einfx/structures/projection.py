"""Projection of a dense weight onto a two-core einsum structure (SPEC §3).

For fixed block indices (φ, γ) the layer's weight is
    W[φ,ε,δ,γ,β,α] = Σ_ρ B[φ,ε,ρ,γ,β] · A[φ,δ,ρ,γ,α],
so the block rearranged as an (ε·β) × (δ·α) matrix M_φγ = B_φγ (εβ × ρ) · A_φγ (ρ × δα) has rank ≤ d_ρ, and
distinct (φ, γ) blocks share no entry and no parameter. The set of structured weights is therefore the product
over blocks of the rank-≤d_ρ matrices, and the truncated SVD of every rearranged block is the Frobenius-optimal
projection (Eckart–Young per block) for every θ. One batched routine covers all named structures: low-rank is
a single block (plain SVD), BTT and Monarch are per-block SVDs, Kronecker and Tensor-Train are the Van
Loan–Pitsianis rearrangement with rank 1 and r.

The truncated SVD is computed from the eigendecomposition of each block's Gram matrix on its smaller side,
which is much faster than a batched SVD for the many small blocks of a BTT layer; a single large block with
a small rank (Kronecker, Tensor-Train of a big layer) uses block subspace iteration instead. The Frobenius
error is second order in the subspace error, so the result stays optimal to working precision.

When d_in or d_out was padded, the padded columns of the target multiply zero inputs and the padded rows are
truncated away: those entries are free. The projection starts from the zero-filled target and refines it by
hard imputation (fill the free entries with the current approximation, re-project), an alternating
least-squares scheme whose error on the real entries never increases; only the blocks that hold free entries
are re-projected, and the best iterate is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from einfx.errors import ProjectionError, WeightError
from einfx.structures import functional as Fn
from einfx.structures.sizes import Sizes
from einfx.structures.structure import Structure

__all__ = ["Projection", "project", "check_weight", "MAX_IMPUTE", "IMPUTE_RTOL", "FLOAT64_MAX_ENTRIES"]

# Weights up to this many entries are projected in float64; larger ones in float32 (memory and time).
FLOAT64_MAX_ENTRIES = 4 * 1024 * 1024
# At most this many hard-impute rounds; stop earlier once a round lowers the error by less than IMPUTE_RTOL.
MAX_IMPUTE = 25
IMPUTE_RTOL = 1e-3
# Batches of blocks whose smaller side is at most this are eigendecomposed on one thread (see _one_thread).
SMALL_BLOCK = 256
# Blocks whose smaller side exceeds ITERATIVE_SIDE and whose rank is below 1/ITERATIVE_RANK_RATIO of it are
# truncated by subspace iteration (at most MAX_SUBSPACE_ITERATIONS rounds) instead of a full eigensolver.
ITERATIVE_SIDE = 1024
ITERATIVE_RANK_RATIO = 8
MAX_SUBSPACE_ITERATIONS = 100


@dataclass(frozen=True)
class Projection:
    """Result of projecting a dense weight onto a structure.

    Attributes:
        cores: ``{"A": (φ,δ,ρ,γ,α), "B": (φ,ε,ρ,γ,β)}``, or ``{"weight": (d_out, d_in)}`` for a dense
            layer, in the weight's dtype and on its device.
        rel_error: ‖W − Ŵ‖_F / ‖W‖_F on the real (unpadded) (d_out, d_in) weight, where Ŵ is folded from the
            returned cores (so it includes the rounding to a low-precision dtype); 0 for a zero weight.
        method: how the cores were found: ``"copy"``, ``"svd"`` (one block), ``"block-svd"``, optionally
            followed by ``"+impute(k)"`` when k hard-impute rounds refined the padded blocks.
    """

    cores: dict[str, torch.Tensor]
    rel_error: float
    method: str



def check_weight(weight: torch.Tensor, name: str | None = None) -> None:
    """Raise `WeightError` unless ``weight`` is a finite 2-D floating tensor."""
    where = f"layer {name!r}: " if name else ""
    if not isinstance(weight, torch.Tensor):
        raise WeightError(f"{where}weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise WeightError(f"{where}weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise WeightError(f"{where}weight must be floating point, got {weight.dtype}")
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        nan = torch.isnan(weight).sum().item()
        raise WeightError(
            f"{where}weight of shape {tuple(weight.shape)} has {bad} non-finite entries ({nan} NaN, "
            f"{bad - nan} Inf); fix or retrain the weight before converting it"
        )


def project(weight: torch.Tensor, structure, sizes: Sizes, name: str | None = None, *,
            max_impute: int = MAX_IMPUTE) -> Projection:
    """Project a dense weight (d_out, d_in) onto ``structure`` at the resolved ``sizes``.

    Args:
        weight: the dense weight, ``nn.Linear`` convention (d_out, d_in); any floating dtype and device.
        structure: a `Structure` (or anything `Structure.from_dict` accepts); only its kind is consulted,
            the shapes come from ``sizes``.
        sizes: the resolved sizes of the target layer (``structure.resolve(d_in, d_out)``).
        name: the layer's name, used in error messages.
        max_impute: the most hard-impute rounds for padded layers (0 keeps the zero-filled projection).

    Returns:
        A `Projection` with the cores, the relative Frobenius error on the real entries and the method.

    Raises:
        WeightError: the weight is not a finite 2-D floating tensor of shape (d_out, d_in).
        ProjectionError: the structure has no projection here (btt_moe), or the eigensolver failed.

    Example:
        >>> s = Structure.btt(rank=2)
        >>> w = torch.randn(64, 64)
        >>> p = project(w, s, s.resolve(64, 64))
        >>> sorted(p.cores), p.method
        (['A', 'B'], 'block-svd')
    """
    where = f"layer {name!r}: " if name else ""
    check_weight(weight, name)
    structure = Structure.from_dict(structure)
    if tuple(weight.shape) != (sizes.d_out, sizes.d_in):
        raise WeightError(
            f"{where}weight has shape {tuple(weight.shape)}, expected (d_out, d_in) = ({sizes.d_out}, {sizes.d_in}) "
            f"for the sizes [{sizes.describe()}]"
        )
    if structure.kind == "btt_moe":
        raise ProjectionError(
            f"{where}{structure.name} has no dense projection in einfx.structures.projection; project "
            "BTT-MoE layers with einfx.moe, or use init='random'"
        )
    if sizes.dense:
        return Projection({"weight": weight.detach().clone()}, 0.0, "copy")
    work = torch.float64 if weight.numel() <= FLOAT64_MAX_ENTRIES else torch.float32
    try:
        return _project_blocks(weight.detach(), sizes, work, max_impute)
    except RuntimeError as exc:  # torch's _LinAlgError (eigensolver did not converge) derives from it
        if isinstance(exc, ProjectionError):
            raise
        raise ProjectionError(
            f"{where}projecting the {sizes.d_out}x{sizes.d_in} weight onto {structure.name} "
            f"([{sizes.describe()}]) failed in {str(work).removeprefix('torch.')}: {exc}; the weight may be badly "
            "scaled, or use init='random'"
        ) from exc


# -- block layout -------------------------------------------------------------------------------------
def _to_blocks(w: torch.Tensor, s: Sizes) -> torch.Tensor:
    """(out_padded, in_padded) -> (φγ, εβ, δα); rows (φ,ε,δ) and columns (γ,β,α) with the last innermost."""
    w6 = w.reshape(s.phi, s.epsilon, s.delta, s.gamma, s.beta, s.alpha)
    return w6.permute(0, 3, 1, 4, 2, 5).reshape(s.phi * s.gamma, s.epsilon * s.beta, s.delta * s.alpha)


def _cores_from_factors(left: torch.Tensor, right: torch.Tensor, s: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Block factors (φγ, εβ, ρ) and (φγ, ρ, δα) -> cores A (φ,δ,ρ,γ,α) and B (φ,ε,ρ,γ,β)."""
    f, g, d, e, a, b, r = s.phi, s.gamma, s.delta, s.epsilon, s.alpha, s.beta, s.rho
    B = left.reshape(f, g, e, b, r).permute(0, 2, 4, 1, 3)
    A = right.reshape(f, g, r, d, a).permute(0, 3, 2, 1, 4)
    return A, B


@contextmanager
def _one_thread():
    """Run a batch of tiny LAPACK calls on one thread, restoring the thread count afterwards.

    torch's batched eigh solves the blocks one by one and lets the BLAS thread pool join every tiny call; the
    synchronisation costs far more than the arithmetic, by more than an order of magnitude on a busy machine
    (a GPT-2 lm_head-sized BTT has over 5000 blocks of 32 columns).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- truncated SVD of a batch of blocks ------------------------------------------------------------------
def _truncate(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (left (n, p, rank), right (n, rank, q)) of every block, √S on each side.

    Works on the smaller side: with ``wide`` the block or its transpose so that it has s = min(p, q) rows, the
    top-k left singular vectors U_k of ``wide`` give the projection U_k U_kᵀ·wide, whose score rows U_kᵀ·wide
    have norms S_k. Components beyond min(p, q) are zero.
    """
    n, p, q = m.shape
    k = min(rank, p, q)
    tall = p > q
    wide = m.mT if tall else m  # (n, s, L) with s <= L
    basis = _top_left_vectors(wide, k)  # (n, s, k)
    scores = basis.mT @ wide  # (n, k, L) = S_k V_kᵀ
    sv = torch.linalg.vector_norm(scores, dim=2)  # (n, k)
    # Components with a (numerically) zero singular value: keep the unit vector on the basis side and the
    # tiny scores on the other, so the product is unchanged and the cores stay finite.
    tiny = torch.finfo(m.dtype).tiny ** 0.5
    root = torch.where(sv > tiny, sv, torch.ones_like(sv)).sqrt()
    basis_part, score_part = basis * root[:, None, :], scores / root[:, :, None]
    if tall:  # m = wideᵀ = score_partᵀ · basis_partᵀ
        left, right = score_part.mT, basis_part.mT
    else:
        left, right = basis_part, score_part
    if k < rank:
        left = torch.cat([left, left.new_zeros(n, p, rank - k)], dim=2)
        right = torch.cat([right, right.new_zeros(n, rank - k, q)], dim=1)
    return left, right


def _top_left_vectors(wide: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal top-k left singular vectors (n, s, k) of a batch of (n, s, L) matrices, s <= L.

    Small or high-rank problems: eigendecomposition of the (s x s) Gram matrix. Large blocks with a small
    rank (a Kronecker or Tensor-Train projection of a big layer is one block of thousands of rows): block
    subspace iteration with Rayleigh–Ritz, which needs only products with the block and stops once the
    captured energy Σ S_k² (the quantity that decides the Frobenius error) stops growing.
    """
    n, s, _ = wide.shape
    if s <= ITERATIVE_SIDE or k * ITERATIVE_RANK_RATIO > s:
        gram = wide @ wide.mT
        if n > 1 and s <= SMALL_BLOCK:
            with _one_thread():
                _, vecs = torch.linalg.eigh(gram)
        else:
            _, vecs = torch.linalg.eigh(gram)
        return vecs[..., -k:].flip(-1)  # eigh sorts ascending; keep the top k, largest first
    width = min(s, 2 * k + 10)  # oversampling speeds up convergence of the top k
    gen = torch.Generator(device=wide.device).manual_seed(0)
    probe = torch.randn(wide.shape[0], wide.shape[2], width, generator=gen, device=wide.device, dtype=wide.dtype)
    q, _ = torch.linalg.qr(wide @ probe)
    # Stop when a round adds less than tol·‖M‖² to the captured energy: the squared error moves by as much.
    tol = (1e-10 if wide.dtype == torch.float64 else 1e-7) * wide.square().sum().item()
    energy = None
    for _ in range(MAX_SUBSPACE_ITERATIONS):
        coeff_t = wide.mT @ q  # (n, L, width): Qᵀ·wide, transposed
        values, vecs = torch.linalg.eigh(coeff_t.mT @ coeff_t)
        top = values[..., -k:].sum().item()
        if energy is not None and top - energy <= tol:
            break
        energy = top
        q, _ = torch.linalg.qr(wide @ coeff_t)
    return q @ vecs[..., -k:].flip(-1)


def _project_blocks(weight: torch.Tensor, s: Sizes, work: torch.dtype, max_impute: int) -> Projection:
    w = weight.to(work)
    target = torch.zeros(s.out_padded, s.in_padded, dtype=work, device=w.device)
    target[: s.d_out, : s.d_in] = w
    blocks = _to_blocks(target, s)
    left, right = _truncate(blocks, s.rho)
    method = "svd" if blocks.shape[0] == 1 else "block-svd"

    padded = (s.out_padded, s.in_padded) != (s.d_out, s.d_in)
    if padded and max_impute > 0:
        free = torch.ones(s.out_padded, s.in_padded, dtype=torch.bool, device=w.device)
        free[: s.d_out, : s.d_in] = False
        free_blocks = _to_blocks(free, s)
        is_touched = free_blocks.flatten(1).any(dim=1) & ~_free_lines_only(free_blocks)
        if is_touched.any():
            touched, kept = is_touched.nonzero().squeeze(1), ~is_touched
            rest = torch.linalg.vector_norm(blocks[kept] - left[kept] @ right[kept]).item()
            left_t, right_t, rounds = _impute(blocks[touched], free_blocks[touched], left[touched],
                                              right[touched], s.rho, max_impute, rest)
            left[touched], right[touched] = left_t, right_t
            if rounds:
                method += f"+impute({rounds})"

    A, B = _cores_from_factors(left, right, s)
    A = A.to(weight.dtype).contiguous()
    B = B.to(weight.dtype).contiguous()
    # The error of the cores as returned (after any rounding to the weight's dtype), on the real entries.
    approx = Fn.fold(A.to(work), B.to(work), s)
    norm = torch.linalg.matrix_norm(w).item()
    err = torch.linalg.matrix_norm(w - approx).item()
    return Projection({"A": A, "B": B}, err / norm if norm > 0 else 0.0, method)


def _free_lines_only(free: torch.Tensor) -> torch.Tensor:
    """Per block: are all free entries in entirely free rows or columns of the block?

    Then zero-filling is already optimal (the truncated SVD of a matrix with zero rows or columns is that of
    the rest, padded with zeros), and imputation would leave it unchanged. This holds for BTT and Monarch
    (β = δ = 1), whose padded rows and columns are whole block rows and columns.
    """
    covered = free.all(dim=2, keepdim=True) | free.all(dim=1, keepdim=True)
    return ~(free & ~covered).flatten(1).any(dim=1)


def _impute(blocks, free, left, right, rank, max_rounds, rest):
    """Hard impute on the blocks holding free entries; returns the best factors and the rounds accepted.

    ``rest`` is the (fixed) error of the other blocks; a round must lower the layer's total error on the real
    entries by more than ``IMPUTE_RTOL`` (relative) for another round to run.
    """
    real = ~free

    def real_error(lf, rf):
        touched = torch.linalg.vector_norm(torch.where(real, blocks - lf @ rf, 0.0)).item()
        return (touched * touched + rest * rest) ** 0.5

    best = (left, right)
    best_err = real_error(left, right)
    rounds = 0
    current = best
    for i in range(1, max_rounds + 1):
        filled = torch.where(free, current[0] @ current[1], blocks)
        current = _truncate(filled, rank)
        err = real_error(*current)
        if err < best_err:
            improvement = best_err - err
            best, rounds = current, i
            drop_enough = improvement > IMPUTE_RTOL * best_err
            best_err = err
            if not drop_enough:
                break
        else:
            break  # the scheme is monotone; a rise means rounding noise, and nothing more is to be gained
    return best[0], best[1], rounds
