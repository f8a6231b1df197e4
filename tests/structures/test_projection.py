"""Projection of dense weights onto structures (SPEC §3): exactness, optimality, padding, dtypes, errors."""

import math

import numpy as np
import pytest
import torch

from einfx import EinsumLinear, Structure
from einfx.errors import ProjectionError, WeightError
from einfx.structures import functional as Fn
from einfx.structures import projection as P
from einfx.structures.projection import Projection, project

NAMED = [
    Structure.low_rank(rank=5), Structure.kronecker(), Structure.tensor_train(rank=3), Structure.btt(rank=1),
    Structure.btt(rank=3), Structure.monarch(),
]
THETAS = [
    Structure.from_theta((0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25)),
    Structure.from_theta((0.4, 0.3, 0.3, 0.3, 0.4, 0.3, 0.2)),
    Structure.from_theta((0.6, 0.2, 0.2, 0.1, 0.6, 0.3, 0.3)),
    Structure.from_theta((0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.3)),
]
UNPADDED = [(64, 64), (256, 256), (64, 256), (256, 64), (96, 144)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _planted(structure, d_in, d_out, seed=0, dtype=torch.float64):
    """A weight that has the structure exactly, from random cores; returns (W, sizes)."""
    sizes = structure.resolve(d_in, d_out)
    g = _gen(seed)
    if sizes.dense:
        return torch.randn(d_out, d_in, generator=g, dtype=torch.float64).to(dtype), sizes
    A = torch.randn(sizes.a_shape, generator=g, dtype=torch.float64)
    B = torch.randn(sizes.b_shape, generator=g, dtype=torch.float64)
    return Fn.fold(A, B, sizes).to(dtype), sizes


def _fold(result: Projection, sizes) -> torch.Tensor:
    if sizes.dense:
        return result.cores["weight"].double()
    return Fn.fold(result.cores["A"].double(), result.cores["B"].double(), sizes)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _np_blocks(w: np.ndarray, s) -> list[np.ndarray]:
    """Independent rearrangement: one (ε·β) x (δ·α) matrix per (φ, γ), by explicit index selection."""
    w6 = w.reshape(s.phi, s.epsilon, s.delta, s.gamma, s.beta, s.alpha)
    out = []
    for f in range(s.phi):
        for g in range(s.gamma):
            block = w6[f, :, :, g, :, :]  # (ε, δ, β, α)
            out.append(block.transpose(0, 2, 1, 3).reshape(s.epsilon * s.beta, s.delta * s.alpha))
    return out


def _np_zero_fill_error(w: torch.Tensor, s) -> float:
    """Relative error on the real entries of the per-block truncated SVD of the zero-padded weight."""
    target = np.zeros((s.out_padded, s.in_padded))
    target[: s.d_out, : s.d_in] = w.double().numpy()
    real = np.zeros_like(target, dtype=bool)
    real[: s.d_out, : s.d_in] = True
    approx_blocks = []
    for m in _np_blocks(target, s):
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        approx_blocks.append((u[:, : s.rho] * sv[: s.rho]) @ vt[: s.rho])
    # undo the rearrangement
    approx6 = np.zeros((s.phi, s.epsilon, s.delta, s.gamma, s.beta, s.alpha))
    i = 0
    for f in range(s.phi):
        for g in range(s.gamma):
            block = approx_blocks[i].reshape(s.epsilon, s.beta, s.delta, s.alpha)
            approx6[f, :, :, g, :, :] = block.transpose(0, 2, 1, 3)
            i += 1
    approx = approx6.reshape(s.out_padded, s.in_padded)
    return float(np.linalg.norm((approx - target)[real]) / np.linalg.norm(target[real]))


# -- exact recovery ----------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", NAMED + THETAS, ids=lambda s: s.name)
@pytest.mark.parametrize("d_in, d_out", UNPADDED)
def test_planted_structure_is_recovered(structure, d_in, d_out):
    w, sizes = _planted(structure, d_in, d_out, seed=d_in + 7 * d_out)
    assert (sizes.in_padded, sizes.out_padded) == (d_in, d_out)  # these cases are meant to be unpadded
    result = project(w, structure, sizes, name="blk")
    assert result.rel_error < 1e-5
    assert _rel(_fold(result, sizes), w) < 1e-5
    assert result.method == ("svd" if sizes.phi * sizes.gamma == 1 else "block-svd")
    assert result.cores["A"].shape == sizes.a_shape and result.cores["B"].shape == sizes.b_shape


@pytest.mark.parametrize("structure", [Structure.dense(), *NAMED, THETAS[0]], ids=lambda s: s.name)
def test_from_weight_layer_reproduces_linear(structure):
    w, sizes = _planted(structure, 96, 144, seed=3, dtype=torch.float32)
    b = torch.randn(144, generator=_gen(4))
    layer = EinsumLinear.from_weight(w, b, structure, name="fc")
    x = torch.randn(5, 96, generator=_gen(5))
    ref = x.double() @ w.double().T + b.double()
    assert _rel(layer(x).double(), ref) < 1e-5
    assert layer.projection_error < 1e-5


def test_dense_is_a_copy():
    w = torch.randn(7, 5, generator=_gen(1))
    result = project(w, Structure.dense(), Structure.dense().resolve(5, 7))
    assert result.method == "copy" and result.rel_error == 0.0
    assert torch.equal(result.cores["weight"], w)
    result.cores["weight"].add_(1.0)
    assert not torch.equal(result.cores["weight"], w)  # a clone, not a view of the input


def test_zero_weight_gives_zero_cores_and_zero_error():
    s = Structure.btt(rank=2)
    result = project(torch.zeros(64, 64), s, s.resolve(64, 64))
    assert result.rel_error == 0.0
    assert all(torch.isfinite(c).all() for c in result.cores.values())
    assert _fold(result, s.resolve(64, 64)).abs().max().item() == 0.0


# -- optimality ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", [Structure.low_rank(rank=9), Structure.kronecker(), Structure.tensor_train(rank=2),
                                       Structure.btt(rank=2), THETAS[1], THETAS[2]], ids=lambda s: s.name)
