"""share_relayouts is exact, makes one Transpose (and one second GEMM) of the siblings', leaves other shapes of
graph alone, and is timed with sibling fusion, never without it."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from einfx.export.graph_passes import fuse_siblings, optimize_graph
from einfx.export.pass_choice import choose_passes
from einfx.export.runtimes import RUNTIMES, available, load
from einfx.export.shared_relayouts import share_relayouts

INSTALLED = [r for r in RUNTIMES if available(r)]
PERMS = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]
B, A, C, K = 4, 2, 3, 5  # blocks, the row factor merged into them, rows per slice, contraction


def _siblings(seed: int, perm, second: str = "stacked", siblings: int = 3, targets=None) -> onnx.ModelProto:
    """x (B, K, n) -> per sibling: MatMul(C_i (B, A·C, K), x) -> Reshape (B·A, C, n) -> Transpose ``perm``,
    then, for the perm (1, 2, 0), ``second``: "stacked" a MatMul against a constant (C, B·A, 7) core, "mixed"
    such cores of two widths, "none" a Relu (the only choice for other perms); each result is a graph output."""
    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], []
    targets = targets or [[B * A, C, -1]] * siblings
    for k in range(siblings):
        inits.append(numpy_helper.from_array(rng.standard_normal((B, A * C, K)).astype(np.float32), f"c{k}"))
        inits.append(numpy_helper.from_array(np.array(targets[k], np.int64), f"shape{k}"))
        nodes += [helper.make_node("MatMul", [f"c{k}", "x"], [f"y{k}"]),
                  helper.make_node("Reshape", [f"y{k}", f"shape{k}"], [f"r{k}"]),
                  helper.make_node("Transpose", [f"r{k}"], [f"t{k}"], perm=perm)]
        if second != "none" and perm == [1, 2, 0]:  # (C, n, B·A): each slice times a (C, B·A, width) core
            width = 6 if second == "mixed" and k == 0 else 7
            inits.append(numpy_helper.from_array(rng.standard_normal((C, B * A, width)).astype(np.float32), f"d{k}"))
            nodes.append(helper.make_node("MatMul", [f"t{k}", f"d{k}"], [f"out{k}"]))
        else:
            nodes.append(helper.make_node("Relu", [f"t{k}"], [f"out{k}"]))
        outs.append(helper.make_tensor_value_info(f"out{k}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, K, "n"])],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _outputs(model, x, runtime=None):
    if runtime is None:
        return ReferenceEvaluator(model).run(None, {"x": x})
    return load(runtime, model)({"x": x})


@pytest.mark.parametrize("perm", PERMS)
def test_the_shared_relayout_gives_every_sibling_the_same_entries(perm):
    model = fuse_siblings(_siblings(0, perm))[0]
    x = np.random.default_rng(1).standard_normal((B, K, 8)).astype(np.float32)
    shared, removed = share_relayouts(model)
    onnx.checker.check_model(shared)
    assert removed == 2
    ops = _ops(shared)
    assert ops["Transpose"] == 1 and ops["Split"] == 1 and ops["Reshape"] == 1
    stacked = perm == [1, 2, 0]  # the slices' second GEMMs become one
    assert ops["MatMul"] == (2 if stacked else 1)
    for got, want in zip(_outputs(shared, x), _outputs(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("runtime", INSTALLED)
def test_the_whole_pipeline_with_shared_relayouts_is_exact_in_each_runtime(runtime):
    model = _siblings(2, [1, 2, 0])
    x = np.random.default_rng(3).standard_normal((B, K, 16)).astype(np.float32)
    rewritten, counts = optimize_graph(model)
    assert counts["sibling matmuls fused"] == 2 and counts["sibling relayouts shared"] == 2
    assert _ops(rewritten)["Transpose"] == 1 and _ops(rewritten)["MatMul"] == 2
    for got, want in zip(_outputs(rewritten, x, runtime), _outputs(model, x, runtime)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_second_gemms_of_two_shapes_stay_apart_but_the_relayout_is_shared():
    model = fuse_siblings(_siblings(4, [1, 2, 0], second="mixed"))[0]
    shared, removed = share_relayouts(model)
    assert removed == 2 and _ops(shared)["MatMul"] == 4 and _ops(shared)["Transpose"] == 1
    x = np.random.default_rng(5).standard_normal((B, K, 8)).astype(np.float32)
    for got, want in zip(_outputs(shared, x), _outputs(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["perms differ", "targets differ", "a slice read twice", "not the rows"])
def test_siblings_that_do_not_relay_alike_are_left_alone(case):
    if case == "perms differ":
        model = fuse_siblings(_siblings(6, [1, 2, 0]))[0]
        next(n for n in model.graph.node if n.op_type == "Transpose").attribute[0].ints[:] = [1, 0, 2]
    elif case == "targets differ":
        model = fuse_siblings(_siblings(6, [1, 2, 0], targets=[[B * A, C, -1]] * 2 + [[B, A * C, -1]]))[0]
    elif case == "a slice read twice":
        model = fuse_siblings(_siblings(6, [1, 2, 0]))[0]
        split = next(n for n in model.graph.node if n.op_type == "Split")
        model.graph.node.append(helper.make_node("Relu", [split.output[0]], ["extra"]))
        model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    else:  # a Split along the batch axis is not a split of the first cores' rows
        model = fuse_siblings(_siblings(6, [1, 2, 0]))[0]
        next(n for n in model.graph.node if n.op_type == "Split").attribute[0].i = 0
    rewritten, removed = share_relayouts(model)
    assert removed == 0 and rewritten is model


def test_sharing_is_timed_only_together_with_sibling_fusion():
    model = _siblings(7, [1, 2, 0])
    asked = []

    def timer(fns):
        asked.append(sorted(fns))
        for fn in fns.values():
            fn()
        return {k: 0.5 if k == "without share_relayouts" else 1.0 for k in fns}
    x = np.random.default_rng(8).standard_normal((B, K, 16)).astype(np.float32)
    graph, choice = choose_passes(model, "onnxruntime", {"x": x}, timer=timer)
    assert asked == [["all passes", "without fuse_siblings, share_relayouts", "without share_relayouts"]]
    assert choice.skipped == ("share_relayouts",) and choice.counts["sibling relayouts shared"] == 0
    assert choice.counts["sibling matmuls fused"] == 2 and _ops(graph)["Transpose"] == 3
