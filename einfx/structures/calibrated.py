"""Data-aware projection (SPEC §6): fit the cores to what the layer does to its real inputs.

With C = XᵀX / n the covariance of the layer's inputs, the objective is

    ‖(W − Ŵ) Xᵀ‖² / n = tr((W − Ŵ) C (W − Ŵ)ᵀ),

not ‖W − Ŵ‖. Indices as in `einfx.structures.functional`: W[(φ,ε,δ), (γ,β,α)], and the structured
Ŵ = Σ_ρ B[φ,ε,ρ,γ,β] · A[φ,δ,ρ,γ,α].

1. Start. When β is trivial (low-rank, BTT, Monarch) each (φ, γ) block M (ε × δα) only sees the inputs of
   block γ; under the block-diagonal approximation C ≈ diag(C_γγ) the optimum is the whitened truncation
   M̂ = [M (I_δ ⊗ L_γ)]_ρ (I_δ ⊗ L_γ)⁻¹ with C_γγ = L_γ L_γᵀ (Cholesky, small ridge): SVD-LLM's closed form,
   exact for low-rank (one block). Otherwise the start is the weight-only projection.
2. Refinement on the full C: block coordinate descent over γ, alternating A and B. With everything else
   fixed, the cores of one block γ are a linear least-squares problem whose normal matrix is shared by the
   rows: (ρα)² for A, (ρβ)² for B. Each update is its exact minimizer, so the objective never increases.
3. The result is compared with the weight-only projection on the same objective and the better one is
   returned, so it is never worse than the weight-only projection on the calibration data.

For white inputs (C ∝ I) steps 1 and 3 give the weight-only projection.

Output metric. A layer's output errors do not all matter equally to the model: with G (d_out × d_out) the
expected JᵀJ of the model's output with respect to the layer's output (K-FAC's output factor, see
`einfx.rewriter.sensitivity`), the error the model sees is tr(G (W − Ŵ) C (W − Ŵ)ᵀ). For a single low-rank
block the optimum is again closed form: with G = R Rᵀ, Ŵ = R⁻ᵀ [Rᵀ W L]_r L⁻¹. The block families start from
the whitened truncation on C and are refined under the diagonal of G (their block updates stay exact least
squares when the output rows are only weighted; a full G would couple them); their error is reported under the
full G, so that every option of a layer is compared on the same objective.
"""

from __future__ import annotations

import torch

from einfx.errors import ProjectionError, WeightError
from einfx.structures.projection import Projection, project
from einfx.structures.sizes import Sizes

__all__ = ["project_on_data", "calibration_error", "low_rank_on_data", "metric_root", "RIDGE", "MAX_SWEEPS"]

# Relative ridge added to the covariance (times its mean diagonal) so that Cholesky and the normal equations
# stay well posed for rank-deficient inputs (and padded input features, whose covariance is zero).
RIDGE = 1e-6
# At most this many A/B sweeps; stop once a sweep lowers the objective by less than SWEEP_RTOL.
MAX_SWEEPS = 6
SWEEP_RTOL = 1e-4


def calibration_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor,
                      out_metric: torch.Tensor | None = None) -> float:
    """Relative data-aware error sqrt(tr(G ΔW C ΔWᵀ) / tr(G W C Wᵀ)) (G = I without ``out_metric``; 0 for a
    weight the data does not see)."""
    w, d, c = weight.double(), (weight - approx).double(), cov.double()
    g = None if out_metric is None else out_metric.double()

    def form(m):
        mc = m @ c
        if g is not None:
            mc = g[:, None] * mc if g.dim() == 1 else g @ mc
        return float((mc * m).sum())

    num, den = form(d), form(w)
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def metric_root(out_metric: torch.Tensor) -> torch.Tensor:
    """R with G + εI = R Rᵀ (lower Cholesky, a relative ridge for outputs the model ignores), float64; a
    diagonal G (a vector) gives the diagonal matrix of its square roots."""
    g = out_metric.double()
    if g.dim() == 1:
        return torch.diag((g + RIDGE * (float(g.mean()) or 1.0)).sqrt())
    scale = float(torch.diagonal(g).mean()) or 1.0
    return torch.linalg.cholesky(g + RIDGE * scale * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))