@pytest.mark.parametrize("d_in, d_out", [(64, 64), (64, 256), (96, 144)])
def test_error_equals_discarded_singular_values(structure, d_in, d_out):
    sizes = structure.resolve(d_in, d_out)
    w = torch.randn(d_out, d_in, generator=_gen(11), dtype=torch.float64)
    discarded = 0.0
    for m in _np_blocks(w.numpy(), sizes):
        sv = np.linalg.svd(m, compute_uv=False)
        discarded += float(np.sum(sv[sizes.rho:] ** 2))
    expected = math.sqrt(discarded) / float(np.linalg.norm(w.numpy()))
    result = project(w, structure, sizes)
    assert result.rel_error == pytest.approx(expected, rel=1e-9)
    assert _rel(_fold(result, sizes), w) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("make, ranks", [
    (lambda r: Structure.low_rank(rank=r), [1, 4, 16, 64, 127]),
    (lambda r: Structure.btt(rank=r), [1, 2, 4, 8, 16]),
    (lambda r: Structure.tensor_train(rank=r), [1, 2, 4, 8, 16]),
], ids=["low_rank", "btt", "tensor_train"])
def test_error_decreases_with_rank(make, ranks):
    w = torch.randn(128, 128, generator=_gen(21), dtype=torch.float64)
    errors = []
    for r in ranks:
        s = make(r)
        errors.append(project(w, s, s.resolve(128, 128)).rel_error)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < 1.0


