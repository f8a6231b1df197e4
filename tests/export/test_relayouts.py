"""merge_relayouts is exact, merges only into a Transpose that moves one block of axes, and leaves the rest."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import einfx
from einfx.export.graph_passes import optimize_graph
from einfx.export.relayouts import merge_relayouts, moves_one_axis
from einfx.export.runtimes import RUNTIMES, available, load

INSTALLED = [r for r in RUNTIMES if available(r)]


def _transposes(model) -> list[list[int]]:
    return [list(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]


def _static(x_shape, first, target, last) -> onnx.ModelProto:
    """x -> Transpose(first) -> Reshape(target) -> Transpose(last), shapes inferred by onnx."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=list(first)),
             helper.make_node("Reshape", ["t", "target"], ["e"]),
             helper.make_node("Transpose", ["e"], ["y"], perm=list(last))]
    graph = helper.make_graph(nodes, "relayout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.array(target, np.int64), "target")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _exported(module, example, dynamic_axes, path) -> onnx.ModelProto:
    """``module`` as einfx exports it, before any whole-graph pass."""
    einfx.export.to_onnx(module, (example,), path, graph_passes=False, latency_repeats=0, dynamic_axes=dynamic_axes)
    return onnx.load(str(path))


def _assert_runs_like(module, model, x: np.ndarray) -> None:
    """``model`` gives ``module``'s output on ``x`` in every installed runtime."""
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    for runtime in INSTALLED:
        run = load(runtime, model)
        got = run({run.input_names[0]: x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=runtime)


@pytest.mark.parametrize("runtime", INSTALLED)
@pytest.mark.parametrize("case,expected", [
    # runs (2)(4,5)(3): x's axes (2, 3) stay together, and the second Transpose undoes the first: a Reshape
    (((2, 3, 4, 5), (0, 2, 3, 1), (2, 20, 3), (0, 2, 1)), []),
    # runs (3)(2,4): t's run (2, 4) is x's axes 0 and 2, apart; e's run 8 lands first, in order: one Transpose
    # of x, then a Reshape
    (((2, 3, 4), (1, 0, 2), (3, 8), (1, 0)), [[0, 2, 1]]),
], ids=["cancel", "transpose-then-reshape"])
def test_two_transposes_around_a_reshape_become_at_most_one_exactly(case, expected, runtime):
    x_shape, first, target, last = case
    model = _static(x_shape, first, target, last)
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    want = load(runtime, model)({"x": x})[0]
    out, count = merge_relayouts(model)
    onnx.checker.check_model(out, full_check=True)
    assert count == 1 and _transposes(out) == expected
    np.testing.assert_array_equal(load(runtime, out)({"x": x})[0], want)


def test_a_merge_into_a_strided_transpose_is_left_alone():
    # (2, 3, 4, 5) -> (0, 2, 1, 3) -> (8, 15) -> (1, 0): one Transpose would be (1, 3, 0, 2), no block moved whole
    model = _static((2, 3, 4, 5), (0, 2, 1, 3), (8, 15), (1, 0))
    assert merge_relayouts(model)[1] == 0
    assert moves_one_axis([2, 0, 1, 3], [(d, ()) for d in (12, 32, 8, 128)])  # features moved past the tokens
    assert not moves_one_axis([2, 0, 3, 1], [(d, ()) for d in (12, 32, 8, 128)])
    assert moves_one_axis([2, 0, 1], [(16, ()), (24, ()), (1, ("batch", "sequence"))])  # a 2-D transpose
    assert moves_one_axis([1, 0, 3, 2], [(1, ()), (3, ()), (1, ()), (5, ())])  # unit axes go anywhere
    assert not moves_one_axis([1, 0, 3, 2], [(2, ()), (3, ()), (4, ()), (5, ())])


def test_a_reshape_that_splits_runs_differently_is_left_alone():
    # t (2, 6) -> (3, 4): no run boundary lines up but the whole, and x's axes are swapped inside it
    model = _static((6, 2), (1, 0), (3, 4), (1, 0))
    assert merge_relayouts(model)[1] == 0


class _KeyProjection(nn.Module):
    """A BTT-like layer's output as einfx lowers it, (16, 24, n) relaid to (n, 384), its bias (and an
    activation), then attention's head split (b, t, 12, 32) -> ``heads`` perm."""

    def __init__(self, heads, act: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 24, 24, generator=g))
        self.b = nn.Parameter(torch.randn(384, generator=g))
        self.heads, self.act = heads, act

    def forward(self, h):
        b, t, _ = h.shape
        x = h.reshape(-1, 16, 24).permute(1, 2, 0)
        y = torch.matmul(self.w, x).permute(2, 0, 1).reshape(-1, 384).reshape(b, t, 384) + self.b
        if self.act:
            y = torch.nn.functional.gelu(y)
        return y.view(b, t, 12, 32).permute(*self.heads)


@pytest.mark.parametrize("act", [False, True], ids=["bias", "bias+gelu"])
@pytest.mark.parametrize("heads,merged", [((0, 2, 3, 1), True), ((0, 2, 1, 3), False)], ids=["key", "query"])
def test_an_exported_layer_output_and_head_split_merge_exactly(heads, merged, act, tmp_path):
    """The exporter's own graph (dynamic batch and sequence, value_info with "batch*sequence"): the key's
    head split (b, 12, 32, t) merges into one Transpose moving the features past the tokens; the query's
    (b, 12, t, 32) would need a strided 4-D one and stays two Transposes."""
    module = _KeyProjection(heads, act).eval()
    model = _exported(module, torch.randn(2, 5, 384), {0: {1: "sequence"}}, tmp_path / "k.onnx")
    out, count = merge_relayouts(model)
    before, after = len(_transposes(model)), len(_transposes(out))
    assert count == int(merged) and after == before - int(merged)
    h2 = np.random.default_rng(1).standard_normal((3, 7, 384)).astype(np.float32)  # another batch and length
    _assert_runs_like(module, out, h2)
    full, counts = optimize_graph(model)
    assert counts["relayouts merged"] == int(merged)


def test_a_value_read_twice_on_the_way_is_left_alone():
    """The reshaped value is also a graph output: nothing on the way may vanish."""
    model = _static((2, 3, 4, 5), (0, 2, 3, 1), (2, 20, 3), (0, 2, 1))
    model.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    assert merge_relayouts(model)[1] == 0
    ops = collections.Counter(n.op_type for n in merge_relayouts(model)[0].graph.node)
    assert ops["Transpose"] == 2


class _AlignedQuery(nn.Module):
    """A layer whose output factorization matches the heads, (12, 32) = (heads, head dim), lowered as einfx does
    it, w · Transpose(x) -> (12, 32, n), relaid to (n, 384) and split into the query's (b, 12, t, 32)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(12, 32, 32, generator=g))
        self.b = nn.Parameter(torch.randn(384, generator=g))

    def forward(self, h):
        b, t, _ = h.shape
        x = h.reshape(-1, 12, 32).permute(1, 2, 0)
        y = torch.matmul(self.w, x).permute(2, 0, 1).reshape(-1, 384).reshape(b, t, 384) + self.b
        return y.view(b, t, 12, 32).permute(0, 2, 1, 3)


def test_a_head_aligned_layer_computes_its_last_gemm_transposed_to_merge_with_the_head_split(tmp_path):
    """(12, 32, n) -> (b, 12, t, 32) needs a strided 4-D Transpose; written as (xᵀ wᵀ), the GEMM yields
    (12, n, 32) for the same work, and the relayout and the head split become one Transpose that moves the
    batch axis alone. The Transpose feeding the GEMM changes its perm but stays one."""
    module = _AlignedQuery().eval()
    model = _exported(module, torch.randn(2, 5, 384), {0: {1: "sequence"}}, tmp_path / "q.onnx")
    out, count = merge_relayouts(model)
    onnx.checker.check_model(out, full_check=True)
    assert count == 1 and len(_transposes(out)) == len(_transposes(model)) - 1
    matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
    weights = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert matmul.input[1] in weights and weights[matmul.input[1]].shape == (12, 32, 32)  # x first, then wᵀ
    _assert_runs_like(module, out, np.random.default_rng(1).standard_normal((3, 7, 384)).astype(np.float32))


class _AlignedOutputProjection(nn.Module):
    """Attention's head merge (b, 12, t, 32) -> (n, 384) read by a layer whose input factorization matches the
    heads: Transpose to (12, 32, n), the first core (12, 16, 32), the Transpose between the cores, the second."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(12, 16, 32, generator=g))
        self.b = nn.Parameter(torch.randn(16, 24, 12, generator=g))

    def forward(self, heads):
        b, _, t, _ = heads.shape
        x = heads.transpose(1, 2).reshape(-1, 12, 32).permute(1, 2, 0)
        z = torch.matmul(self.b, torch.matmul(self.a, x).permute(1, 0, 2))
        return z.permute(2, 0, 1).reshape(b, t, 384)


def test_a_head_merge_into_an_aligned_layer_computes_its_first_gemm_transposed(tmp_path):
    """The head merge and the layer's input relayout, (b, 12, t, 32) -> (12, 32, n), would be a general 4-D
    perm; the first GEMM computed as xᵀ aᵀ reads (12, n, 32), one Transpose moving the heads' axis, and the
    Transpose between the cores changes its perm instead."""
    module = _AlignedOutputProjection().eval()
    model = _exported(module, torch.randn(2, 12, 5, 32), {0: {2: "sequence"}}, tmp_path / "o.onnx")
    out, count = merge_relayouts(model)
    onnx.checker.check_model(out, full_check=True)
    assert count == 1 and len(_transposes(out)) == len(_transposes(model)) - 1
    _assert_runs_like(module, out, np.random.default_rng(1).standard_normal((3, 12, 7, 32)).astype(np.float32))
