"""Lowering: structured layers become plan primitives in the FX graph; outputs, gradients, parameters and
state_dict keys are unchanged; no einsum node remains (nor an Einsum op after ONNX export)."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from einfx import EinsumLinear, Structure
from einfx.passes.base import PassResult
from einfx.passes.lower import lower
from einfx.planning import default_profile

ALLOWED_FUNCTIONS = {torch.matmul, operator.getitem, operator.add, F.pad, torch.relu}
ALLOWED_METHODS = {"reshape", "permute", "expand", "size", "transpose", "contiguous"}


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, EinsumLinear) or super().is_leaf_module(m, qualname)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = EinsumLinear(64, 96, Structure.btt(rank=2))
        self.b = EinsumLinear(96, 50, Structure.kronecker())           # padded output
        self.c = EinsumLinear(50, 70, Structure.from_theta((0.4, 0.3, 0.3, 0.3, 0.4, 0.3, 0.2)))
        self.d = EinsumLinear(70, 32, Structure.low_rank(rank=4), bias=False)
        self.e = EinsumLinear(32, 16, Structure.dense())

    def forward(self, x):
        return self.e(self.d(torch.relu(self.c(self.b(torch.relu(self.a(x)))))))


def _trace(model):
    return fx.GraphModule(model, _LeafTracer().trace(model))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_lowered_graph_has_only_primitives_and_same_outputs_and_grads(backend):
    torch.manual_seed(0)
    model = _Net()
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 5, 64)
    ref = model(x)
    gm = _trace(model)
    keys = set(gm.state_dict())
    params = dict(gm.named_parameters())
    result = lower(gm, tokens=15, profile=default_profile("cpu").with_backend(backend))
    assert isinstance(result, PassResult) and result.changed and result.stats["lowered"] == 5
    for node in result.graph_module.graph.nodes:
        assert node.op != "call_module", node
        if node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, node.target
            assert "einsum" not in getattr(node.target, "__name__", "")
        if node.op == "call_method":
            assert node.target in ALLOWED_METHODS, node.target
    out = result.graph_module(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # same parameters (objects), same state_dict keys: training continues on the original weights
    assert set(result.graph_module.state_dict()) == keys
    assert all(dict(result.graph_module.named_parameters())[k] is v for k, v in params.items())
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), list(params.values()))
    got = torch.autograd.grad((out * g).sum(), list(params.values()))
    for name, a, b in zip(params, got, want):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 1e-5, name


def test_lowered_graph_runs_at_other_batch_sizes_and_trains():
    torch.manual_seed(1)
    model = _Net()
    gm = lower(_trace(model), tokens=512).graph_module
    for shape in ((1, 64), (7, 2, 64)):
        x = torch.randn(shape)
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    x, target = torch.randn(8, 64), torch.randn(8, 16)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(gm(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_graph_without_structured_layers_is_unchanged():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    before = str(gm.graph)
    result = lower(gm)
    assert not result.changed and result.stats["lowered"] == 0 and str(result.graph_module.graph) == before


@pytest.mark.slow
def test_exported_onnx_has_matmul_and_no_einsum(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(2)
    model = nn.Sequential(EinsumLinear(256, 256, Structure.btt(rank=1)))
    gm = lower(_trace(model), tokens=64, profile=default_profile().with_backend("onnxruntime")).graph_module
    path = tmp_path / "m.onnx"
    torch.onnx.export(gm, (torch.randn(64, 256),), str(path), dynamo=True)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMul" in ops and "Einsum" not in ops
