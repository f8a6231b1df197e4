"""MoEFeedForward: both paths against a per-token reference, routing and aux loss shared with BTT-MoE."""

import pytest
import torch

import einfx
from einfx.errors import PlanError, ShapeError, StructureError
from einfx.moe import MoEFeedForward
from einfx.moe.routing import load_balancing_loss, route


def _block(experts=4, k=2, bias=True, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    block = MoEFeedForward(12, 20, experts=experts, k=k, bias=bias, dtype=dtype, **kw)
    with torch.no_grad():
        block.gate.normal_()
        if bias:
            block.b1.normal_()
            block.b2.normal_()
    return block


def _reference(block, x):
    x2 = x.reshape(-1, block.d_model)
    logits = x2 @ block.gate.t()
    rows = []
    for n in range(x2.shape[0]):
        row = logits[n].tolist()
        top = sorted(range(block.experts), key=lambda e: (-row[e], e))[: block.k]
        w = torch.softmax(logits[n, top], dim=0)
        y = 0
        for j, e in enumerate(top):
            h = torch.nn.functional.gelu(block.w1[e] @ x2[n] + (block.b1[e] if block.b1 is not None else 0))
            y = y + w[j] * (block.w2[e] @ h + (block.b2[e] if block.b2 is not None else 0))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], block.d_out)


@pytest.mark.parametrize("path", ["masked", "grouped", "auto"])
@pytest.mark.parametrize("experts,k,bias", [(4, 2, True), (3, 1, False), (5, 5, True)])
def test_paths_match_the_per_token_reference(path, experts, k, bias):
    block = _block(experts, k, bias, seed=experts + k, path=path)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference(block, x), rtol=1e-10, atol=1e-10)


def test_aux_loss_is_the_shared_routing_loss_and_gradients_reach_all_parameters():
    block = _block(seed=1)
    x = torch.randn(30, 12, dtype=torch.float64)
    y = block.train()(x)
    r = route(x @ block.gate.t(), block.k)
    assert block.last_aux_loss.item() == pytest.approx(load_balancing_loss(r.logits, r.indices).item())
    model = torch.nn.Sequential(block, torch.nn.Linear(12, 1).double())
    assert einfx.aux_loss(model).item() == pytest.approx(block.last_aux_loss.item())
    (y.pow(2).sum() + block.last_aux_loss).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cost_and_hidden_for_params():
    block = MoEFeedForward(64, 32, experts=8, k=2, path="masked")
    params = 8 * 64 + 8 * (32 * 64 + 32 + 64 * 32 + 64)
    assert block.cost(10) == einfx.Cost(params=params, flops=2 * 10 * (64 * 8 + 8 * 2 * 64 * 32))
    block.set_path("grouped")
    assert block.cost(10).flops == 2 * 10 * (64 * 8 + 2 * 2 * 64 * 32)
    h = MoEFeedForward.hidden_for_params(64, params, experts=8)
    assert h == 32
    assert sum(p.numel() for p in MoEFeedForward(64, h + 1, experts=8).parameters()) > params


def test_bad_arguments():
    with pytest.raises(StructureError, match=r"k must be an integer in 1\.\.experts = 1\.\.4, got 5"):
        MoEFeedForward(8, 8, experts=4, k=5)
    with pytest.raises(StructureError, match="experts must be an integer >= 1, got 0"):
        MoEFeedForward(8, 8, experts=0, k=1)
    with pytest.raises(StructureError, match="valid: gelu, relu, silu"):
        MoEFeedForward(8, 8, activation="tanh")
    with pytest.raises(PlanError, match="valid: auto, masked, grouped"):
        MoEFeedForward(8, 8, path="sparse")
    with pytest.raises(ShapeError, match="expected d_model = 8"):
        MoEFeedForward(8, 8)(torch.randn(2, 7))