def low_rank_on_data(weight: torch.Tensor, cov: torch.Tensor, rank: int, out_metric: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal rank-``rank`` (U, V), Ŵ = U V, of min tr(G (W − Ŵ) C (W − Ŵ)ᵀ): Ŵ = R⁻ᵀ [Rᵀ W L]_r L⁻¹
    with C = L Lᵀ and G = R Rᵀ (G = I without ``out_metric``; a vector is a diagonal G). float64; the singular values are split evenly
    between U (d_out × r) and V (r × d_in)."""
    w = weight.double()
    L = torch.linalg.cholesky(cov.double())
    R = metric_root(out_metric) if out_metric is not None else None
    white = w @ L if R is None else R.T @ w @ L
    u, sv, vh = torch.linalg.svd(white, full_matrices=False)
    k = min(rank, sv.shape[0])
    root = sv[:k].sqrt()
    left = u[:, :k] * root
    if R is not None:
        left = torch.linalg.solve_triangular(R.T, left, upper=True)
    right = torch.linalg.solve_triangular(L, root[:, None] * vh[:k], upper=False, left=False)
    if k < rank:  # a rank above the smaller side: the extra components are zero
        left = torch.nn.functional.pad(left, (0, rank - k))
        right = torch.nn.functional.pad(right, (0, 0, 0, rank - k))
    return left, right


def _padded(weight: torch.Tensor, cov: torch.Tensor, s: Sizes):
    p_out, p_in = s.phi * s.epsilon * s.delta, s.gamma * s.beta * s.alpha
    w = torch.zeros(p_out, p_in, dtype=torch.float64, device=weight.device)
    w[: s.d_out, : s.d_in] = weight.double()
    c = torch.zeros(p_in, p_in, dtype=torch.float64, device=weight.device)
    c[: s.d_in, : s.d_in] = cov.double()
    scale = float(torch.diagonal(c).mean()) or 1.0
    c.diagonal().add_(RIDGE * scale)
    return w, c


def _fold(A: torch.Tensor, B: torch.Tensor, s: Sizes) -> torch.Tensor:
    w = torch.einsum("fergb,fdrga->fedgba", B, A)
    return w.reshape(s.phi * s.epsilon * s.delta, s.gamma * s.beta * s.alpha)


def _whitened_start(w: torch.Tensor, c: torch.Tensor, s: Sizes):
    """SVD-LLM's closed form per (φ, γ) block (β = 1): (A, B) in float64."""
    f, e, d, g, a, r = s.phi, s.epsilon, s.delta, s.gamma, s.alpha, s.rho
    blocks = torch.stack([c[i * a:(i + 1) * a, i * a:(i + 1) * a] for i in range(g)])  # (g, a, a)
    L = torch.linalg.cholesky(blocks)
    m = w.reshape(f, e, d, g, a).permute(0, 3, 1, 2, 4)  # (f, g, e, d, a)
    white = torch.einsum("fgeda,gax->fgedx", m, L).reshape(f * g, e, d * a)
    u, sv, vh = torch.linalg.svd(white, full_matrices=False)
    k = min(r, sv.shape[-1])  # a rank above the block's smaller side: the extra components are zero
    u = torch.nn.functional.pad(u[:, :, :k], (0, r - k))
    vh = torch.nn.functional.pad(vh[:, :k, :], (0, 0, 0, r - k))
    root = torch.nn.functional.pad(sv[:, :k], (0, r - k)).sqrt()
    b = (u * root[:, None, :]).reshape(f, g, e, r)                               # (f, g, e, r)
    y = (root[:, :, None] * vh).reshape(f, g, r * d, a)                          # rows (r, d), whitened α
    x = torch.linalg.solve_triangular(L, y, upper=False, left=False)             # y · L⁻¹
    A = x.reshape(f, g, r, d, a).permute(0, 3, 2, 1, 4).contiguous()            # (f, d, r, g, a)
    B = b.permute(0, 2, 3, 1).unsqueeze(-1).contiguous()                        # (f, e, r, g, 1)
    return A, B


def _solve(n: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve n x = rhs for a batch of symmetric PSD normal matrices (Cholesky, with a relative ridge that grows
    until every matrix factors)."""
    eye = torch.eye(n.shape[-1], dtype=n.dtype, device=n.device)
    scale = torch.diagonal(n, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[..., None, None]
    for ridge in (1e-10, 1e-7, 1e-4):
        # fresh row-major copies: MKL's batched LU rejected strided inputs here, Cholesky is the right solver
        factor, info = torch.linalg.cholesky_ex(_dense_copy(n + ridge * scale * eye))
        if not bool(info.any()):
            return torch.cholesky_solve(_dense_copy(rhs), factor)
    raise RuntimeError("the normal equations are not positive definite even with a ridge of 1e-4")


def _dense_copy(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape).copy_(t)


def _refine(w: torch.Tensor, c: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: Sizes, sweeps: int,
            rows: torch.Tensor | None = None):
    """Block coordinate descent over γ on the full covariance, alternating A and B (exact block updates).

    ``rows`` (φ, ε, δ): weights of the output rows (a diagonal output metric), or None for equal weights.
    With weights, a row of A (one δ) and a row of B (one ε) each get their own normal matrix.
    """
    f, e, d, g, b, a, r = s.phi, s.epsilon, s.delta, s.gamma, s.beta, s.alpha, s.rho
    c6 = c.reshape(g, b, a, g, b, a)
    resid = (w - _fold(A, B, s)) @ c  # E = (W − Ŵ) C, kept up to date
    E = resid.reshape(f, e, d, g, b, a)
    flat = None if rows is None else rows.reshape(-1, 1)

    def objective():
        delta = w - _fold(A, B, s)
        form = (delta @ c) * delta
        return float((form if flat is None else flat * form).sum())

    best = objective()
    for _ in range(sweeps):
        for which in ("A", "B"):
            for k in range(g):
                cg = c6[k, :, :, k]                                  # (b, a, b, a)
                Ag, Bg = A[:, :, :, k], B[:, :, :, k]                # (f, d, r, a), (f, e, r, b)
                old = torch.einsum("ferb,fdra->fedba", Bg, Ag)
                rc = E[:, :, :, k] + torch.einsum("fedba,bacx->fedcx", old, cg)
                if which == "A" and rows is None:
                    n = torch.einsum("ferb,bacx,feqc->fraqx", Bg, cg, Bg).reshape(f, r * a, r * a)
                    rhs = torch.einsum("ferb,fedba->frad", Bg, rc).reshape(f, r * a, d)
                    new_a = _solve(n, rhs).reshape(f, r, a, d).permute(0, 3, 1, 2)
                elif which == "A":
                    n = torch.einsum("ferb,fed,bacx,feqc->fdraqx", Bg, rows, cg, Bg).reshape(f, d, r * a, r * a)
                    rhs = torch.einsum("ferb,fed,fedba->fdra", Bg, rows, rc).reshape(f, d, r * a, 1)
                    new_a = _solve(n, rhs).reshape(f, d, r, a)
                elif rows is None:
                    n = torch.einsum("fdra,bacx,fdqx->frbqc", Ag, cg, Ag).reshape(f, r * b, r * b)
                    rhs = torch.einsum("fdra,fedba->frbe", Ag, rc).reshape(f, r * b, e)
                    new_b = _solve(n, rhs).reshape(f, r, b, e).permute(0, 3, 1, 2)
                else:
                    n = torch.einsum("fdra,fed,bacx,fdqx->ferbqc", Ag, rows, cg, Ag).reshape(f, e, r * b, r * b)
                    rhs = torch.einsum("fdra,fed,fedba->ferb", Ag, rows, rc).reshape(f, e, r * b, 1)
                    new_b = _solve(n, rhs).reshape(f, e, r, b)
                if which == "A":
                    A[:, :, :, k] = new_a
                    new = torch.einsum("ferb,fdra->fedba", Bg, new_a)
                else:
                    B[:, :, :, k] = new_b
                    new = torch.einsum("ferb,fdra->fedba", new_b, Ag)
                E -= torch.einsum("fedba,bagcx->fedgcx", new - old, c6[k])
        value = objective()
        done = best - value <= SWEEP_RTOL * max(best, 1e-300)
        best = min(best, value)
        if done:
            break
    return A, B


def _row_weights(out_metric: torch.Tensor, s: Sizes, device) -> torch.Tensor:
    """The diagonal of G over the padded output rows, as (φ, ε, δ) weights of mean 1 (padding: a small weight)."""
    diag = (out_metric if out_metric.dim() == 1 else torch.diagonal(out_metric)).double().to(device)
    scale = float(diag.mean()) or 1.0
    rows = torch.full((s.phi * s.epsilon * s.delta,), RIDGE, dtype=torch.float64, device=device)
    rows[: s.d_out] = diag / scale + RIDGE
    return rows.reshape(s.phi, s.epsilon, s.delta)


def project_on_data(weight: torch.Tensor, cov: torch.Tensor, structure, sizes: Sizes, name: str | None = None, *,
                    sweeps: int = MAX_SWEEPS, out_metric: torch.Tensor | None = None) -> Projection:
    """Project ``weight`` (d_out, d_in) onto ``structure`` minimizing tr(G (W − Ŵ) C (W − Ŵ)ᵀ).

    Args:
        weight: the dense weight, ``nn.Linear`` convention.
        cov: the (d_in, d_in) second moment of the layer's inputs, XᵀX / n (any positive scale).
        structure, sizes: as for `einfx.structures.projection.project`.
        name: the layer's name, for error messages.
        sweeps: at most this many A/B refinement sweeps on the full covariance (0: the closed-form start).
        out_metric: G, the (d_out, d_out) output metric or its diagonal (``None``: the identity). A single
            low-rank block is fitted under it exactly; the other structures are refined under its diagonal
            and measured under G.

    Returns:
        A `Projection` whose ``rel_error`` is the relative data-aware error (`calibration_error`, under G) and
        whose ``method`` says which start won ("whitened", "output-whitened", "weight-only") and how many sweeps
        refined it.
    """
    where = f"layer {name!r}: " if name else ""
    if tuple(cov.shape) != (sizes.d_in, sizes.d_in):
        raise WeightError(f"{where}input covariance has shape {tuple(cov.shape)}, expected ({sizes.d_in}, "
                          f"{sizes.d_in})")
    if not torch.isfinite(cov).all():
        raise WeightError(f"{where}input covariance has non-finite entries: the calibration data produced NaN or "
                          "Inf activations")
    if out_metric is not None and tuple(out_metric.shape) not in ((sizes.d_out, sizes.d_out), (sizes.d_out,)):
        raise WeightError(f"{where}output metric has shape {tuple(out_metric.shape)}, expected ({sizes.d_out}, "
                          f"{sizes.d_out}) or its diagonal ({sizes.d_out},)")
    if out_metric is not None and not torch.isfinite(out_metric).all():
        raise WeightError(f"{where}output metric has non-finite entries: the model's output gradients are NaN or "
                          "Inf on the calibration data")
    plain = project(weight, structure, sizes, name=name)
    if sizes.dense:
        return plain
    w, c = _padded(weight, cov, sizes)
    plain_w = _fold(plain.cores["A"].double(), plain.cores["B"].double(), sizes)
    try:
        closed_form = sizes.gamma == 1 and sizes.beta == 1 and sizes.phi == 1 and sizes.delta == 1
        if closed_form and out_metric is not None:
            g = torch.zeros((w.shape[0],) * out_metric.dim(), dtype=torch.float64, device=w.device)
            g[(slice(0, sizes.d_out),) * out_metric.dim()] = out_metric.double()
            left, right = low_rank_on_data(w, c, sizes.rho, g)
            A = right.reshape(sizes.a_shape).contiguous()
            B = left.reshape(sizes.b_shape).contiguous()
            start = "output-whitened"
        elif sizes.beta == 1:
            A, B = _whitened_start(w, c, sizes)
            start = "whitened"
        else:
            A, B = plain.cores["A"].double().clone(), plain.cores["B"].double().clone()
            start = "weight-only"
        if sweeps and not closed_form:  # a single low-rank block: the whitened truncation is already optimal
            rows = _row_weights(out_metric, sizes, w.device) if out_metric is not None else None
            A, B = _refine(w, c, A, B, sizes, sweeps, rows)
            start += f"+bcd({sweeps}{', output-weighted' if rows is not None else ''})"
    except RuntimeError as exc:  # Cholesky / solve failures surface as torch linalg errors
        raise ProjectionError(f"{where}data-aware projection onto {sizes.describe()} failed: {exc}") from exc
    real = slice(0, sizes.d_out), slice(0, sizes.d_in)
    fitted = _fold(A, B, sizes)[real]
    ours, theirs = (calibration_error(weight, x.to(weight.dtype), cov, out_metric) for x in (fitted, plain_w[real]))
    if theirs <= ours:
        return Projection(plain.cores, theirs, "weight-only (no better on the data)")
    cores = {"A": A.to(weight.dtype), "B": B.to(weight.dtype)}
    return Projection(cores, calibration_error(weight, _fold(cores["A"].double(), cores["B"].double(),
                                                              sizes)[real].to(weight.dtype), cov, out_metric), start)
