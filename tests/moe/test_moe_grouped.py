"""The grouped (eager) BTT-MoE path: same outputs and gradients as the masked path, FLOPs ∝ k, chosen by the
cost model only for eager calls with many tokens, never in exported or traced graphs."""

import pytest
import torch

import einfx
from einfx.moe.cost import STATIC_PATHS, choose_path, path_costs


def _layer(d_in=96, d_out=80, experts=6, k=2, seed=0):
    torch.manual_seed(seed)
    layer = einfx.EinsumLinear(d_in, d_out, einfx.Structure.btt_moe(experts=experts, k=k))
    with torch.no_grad():
        layer.gate.normal_()  # non-uniform routing, so that experts get different token sets
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("d_in, d_out, experts, k", [(96, 80, 6, 2), (97, 61, 4, 3), (64, 64, 8, 1)])
def test_grouped_equals_masked_forward_and_backward(d_in, d_out, experts, k):
    layer = _layer(d_in, d_out, experts, k)
    x = torch.randn(5, 13, d_in, requires_grad=True)
    outs, grads = {}, {}
    for path in ("masked", "grouped"):
        layer.set_path(path)
        y = layer(x)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum(),
                                (x, layer.A, layer.B, layer.gate))
        outs[path], grads[path] = y.detach(), g
    assert ((outs["grouped"] - outs["masked"]).norm() / outs["masked"].norm()).item() < 1e-5
    for got, want in zip(grads["grouped"], grads["masked"]):
        assert ((got - want).norm() / want.norm().clamp_min(1e-12)).item() < 1e-5


def test_grouped_flops_grow_with_k_and_cost_reports_them():
    sizes = einfx.Structure.btt_moe(experts=8, k=2).resolve(1024, 1024)
    costs = path_costs(sizes, 2, 4096)
    assert costs["grouped"].flops == costs["sparse"].flops == costs["masked"].flops * 2 // 8
    layer = einfx.EinsumLinear(1024, 1024, einfx.Structure.btt_moe(experts=8, k=2))
    layer.set_path("grouped")
    per_expert = sizes.macs_per_token("xab") // 8
    assert layer.cost(100).flops == 2 * 100 * (2 * per_expert + 1024 * 8)


def test_choice_many_tokens_eager_vs_static():
    sizes = einfx.Structure.btt_moe(experts=8, k=2).resolve(1024, 1024)
    assert choose_path(sizes, 2, 8192) == "grouped"
    assert choose_path(sizes, 2, 8192, static=True) in STATIC_PATHS
    assert choose_path(sizes, 2, None) in STATIC_PATHS          # symbolic batch: exported graph
    layer = einfx.EinsumLinear(64, 64, einfx.Structure.btt_moe(experts=4, k=2))
    layer.set_path("grouped")
    assert layer.path_for(None) == "masked" and layer.path_for(100, static=True) == "masked"
    assert layer.path_for(100) == "grouped"


def test_fixed_grouped_path_still_exports(tmp_path):
    layer = _layer().eval()
    layer.set_path("grouped")
    x = torch.randn(3, 96)
    report = einfx.export.to_onnx(torch.nn.Sequential(layer), (x,), tmp_path / "moe.onnx", latency_repeats=0)
    assert report.verified and report.max_rel_error <= 1e-4
    assert not {"NonZero", "Loop", "If"} & set(report.op_counts)
