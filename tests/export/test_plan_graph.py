"""A plan built as a standalone ONNX graph computes exactly what the plan computes in torch, in every runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from einfx import EinsumLinear, Structure
from einfx.errors import ExportError, PlanError
from einfx.export.plan_graph import dense_model, plan_model
from einfx.export.runtimes import RUNTIMES, available, check_runtime, load
from einfx.planning.plan import Plan, Step
from einfx.planning.planner import all_plans
from einfx.planning.profile import default_profile

INSTALLED = [r for r in RUNTIMES if available(r)]
STRUCTURES = [Structure.low_rank(rank=5), Structure.btt(rank=2), Structure.monarch(), Structure.kronecker(),
              Structure.tensor_train(rank=3)]


def _layer(structure, d_in=48, d_out=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return EinsumLinear(d_in, d_out, structure, bias=bias).eval()


@pytest.mark.parametrize("runtime", INSTALLED)
@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
def test_every_candidate_plan_matches_torch(runtime, structure):
    layer = _layer(structure)
    x = torch.randn(24, layer.in_features)
    with torch.no_grad():
        expected = layer(x).numpy()
    cores = {k: v.detach() for k, v in layer.cores().items()}
    profile = default_profile("cpu").with_backend("onnxruntime")
    plans = [p for p in all_plans(layer.sizes, 24, "float32", profile) if p.order != "fold"][:6]
    assert plans
    for plan in plans:
        got = load(runtime, plan_model(plan, cores, layer.bias.detach(), 24, layer.in_features))({"x": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=f"{runtime} {plan.order} {plan.layout}")


@pytest.mark.parametrize("runtime", INSTALLED)
def test_padded_layer_and_dense_model(runtime):
    layer = _layer(Structure.btt(rank=1), d_in=50, d_out=37, bias=False)  # sizes overshoot: pad and crop
    assert layer.sizes.in_padded != 50 or layer.sizes.out_padded != 37
    x = torch.randn(7, 50)
    with torch.no_grad():
        expected = layer(x).numpy()
    profile = default_profile("cpu").with_backend("onnxruntime")
    plan = [p for p in all_plans(layer.sizes, 7, "float32", profile) if p.order != "fold"][0]
    got = load(runtime, plan_model(plan, {k: v.detach() for k, v in layer.cores().items()}, None, 7, 50))({"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    dense = load(runtime, dense_model(layer.to_dense(), None, 7))({"x": x.numpy()})[0]
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_plan_that_reads_an_unwritten_value_is_refused():
    layer = _layer(Structure.low_rank(rank=4))
    bad = Plan(steps=(Step("matmul", "y", ("x", "nowhere")),), order="xab", layout="", time=0, flops=0, bytes=0,
               launches=0, naive_time=0, naive_flops=0, naive_bytes=0, dense_time=0, dense_flops=0, copies=0,
               tokens=4, dtype="float32", profile="cpu", output="y")
    with pytest.raises(PlanError, match="reads 'nowhere', which no earlier step wrote"):
        plan_model(bad, {k: v.detach() for k, v in layer.cores().items()}, None, 4, layer.in_features)


def test_unknown_runtime_is_named_with_the_valid_ones():
    with pytest.raises(ExportError, match="unknown runtime 'tensorrt'; valid: onnxruntime, openvino"):
        check_runtime("tensorrt")