@pytest.mark.parametrize("btt_rank, lr_rank", [(1, 16), (2, 32), (4, 64)])
def test_btt_beats_low_rank_at_equal_params_on_gaussian(btt_rank, lr_rank):
    # 256x256: BTT rank r has 16·16·16·r on each core = 8192·r weights; low-rank k has 2·256·k = 512·k.
    w = torch.randn(256, 256, generator=_gen(31), dtype=torch.float64)
    btt, lr = Structure.btt(rank=btt_rank), Structure.low_rank(rank=lr_rank)
    s_btt, s_lr = btt.resolve(256, 256), lr.resolve(256, 256)
    assert s_btt.params == s_lr.params == 8192 * btt_rank
    assert project(w, btt, s_btt).rel_error < project(w, lr, s_lr).rel_error


# -- padding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", [Structure.btt(rank=1), Structure.btt(rank=3), Structure.kronecker(),
                                       Structure.tensor_train(rank=2)], ids=lambda s: s.name)
@pytest.mark.parametrize("d_in, d_out", [(97, 97), (97, 61)])
def test_padded_projection_is_no_worse_than_zero_fill(structure, d_in, d_out):
    sizes = structure.resolve(d_in, d_out)
    assert (sizes.in_padded, sizes.out_padded) != (d_in, d_out)
    w = torch.randn(d_out, d_in, generator=_gen(41), dtype=torch.float64)
    zero_fill = _np_zero_fill_error(w, sizes)
    start = project(w, structure, sizes, max_impute=0)
    assert start.rel_error == pytest.approx(zero_fill, rel=1e-9)
    result = project(w, structure, sizes)
    assert math.isfinite(result.rel_error)
    assert result.rel_error <= zero_fill * (1 + 1e-12)
    # the error is that of the real entries only
    assert result.rel_error == pytest.approx(_rel(_fold(result, sizes), w), rel=1e-9)
    if sizes.beta == sizes.delta == 1:
        # padded rows and columns are whole block lines: zero fill is already optimal, nothing to impute
        assert result.method == "block-svd" and result.rel_error == pytest.approx(zero_fill, rel=1e-9)
    else:
        assert "+impute(" in result.method and result.rel_error < zero_fill * (1 - 1e-6)


def test_impute_error_never_increases_with_rounds():
    s = Structure.tensor_train(rank=2)
    sizes = s.resolve(97, 61)
    w = torch.randn(61, 97, generator=_gen(43), dtype=torch.float64)
    errors = [project(w, s, sizes, max_impute=k).rel_error for k in range(6)]
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_padded_planted_structure_on_real_entries():
    # A BTT weight truncated to 97x97 is a BTT weight on the padded 98x98 grid: recovered exactly.
    s = Structure.btt(rank=2)
    sizes = s.resolve(97, 97)
    g = _gen(45)
    A = torch.randn(sizes.a_shape, generator=g, dtype=torch.float64)
    B = torch.randn(sizes.b_shape, generator=g, dtype=torch.float64)
    w = Fn.fold(A, B, sizes)
    assert w.shape == (97, 97) and sizes.in_padded == 98
    result = project(w, s, sizes)
    assert result.rel_error < 1e-8 and _rel(_fold(result, sizes), w) < 1e-8


# -- dtypes and devices ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("structure", [Structure.btt(rank=2), Structure.kronecker(), Structure.low_rank(rank=4)],
                         ids=lambda s: s.name)
def test_dtype_and_device_preserved(dtype, tol, structure):
    w, sizes = _planted(structure, 64, 96, seed=51)
    w = (w / w.abs().max()).to(dtype)
    result = project(w, structure, sizes)
    for core in result.cores.values():
        assert core.dtype == dtype and core.device == w.device and core.is_contiguous()
    # the error is that of the cores as returned (rounded to the dtype), measured against the given weight
    measured = _rel(_fold(result, sizes), w.double())
    assert result.rel_error == pytest.approx(measured, rel=1e-6, abs=1e-12)
    assert result.rel_error < tol


