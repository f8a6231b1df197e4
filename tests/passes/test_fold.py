"""Fold-to-dense: layers the cost model says lose to dense become exact nn.Linear layers, unless kept."""

from dataclasses import replace

import torch
from torch import fx, nn

from einfx import EinsumLinear, Structure
from einfx.passes.fold import fold_decision, fold_to_dense
from einfx.planning import default_profile


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, EinsumLinear) or super().is_leaf_module(m, qualname)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(EinsumLinear(64, 64, Structure.btt(rank=4)), nn.ReLU(),
                         EinsumLinear(64, 40, Structure.kronecker()))


# launches dominate: the structured plans (several kernels) lose to one dense GEMM
SLOW_LAUNCH = replace(default_profile("cpu"), name="slow-launch", launch_s=1e-3)
# arithmetic dominates: structure (fewer FLOPs) wins
FLOPS_BOUND = replace(default_profile("cpu"), name="flops-bound", launch_s=0.0, view_s=0.0, gemm_half_dim=0.0)


def test_fold_is_exact_and_replaces_losing_layers():
    model = _model()
    x = torch.randn(9, 64)
    ref = model(x)
    dense_weights = [model[0].to_dense(), model[2].to_dense()]
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    result = fold_to_dense(gm, tokens=9, profile=SLOW_LAUNCH)
    assert result.changed and result.stats["folded"] == ["0", "2"]
    for key, w in zip(("0", "2"), dense_weights):
        lin = result.graph_module.get_submodule(key)
        assert type(lin) is nn.Linear and torch.equal(lin.weight, w)
    out = result.graph_module(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    d = result.stats["decisions"]["0"]
    assert d.fold and d.structured_time > d.dense_time and "dense wins" in d.reason


def test_keep_pattern_forbids_folding_and_says_so():
    gm = fx.GraphModule(_model(), _LeafTracer().trace(_model()))
    result = fold_to_dense(gm, tokens=9, profile=SLOW_LAUNCH, keep=("0",))
    assert result.stats["folded"] == ["2"]
    assert isinstance(result.graph_module.get_submodule("0"), EinsumLinear)
    assert "forbidden by policy" in result.stats["decisions"]["0"].reason


def test_winning_structure_is_kept():
    layer = EinsumLinear(1024, 1024, Structure.btt(rank=1))
    d = fold_decision(layer, tokens=512, profile=FLOPS_BOUND)
    assert not d.fold and d.structured_time < d.dense_time and "structure wins" in d.reason
    gm = fx.GraphModule(nn.Sequential(layer), _LeafTracer().trace(nn.Sequential(layer)))
    assert not fold_to_dense(gm, tokens=512, profile=FLOPS_BOUND).changed


def test_margin_folds_thin_predicted_gains_and_the_bias_pass_counts():
    layer = EinsumLinear(512, 512, Structure.btt(rank=2))
    exact = fold_decision(layer, 512, margin=1.0)
    assert not exact.fold and "structure wins" in exact.reason
    ratio = exact.dense_time / exact.structured_time
    assert fold_decision(layer, 512, margin=ratio * 1.01).fold
    kept = fold_decision(layer, 512, margin=ratio * 0.99)
    assert not kept.fold and f"kept from {ratio * 0.99:.2f}x" in kept.reason
    # onnxruntime adds the bias in a node of its own, which dense Gemm fuses: the structured time includes it
    ort = default_profile("cpu").with_backend("onnxruntime")
    no_bias = EinsumLinear(512, 512, Structure.btt(rank=2), bias=False)
    with_bias, without = fold_decision(layer, 512, ort, margin=1.0), fold_decision(no_bias, 512, ort, margin=1.0)
    assert with_bias.structured_time > without.structured_time
