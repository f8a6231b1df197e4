"""BTTMoELinear: dispatch, both compute paths against a per-token reference, gradients, costs, errors."""

import copy

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import einfx
from einfx.errors import PlanError, ShapeError, StructureError
from einfx.moe import BTTMoELinear
from einfx.structures import functional as Fn


def _layer(d_in, d_out, experts, k, seed=0, dtype=torch.float32, bias=True):
    torch.manual_seed(seed)
    layer = einfx.EinsumLinear(d_in, d_out, einfx.Structure.btt_moe(experts=experts, k=k), bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.gate.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def _per_token_reference(layer, x):
    """Σ_{e in top-k} w_e · BTT_e(x) + b, one token and one expert at a time, with the 7-index einsum."""
    x2 = x.reshape(-1, layer.in_features)
    logits = x2 @ layer.gate.t()
    out = []
    for n in range(x2.shape[0]):
        row = logits[n].tolist()
        top = sorted(range(layer.experts), key=lambda e: (-row[e], e))[: layer.k]
        w = torch.softmax(logits[n, top], dim=0)
        y = torch.zeros(layer.out_features, dtype=x.dtype)
        for j, e in enumerate(top):
            s1 = type(layer.sizes)(**{**layer.sizes.__dict__, "rho": 1})
            y = y + w[j] * Fn.reference(x2[n], layer.A[:, :, e:e + 1], layer.B[:, :, e:e + 1], s1)
        out.append(y + (layer.bias if layer.bias is not None else 0))
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features)


def test_structure_dispatches_to_the_moe_layer():
    layer = einfx.EinsumLinear(64, 48, einfx.Structure.btt_moe(experts=4, k=2))
    assert type(layer) is BTTMoELinear
    assert layer.A.shape == layer.sizes.a_shape and layer.sizes.rho == 4
    assert layer.gate.shape == (4, 64) and torch.count_nonzero(layer.gate) == 0
    layer = einfx.EinsumLinear(64, 48, "btt_moe:experts=3,k=1")
    assert (layer.experts, layer.k) == (3, 1)


@pytest.mark.parametrize("d_in,d_out,experts,k", [(64, 48, 4, 2), (60, 50, 3, 2), (64, 64, 8, 1), (36, 36, 4, 4)])
@pytest.mark.parametrize("path", ["masked", "sparse"])
def test_paths_match_the_per_token_reference(d_in, d_out, experts, k, path):
    layer = _layer(d_in, d_out, experts, k, seed=d_in + k, dtype=torch.float64)
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    layer.set_path(path)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _per_token_reference(layer, x), rtol=1e-10, atol=1e-10)


def test_paths_agree_in_float32_to_1e5_relative():
    layer = _layer(256, 192, 8, 2, seed=3)
    x = torch.randn(64, 256)
    with torch.no_grad():
        layer.set_path("masked")
        masked = layer(x)
        layer.set_path("sparse")
        sparse = layer(x)
    rel = ((masked - sparse).norm() / masked.norm()).item()
    assert rel < 1e-5
    assert (masked - sparse).abs().max().item() <= 1e-5 * masked.abs().max().item()


def test_zero_gate_routes_to_the_first_k_experts_and_to_dense_is_exact():
    torch.manual_seed(1)
    layer = einfx.EinsumLinear(64, 48, einfx.Structure.btt_moe(experts=4, k=2))
    x = torch.randn(20, 64)
    r = layer.routing(x)
    assert r.indices.tolist() == [[0, 1]] * 20
    torch.testing.assert_close(r.weights, torch.full((20, 2), 0.5))
    with torch.no_grad():
        for path in ("masked", "sparse"):
            layer.set_path(path)
            torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_to_dense_for_a_given_routing():
    layer = _layer(64, 48, 4, 2, seed=5, dtype=torch.float64)
    weights = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)
    s1 = type(layer.sizes)(**{**layer.sizes.__dict__, "rho": 1})
    want = sum(w * Fn.fold(layer.A[:, :, e:e + 1], layer.B[:, :, e:e + 1], s1) for e, w in enumerate(weights))
    torch.testing.assert_close(layer.to_dense(weights), want.detach())
    with pytest.raises(ShapeError, match=r"shape \(4,\), got \(3,\)"):
        layer.to_dense(torch.ones(3))


@pytest.mark.parametrize("path", ["masked", "sparse"])
def test_gradcheck_through_gate_cores_and_bias(path):
    layer = _layer(16, 12, 3, 2, seed=7, dtype=torch.float64)
    with torch.no_grad():
        layer.gate.mul_(3.0)  # well-separated logits: the top-k selection is locally constant
    layer.set_path(path)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    names = ["gate", "A", "B", "bias"]
    params = [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)
    # and the gate really receives a gradient
    fn(x, *params).pow(2).sum().backward()
    assert params[0].grad.abs().sum() > 0