def test_large_weight_uses_float32_and_stays_accurate():
    s = Structure.btt(rank=2)
    d_in, d_out = 2048, 2304  # 4.7M entries: above FLOAT64_MAX_ENTRIES, projected in float32
    assert d_in * d_out > P.FLOAT64_MAX_ENTRIES
    w, sizes = _planted(s, d_in, d_out, seed=61, dtype=torch.float32)
    result = project(w, s, sizes)
    assert result.cores["A"].dtype == torch.float32
    assert result.rel_error < 1e-5


# -- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, counts", [(float("nan"), "2 non-finite entries (2 NaN, 0 Inf)"),
                                           (float("inf"), "2 non-finite entries (0 NaN, 2 Inf)")])
def test_non_finite_weight_rejected(value, counts):
    s = Structure.btt()
    w = torch.randn(64, 64, generator=_gen(71))
    w[3, 5] = value
    w[10, 0] = value
    with pytest.raises(WeightError, match=r"layer 'enc\.fc1'.*" + counts.replace("(", r"\(").replace(")", r"\)")):
        project(w, s, s.resolve(64, 64), name="enc.fc1")


@pytest.mark.parametrize("shape", [(64,), (2, 64, 64)])
def test_non_2d_weight_rejected(shape):
    s = Structure.btt()
    with pytest.raises(WeightError, match=r"layer 'enc\.fc1'.*must be 2-D.*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        project(torch.randn(shape), s, s.resolve(64, 64), name="enc.fc1")


def test_shape_mismatch_with_sizes_rejected():
    s = Structure.btt()
    with pytest.raises(WeightError, match=r"layer 'proj'.*shape \(64, 32\), expected \(d_out, d_in\) = \(64, 64\)"):
        project(torch.randn(64, 32), s, s.resolve(64, 64), name="proj")


def test_btt_moe_is_refused_with_its_name():
    s = Structure.btt_moe(experts=4, k=2)
    with pytest.raises(ProjectionError, match=r"layer 'mlp'.*btt_moe\(experts=4, k=2\)"):
        project(torch.randn(64, 64), s, Structure.btt(rank=4).resolve(64, 64), name="mlp")


def test_eigensolver_failure_becomes_projection_error(monkeypatch):
    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    s = Structure.kronecker()
    with pytest.raises(ProjectionError, match=r"layer 'head'.*64x64.*kronecker.*failed to converge"):
        project(torch.randn(64, 64), s, s.resolve(64, 64), name="head")


def test_thread_count_restored_after_small_block_batches():
    before = torch.get_num_threads()
    s = Structure.btt(rank=1)
    project(torch.randn(256, 256, generator=_gen(81)), s, s.resolve(256, 256))
    assert torch.get_num_threads() == before


@pytest.fixture
def one_thread():
    # ~100 rounds of tiny matmuls: on a busy machine, two contending intra-op threads make them 50x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("noise, rel", [(1e-3, 1e-9), (None, 1e-4)], ids=["gap", "flat"])
def test_subspace_iteration_path_matches_optimum(monkeypatch, one_thread, noise, rel):
    # Force the iterative solver (used for large single blocks) on a 256x256 Tensor-Train projection.
    monkeypatch.setattr(P, "ITERATIVE_SIDE", 16)
    s = Structure.tensor_train(rank=2)
    sizes = s.resolve(256, 256)
    if noise is None:  # Gaussian: flat spectrum, the slowest case for subspace iteration
        w = torch.randn(256, 256, generator=_gen(91), dtype=torch.float64)
    else:  # a planted TT plus noise: a clear gap after the second singular value
        w, _ = _planted(s, 256, 256, seed=92)
        w = w / w.norm() + noise * torch.randn(256, 256, generator=_gen(93), dtype=torch.float64) / 256
    discarded = sum(float(np.sum(np.linalg.svd(m, compute_uv=False)[2:] ** 2)) for m in _np_blocks(w.numpy(), sizes))
    optimum = math.sqrt(discarded) / w.norm().item()
    result = project(w, s, sizes)
    assert result.rel_error >= optimum * (1 - 1e-12)
    assert result.rel_error == pytest.approx(optimum, rel=rel)
