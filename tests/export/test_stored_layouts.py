"""store_layouts stores each weight in the layout its GEMM reads (exact, never growing the file), leaves a weight
with other readers alone, and leaves a low-rank export with no Transpose of a weight and none of an activation
beyond dense's."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import einfx
from einfx import Policy, Structure
from einfx.export.graph_passes import optimize_graph
from einfx.export.runtimes import RUNTIMES, available, load
from einfx.export.stored_layouts import store_layouts

INSTALLED = [r for r in RUNTIMES if available(r)]


def _model(extra_reader: str | None = None) -> onnx.ModelProto:
    """x (n, 6) @ relaid(W) where W (1, 6, 4, 1) -> Reshape (6, 4) -> Transpose (1, 0) -> Reshape (1, 4, 6)
    -> Transpose (0, 2, 1) -> (1, 6, 4); ``extra_reader``: "initializer" adds Relu(W) as a second output,
    "middle" adds Relu of the chain's first Transpose, "twice" a second chain from W to another GEMM."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 6, 4, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([6, 4], np.int64), "s2"),
             numpy_helper.from_array(np.array([1, 4, 6], np.int64), "s3")]
    nodes = [helper.make_node("Reshape", ["W", "s2"], ["w2"]),
             helper.make_node("Transpose", ["w2"], ["wt"], perm=[1, 0]),
             helper.make_node("Reshape", ["wt", "s3"], ["w3"]),
             helper.make_node("Transpose", ["w3"], ["w"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "w"], ["y0"]),
             helper.make_node("Identity", ["y0"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 4])]
    if extra_reader == "initializer":
        nodes.append(helper.make_node("Relu", ["W"], ["z"]))
    elif extra_reader == "middle":
        nodes.append(helper.make_node("Relu", ["wt"], ["z"]))
    elif extra_reader == "twice":
        nodes += [helper.make_node("Reshape", ["W", "s2"], ["v2"]), helper.make_node("MatMul", ["x", "v2"], ["z"])]
    if extra_reader:
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 6])],
                              outs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _weights(model) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if len(i.dims) > 1)


def test_a_weight_chain_becomes_the_initializer_the_gemm_reads():
    model = _model()
    out, removed = store_layouts(model)
    assert removed == 4 and _ops(out) == {"MatMul": 1, "Identity": 1}
    gemm = next(n for n in out.graph.node if n.op_type == "MatMul")
    stored = next(i for i in out.graph.initializer if i.name == gemm.input[1])
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W"))
    np.testing.assert_array_equal(numpy_helper.to_array(stored), w.reshape(6, 4).T.reshape(1, 4, 6).transpose(0, 2, 1))
    assert _weights(out) == _weights(model)  # the file holds the weight once, in its new layout
    x = np.random.default_rng(1).standard_normal((1, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(ReferenceEvaluator(out).run(None, {"x": x})[0],
                                  ReferenceEvaluator(model).run(None, {"x": x})[0])
    onnx.checker.check_model(out)


@pytest.mark.parametrize("extra", ["initializer", "middle", "twice"])
def test_a_weight_with_other_readers_is_left_alone(extra):
    # storing the chain's result would keep the weight twice in the file
    model = _model(extra)
    out, removed = store_layouts(model)
    assert removed == 0 and out is model


def test_a_chain_that_makes_a_graph_output_is_left_alone():
    model = _model()
    model.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 6, 4]))
    out, removed = store_layouts(model)
    assert removed == 0 and out is model


D = 384  # weights this large are left to einfx by the exporter's own constant folding


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(D, 2 * D), torch.nn.Linear(2 * D, D)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize("runtime", INSTALLED)
def test_low_rank_export_reads_pre_transposed_weights_and_matches(tmp_path, runtime):
    torch.manual_seed(0)
    model = einfx.optimize(_Mlp(), Policy(default=Structure.low_rank(rank=96), fold_to_dense=False),
                           example_inputs=torch.randn(2, 8, D))
    x = torch.randn(2, 8, D)
    path = tmp_path / "lr.onnx"
    rep = einfx.export.to_onnx(model, x, path, latency_repeats=0)
    graph = onnx.load(path).graph
    constant = {i.name for i in graph.initializer}
    for node in graph.node:
        assert node.op_type != "Transpose", "a low-rank MLP exports with no Transpose at all"
        if node.op_type == "MatMul":
            assert node.input[1] in constant  # each GEMM reads a stored weight directly
    got = load(runtime, str(path))({"x": x.numpy()})[0]
    want = model(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_every_graph_pass_then_store_layouts_is_exact_on_a_btt_model(tmp_path):
    torch.manual_seed(1)
    model = einfx.optimize(_Mlp(), Policy(default=Structure.btt(rank=2), fold_to_dense=False),
                           example_inputs=torch.randn(2, 8, D))
    x = torch.randn(2, 8, D)
    path = tmp_path / "raw.onnx"
    einfx.export.to_onnx(model, x, path, latency_repeats=0, graph_passes=False)
    raw = onnx.load(path)
    full, counts = optimize_graph(raw)
    kept, _ = optimize_graph(raw, skip=("store_layouts",))
    assert counts["weight relayouts stored"] > 0 and len(full.graph.node) < len(kept.graph.node)
    feeds = {"x": x.numpy()}
    np.testing.assert_array_equal(ReferenceEvaluator(full).run(None, feeds)[0],
                                  ReferenceEvaluator(kept).run(None, feeds)[0])
