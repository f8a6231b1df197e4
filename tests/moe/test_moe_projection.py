"""init="project" for BTT-MoE: with its zero gate the layer computes the rank-k BTT projection of W."""

import pytest
import torch

import einfx
from einfx.errors import ProjectionError, WeightError
from einfx.moe.projection import project_experts


def _block_tail_error(weight, sizes, k):
    """‖W − rank-k per-block truncation‖ / ‖W‖ from the singular values of the ε×α blocks (no padding)."""
    blocks = weight.reshape(sizes.phi, sizes.epsilon, sizes.gamma, sizes.alpha).permute(0, 2, 1, 3)
    sv = torch.linalg.svdvals(blocks.double())
    return (sv[..., k:].pow(2).sum().sqrt() / weight.double().norm()).item()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_project_starts_at_the_rank_k_btt_projection(k):
    torch.manual_seed(k)
    linear = torch.nn.Linear(64, 48)
    layer = einfx.EinsumLinear.from_linear(linear, einfx.Structure.btt_moe(experts=4, k=k), name="fc")
    assert isinstance(layer, einfx.moe.BTTMoELinear)
    expected = _block_tail_error(linear.weight.detach(), layer.sizes, k)
    assert layer.projection_error == pytest.approx(expected, rel=1e-4)
    x = torch.randn(16, 64)
    want = x @ linear.weight.detach().t() + linear.bias.detach()
    got = layer(x).detach()
    # the layer's map is W_k: its error on inputs matches the weight error in expectation; check exactly
    torch.testing.assert_close(got, x @ layer.to_dense().t() + layer.bias.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.detach(), linear.bias.detach())
    w_k = layer.to_dense()
    assert ((linear.weight.detach() - w_k).norm() / linear.weight.detach().norm()).item() == pytest.approx(expected,
                                                                                                          rel=1e-4)
    assert not torch.allclose(got, want)  # rank-k < full rank: a real approximation


def test_project_is_exact_for_a_planted_rank_k_btt_weight():
    torch.manual_seed(0)
    k = 2
    planted = einfx.EinsumLinear(64, 48, einfx.Structure.btt(rank=k), bias=False, dtype=torch.float64)
    weight = planted.to_dense()
    layer = einfx.EinsumLinear.from_weight(weight, None, einfx.Structure.btt_moe(experts=4, k=k))
    assert layer.projection_error < 1e-10
    torch.testing.assert_close(layer.to_dense(), weight)
    assert layer.A.dtype == torch.float64 and layer.bias is None


def test_experts_hold_successive_singular_triplets_scaled_by_k():
    torch.manual_seed(2)
    weight = torch.randn(64, 64, dtype=torch.float64)
    experts, k = 4, 2
    layer = einfx.EinsumLinear.from_weight(weight, None, einfx.Structure.btt_moe(experts=experts, k=k))
    s = layer.sizes
    blocks = weight.reshape(s.phi, s.epsilon, s.gamma, s.alpha).permute(0, 2, 1, 3)
    sv = torch.linalg.svdvals(blocks)
    one_hot = torch.eye(experts, dtype=torch.float64)
    for e in range(experts):
        # expert e alone, weight 1: k σ_e u_e v_eᵀ in every block, so its block norms are k σ_e
        w_e = layer.to_dense(one_hot[e]).reshape(s.phi, s.epsilon, s.gamma, s.alpha).permute(0, 2, 1, 3)
        torch.testing.assert_close(torch.linalg.matrix_norm(w_e), k * sv[..., e])
    # uniform weights 1/k over all experts give the full rank-E projection
    full = layer.to_dense(torch.full((experts,), 1.0 / k, dtype=torch.float64))
    tail = sv[..., experts:].pow(2).sum().sqrt()
    assert (weight - full).norm().item() == pytest.approx(tail.item(), rel=1e-8)


def test_project_with_padding_uses_the_zero_padded_weight():
    torch.manual_seed(3)
    weight = torch.randn(47, 61, dtype=torch.float64)
    layer = einfx.EinsumLinear.from_weight(weight, None, einfx.Structure.btt_moe(experts=3, k=2))
    s = layer.sizes
    assert (s.in_padded, s.out_padded) == (63, 48)  # padded on both sides
    padded = torch.zeros(s.out_padded, s.in_padded, dtype=torch.float64)
    padded[:47, :61] = weight
    u, sv, vh = torch.linalg.svd(padded.reshape(s.phi, s.epsilon, s.gamma, s.alpha).permute(0, 2, 1, 3))
    trunc = (u[..., :2] * sv[..., None, :2]) @ vh[..., :2, :]
    want = trunc.permute(0, 2, 1, 3).reshape(s.out_padded, s.in_padded)[:47, :61]
    torch.testing.assert_close(layer.to_dense(), want)
    assert layer.projection_error == pytest.approx(((weight - want).norm() / weight.norm()).item(), rel=1e-9)


def test_project_keeps_half_precision():
    torch.manual_seed(4)
    weight = torch.randn(48, 64).to(torch.bfloat16)
    layer = einfx.EinsumLinear.from_weight(weight, None, einfx.Structure.btt_moe(experts=4, k=2))
    assert layer.A.dtype == layer.B.dtype == layer.gate.dtype == torch.bfloat16
    expected = _block_tail_error(weight.float(), layer.sizes, 2)
    assert layer.projection_error == pytest.approx(expected, abs=0.02)


def test_random_init_and_bad_inputs():
    weight = torch.randn(48, 64)
    layer = einfx.EinsumLinear.from_weight(weight, torch.zeros(48), "btt_moe:experts=4,k=2", init="random")
    assert layer.projection_error is None and torch.count_nonzero(layer.gate) == 0
    bad = weight.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(WeightError, match="1 NaN"):
        einfx.EinsumLinear.from_weight(bad, None, "btt_moe:experts=4,k=2", name="blk.fc")
    with pytest.raises(ValueError, match="valid: project, random"):
        einfx.EinsumLinear.from_weight(weight, None, "btt_moe:experts=4,k=2", init="svd")
    sizes = einfx.Structure.tensor_train(rank=2).resolve(64, 64)
    with pytest.raises(ProjectionError, match="β = δ = 1"):
        project_experts(torch.randn(64, 64), sizes, 2, name="blk.fc")
