"""Data-aware projection: planted structure recovered, never worse than weight-only on the data, equal to it
on white inputs."""

import random

import pytest
import torch

from einfx import Structure
from einfx.errors import WeightError
from einfx.structures import functional as Fn
from einfx.structures.calibrated import calibration_error, project_on_data
from einfx.structures.projection import project

NAMED = [Structure.low_rank(rank=6), Structure.kronecker(), Structure.tensor_train(rank=2), Structure.btt(rank=1),
         Structure.btt(rank=3), Structure.monarch()]


def _correlated(d_in: int, seed: int, n: int = 3000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix
    return x.T @ x / n


def _weight_only(w, cov, structure, sizes):
    p = project(w, structure, sizes)
    return calibration_error(w, Fn.fold(p.cores["A"], p.cores["B"], sizes), cov)


def _random_thetas(count: int):
    r = random.Random(7)
    out = []
    while len(out) < count:
        a, b, c = (r.choice([0.0, 0.25, 0.5]) for _ in range(3))
        d, e, f = (r.choice([0.0, 0.25, 0.5]) for _ in range(3))
        if abs(a + b + c - 1) > 1e-9 or abs(d + e + f - 1) > 1e-9:
            continue
        try:
            s = Structure.from_theta((a, b, c, d, e, f, r.choice([0.0, 0.25])))
            s.resolve(64, 48)
        except Exception:  # invalid or degenerate θ: draw again
            continue
        out.append(s)
    return out


@pytest.mark.parametrize("structure", NAMED, ids=lambda s: s.name)
def test_planted_structure_is_recovered_exactly(structure):
    torch.manual_seed(0)
    sizes = structure.resolve(64, 48)
    A, B = torch.randn(sizes.a_shape, dtype=torch.float64), torch.randn(sizes.b_shape, dtype=torch.float64)
    w = Fn.fold(A, B, sizes)
    p = project_on_data(w, _correlated(64, 1), structure, sizes)
    assert p.rel_error < 1e-6
    assert float((Fn.fold(p.cores["A"], p.cores["B"], sizes) - w).norm() / w.norm()) < 1e-5


@pytest.mark.parametrize("structure", NAMED + _random_thetas(6), ids=lambda s: s.name)
def test_never_worse_than_weight_only_on_correlated_inputs(structure):
    torch.manual_seed(1)
    w = torch.randn(48, 64, dtype=torch.float64)
    cov = _correlated(64, 2)
    sizes = structure.resolve(64, 48)
    p = project_on_data(w, cov, structure, sizes)
    fitted = Fn.fold(p.cores["A"], p.cores["B"], sizes)
    assert p.rel_error == pytest.approx(calibration_error(w, fitted, cov), rel=1e-9)
    assert p.rel_error <= _weight_only(w, cov, structure, sizes) + 1e-12


@pytest.mark.parametrize("structure", [Structure.low_rank(rank=6), Structure.btt(rank=2), Structure.monarch()],
                         ids=lambda s: s.name)
def test_clearly_better_where_a_closed_form_exists(structure):
    torch.manual_seed(2)
    w = torch.randn(48, 64, dtype=torch.float64)
    cov = _correlated(64, 3)
    sizes = structure.resolve(64, 48)
    assert project_on_data(w, cov, structure, sizes).rel_error < 0.9 * _weight_only(w, cov, structure, sizes)


@pytest.mark.parametrize("structure", NAMED, ids=lambda s: s.name)
def test_white_inputs_give_the_weight_only_projection(structure):
    torch.manual_seed(3)
    w = torch.randn(48, 64, dtype=torch.float64)
    sizes = structure.resolve(64, 48)
    eye = torch.eye(64, dtype=torch.float64) * 2.5
    p = project_on_data(w, eye, structure, sizes)
    plain = project(w, structure, sizes)
    assert p.rel_error == pytest.approx(plain.rel_error, rel=1e-6, abs=1e-9)


def test_padded_sizes_and_bad_covariances():
    w = torch.randn(50, 97, dtype=torch.float64)  # 97 is prime: padded input
    s = Structure.btt(rank=2)
    sizes = s.resolve(97, 50)
    cov = _correlated(97, 4)
    assert project_on_data(w, cov, s, sizes).rel_error <= _weight_only(w, cov, s, sizes) + 1e-12
    with pytest.raises(WeightError, match=r"layer 'fc': input covariance has shape \(96, 96\), expected \(97, 97\)"):
        project_on_data(w, cov[:96, :96], s, sizes, name="fc")
    bad = cov.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(WeightError, match="non-finite entries"):
        project_on_data(w, bad, s, sizes, name="fc")


def _metric(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    return m @ m.T / d


def test_output_metric_low_rank_is_the_two_sided_optimum():
    from einfx.structures.calibrated import low_rank_on_data

    torch.manual_seed(3)
    w = torch.randn(40, 64, dtype=torch.float64)
    cov, g = _correlated(64, 2), _metric(40, 4)
    left, right = low_rank_on_data(w, cov, 5, g)
    got = calibration_error(w, left @ right, cov, g)
    # the optimum's error is the tail of the singular values of Rᵀ W L, exactly (Eckart–Young after whitening)
    R, L = torch.linalg.cholesky(g), torch.linalg.cholesky(cov)
    s2 = torch.linalg.svdvals(R.T @ w @ L).square()
    assert got == pytest.approx(float((s2[5:].sum() / s2.sum()).sqrt()), rel=1e-6)
    # strictly better under G than the input-only whitened truncation, and no nearby factors do better
    plain_left, plain_right = low_rank_on_data(w, cov, 5)
    assert got < 0.95 * calibration_error(w, plain_left @ plain_right, cov, g)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        du = 1e-3 * torch.randn(left.shape, generator=gen, dtype=torch.float64)
        dv = 1e-3 * torch.randn(right.shape, generator=gen, dtype=torch.float64)
        assert calibration_error(w, (left + du) @ (right + dv), cov, g) >= got - 1e-12
    # G = I gives the input-only solution; a diagonal G as a vector equals the same G as a matrix
    i_left, i_right = low_rank_on_data(w, cov, 5, torch.eye(40, dtype=torch.float64))
    assert torch.allclose(i_left @ i_right, plain_left @ plain_right, atol=1e-8)
    diag = torch.diagonal(g).clone()
    v_left, v_right = low_rank_on_data(w, cov, 5, diag)
    m_left, m_right = low_rank_on_data(w, cov, 5, torch.diag(diag))
    assert torch.allclose(v_left @ v_right, m_left @ m_right, atol=1e-8)


@pytest.mark.parametrize("structure", [Structure.low_rank(rank=6), Structure.btt(rank=2), Structure.monarch()],
                         ids=lambda s: s.name)
def test_project_on_data_reports_its_error_under_the_output_metric(structure):
    torch.manual_seed(5)
    sizes = structure.resolve(64, 48)
    w, cov, g = torch.randn(48, 64, dtype=torch.float64), _correlated(64, 6), _metric(48, 7)
    p = project_on_data(w, cov, structure, sizes, out_metric=g)
    fitted = Fn.fold(p.cores["A"], p.cores["B"], sizes)
    assert p.rel_error == pytest.approx(calibration_error(w, fitted, cov, g), rel=1e-9)
    plain = project(w, structure, sizes)
    assert p.rel_error <= calibration_error(w, Fn.fold(plain.cores["A"], plain.cores["B"], sizes), cov, g) + 1e-12
    if structure.kind == "low_rank":
        assert p.method == "output-whitened"
        q = project_on_data(w, cov, structure, sizes)  # fitted on C alone, measured under G: worse
        assert p.rel_error < 0.95 * calibration_error(w, Fn.fold(q.cores["A"], q.cores["B"], sizes), cov, g)


def test_output_metric_of_the_wrong_shape_is_refused():
    s = Structure.low_rank(rank=4)
    sizes = s.resolve(64, 48)
    w, cov = torch.randn(48, 64, dtype=torch.float64), _correlated(64, 1)
    with pytest.raises(WeightError, match=r"layer 'fc': output metric has shape \(64, 64\), expected \(48, 48\) or "
                                          r"its diagonal \(48,\)"):
        project_on_data(w, cov, s, sizes, name="fc", out_metric=torch.eye(64, dtype=torch.float64))
    bad = torch.eye(48, dtype=torch.float64)
    bad[0, 0] = float("nan")
    with pytest.raises(WeightError, match="layer 'fc': output metric has non-finite entries"):
        project_on_data(w, cov, s, sizes, name="fc", out_metric=bad)


@pytest.mark.parametrize("structure", [Structure.btt(rank=2), Structure.monarch(), Structure.tensor_train(rank=2)],
                         ids=lambda s: s.name)
def test_block_families_refine_under_a_diagonal_output_metric(structure):
    torch.manual_seed(8)
    sizes = structure.resolve(64, 48)
    w, cov = torch.randn(48, 64, dtype=torch.float64), _correlated(64, 9)
    weights = torch.logspace(-2, 1, 48, dtype=torch.float64)[torch.randperm(48)]  # rows that matter 1000x more
    p = project_on_data(w, cov, structure, sizes, out_metric=weights)
    q = project_on_data(w, cov, structure, sizes)  # refined on C alone
    ours = calibration_error(w, Fn.fold(p.cores["A"], p.cores["B"], sizes), cov, weights)
    theirs = calibration_error(w, Fn.fold(q.cores["A"], q.cores["B"], sizes), cov, weights)
    assert p.rel_error == pytest.approx(ours, rel=1e-9)
    assert ours < 0.9 * theirs
    assert "output-weighted" in p.method, p.method
    # equal weights are the unweighted refinement
    same = project_on_data(w, cov, structure, sizes, out_metric=torch.ones(48, dtype=torch.float64))
    assert same.rel_error == pytest.approx(q.rel_error, rel=1e-6)