def test_training_forward_records_the_aux_loss_and_eval_does_not():
    layer = _layer(64, 48, 4, 2)
    x = torch.randn(10, 64)
    layer.train()
    layer(x)
    assert layer.last_aux_loss is not None and layer.last_aux_loss.requires_grad
    layer.last_aux_loss.backward()
    assert layer.gate.grad.abs().sum() > 0
    layer.eval()
    layer.last_aux_loss = None
    layer(x)
    assert layer.last_aux_loss is None
    copied = copy.deepcopy(layer.train())
    layer(x)
    assert copy.deepcopy(layer).last_aux_loss is None and copied.experts == 4


def test_aux_loss_of_a_model_sums_the_layers():
    model = torch.nn.Sequential(_layer(64, 48, 4, 2, seed=1), torch.nn.ReLU(), _layer(48, 64, 3, 1, seed=2))
    assert einfx.aux_loss(model).item() == 0.0  # no forward yet
    model(torch.randn(7, 64))
    l1, l2 = model[0].last_aux_loss, model[2].last_aux_loss
    assert einfx.aux_loss(model).item() == pytest.approx((l1 + l2).item())
    assert einfx.aux_loss(model, reduction="mean").item() == pytest.approx((l1 + l2).item() / 2)
    assert einfx.aux_loss(torch.nn.Linear(3, 3)).item() == 0.0
    with pytest.raises(StructureError, match="valid: sum, mean"):
        einfx.aux_loss(model, reduction="max")


def test_cost_reports_the_flops_of_the_path_used():
    layer = _layer(64, 48, 4, 2)
    s = layer.sizes  # α8 γ8 | ε8 φ6 | ρ4, β = δ = 1
    per_expert = s.phi * s.gamma * s.alpha + s.phi * s.epsilon * s.gamma  # x·A, then ·B, one rank-1 expert
    gate = 64 * 4
    params = s.phi * 4 * s.gamma * s.alpha + s.phi * s.epsilon * 4 * s.gamma + gate + 48
    layer.set_path("masked")
    assert layer.cost(tokens=10) == einfx.Cost(params=params, flops=2 * 10 * (4 * per_expert + gate))
    layer.set_path("sparse")
    assert layer.cost(tokens=10) == einfx.Cost(params=params, flops=2 * 10 * (2 * per_expert + gate))
    layer.set_path("auto")
    for tokens in (1, 64, 4096):
        chosen = layer.path_for(tokens)
        assert chosen == einfx.moe.choose_path(s, 2, tokens)
        active = 4 if chosen == "masked" else 2
        assert layer.cost(tokens).flops == 2 * tokens * (active * per_expert + gate)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(StructureError, match=r"k must be an integer in 1\.\.experts = 1\.\.4, got 5"):
        einfx.Structure.btt_moe(experts=4, k=5)
    with pytest.raises(StructureError, match="experts must be an integer >= 1, got 0"):
        einfx.Structure.btt_moe(experts=0, k=1)
    with pytest.raises(StructureError, match="k must be"):
        einfx.EinsumLinear(64, 64, "btt_moe:experts=2,k=3")
    with pytest.raises(ShapeError, match="rank 64 exceeds the largest useful rank 8"):
        einfx.EinsumLinear(64, 64, einfx.Structure.btt_moe(experts=64, k=2), name="blk.fc")
    layer = _layer(64, 48, 4, 2)
    with pytest.raises(PlanError, match="valid: auto, masked, sparse"):
        layer.set_path("dense")
    with pytest.raises(PlanError, match="valid: xab"):
        layer.set_order("fold")
    with pytest.raises(ShapeError, match="expected d_in = 64"):
        layer(torch.randn(2, 63))


def test_param_groups_cover_gate_and_cores_with_per_expert_multipliers():
    layer = _layer(64, 48, 4, 2)
    s = layer.sizes
    groups = einfx.param_groups(torch.nn.Sequential(layer), lr=1e-3)
    mult = {name: g["lr_mult"] for g in groups for name in g["param_names"]}
    assert set(mult) == {"0.A", "0.B", "0.gate", "0.bias"}
    assert mult["0.gate"] == 1.0 and mult["0.bias"] == 1.0
    # Adam: (d_in / fan_in) / 2 with the fans of one rank-1 expert: A fan_in = α, B fan_in = β·γ
    assert mult["0.A"] == pytest.approx(s.in_padded / s.alpha / 2)
    assert mult["0.B"] == pytest.approx(s.in_padded / (s.beta * s.gamma) / 2)
    sgd = {n: g["lr_mult"] for g in einfx.param_groups(torch.nn.Sequential(layer), 1e-3, "sgd")
           for n in g["param_names"]}
    ratio = s.out_padded / s.in_padded
    assert sgd["0.A"] == pytest.approx((s.phi * s.delta / s.alpha) / ratio / 2)
    assert sgd["0.B"] == pytest.approx((s.epsilon / (s.beta * s.gamma)) / ratio / 2)
