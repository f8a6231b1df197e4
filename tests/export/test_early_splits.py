"""split_before_gemms moves a token split and a batch-axis Transpose before a batched GEMM, exactly, and
merge_relayouts then makes the two Transposes around the GEMM one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from einfx.export.early_splits import split_before_gemms
from einfx.export.relayouts import merge_relayouts

H, R, K = 4, 3, 5


def _transposes(model) -> list[list[int]]:
    return [list(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]


def _key(side: int, dynamic: bool, q, from_transpose: bool = True) -> onnx.ModelProto:
    """x (R, H, n) -> Transpose -> the GEMM against a (H, K, R) core on the left (side 0), or x (n, H, R) ->
    Transpose -> the GEMM against a (H, R, K) core on the right (side 1); then a Reshape splitting the tokens
    n = b t and a Transpose ``q``. The split's target is a constant, or (``dynamic``) gathered from the Shape
    of a (b, t) input."""
    rng = np.random.default_rng(side)
    inits, nodes = [], []
    if side == 0:
        inits.append(numpy_helper.from_array(rng.standard_normal((H, K, R)).astype(np.float32), "core"))
        if from_transpose:
            nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]))  # (H, R, n)
        nodes.append(helper.make_node("MatMul", ["core", "xt" if from_transpose else "x"], ["y"]))  # (H, K, n)
        x_shape = [R, H, "n"] if from_transpose else [H, R, "n"]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((H, R, K)).astype(np.float32), "core"))
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]))  # (H, n, R)
        nodes.append(helper.make_node("MatMul", ["xt", "core"], ["y"]))  # (H, n, K)
        x_shape = ["n", H, R]
    if dynamic:
        inits.append(numpy_helper.from_array(np.array([H, K] if side == 0 else [H], np.int64), "head"))
        inits.append(numpy_helper.from_array(np.array([0, 1], np.int64), "which"))
        nodes += [helper.make_node("Shape", ["bt"], ["bt_shape"]),
                  helper.make_node("Gather", ["bt_shape", "which"], ["tokens"], axis=0)]
        parts = ["head", "tokens"] if side == 0 else ["head", "tokens", "tail"]
        if side == 1:
            inits.append(numpy_helper.from_array(np.array([K], np.int64), "tail"))
        nodes.append(helper.make_node("Concat", parts, ["target"], axis=0))
    else:
        inits.append(numpy_helper.from_array(np.array([H, K, 2, 3] if side == 0 else [H, 2, 3, K], np.int64), "target"))
    nodes += [helper.make_node("Reshape", ["y", "target"], ["split"]),
              helper.make_node("Transpose", ["split"], ["out"], perm=list(q))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if dynamic:
        inputs.append(helper.make_tensor_value_info("bt", TensorProto.FLOAT, ["b", "t"]))
    graph = helper.make_graph(nodes, "key", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    if not dynamic:  # a static split: n is 6
        for d in list(model.graph.input[0].type.tensor_type.shape.dim):
            if d.dim_param == "n":
                d.dim_value = 6
        model = onnx.shape_inference.infer_shapes(model)
    else:  # the exporter declares the split's dims, n = b * t
        for v in model.graph.value_info:
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param == "n":
                    d.dim_param = "b*t"
        for d in model.graph.input[0].type.tensor_type.shape.dim:
            if d.dim_param == "n":
                d.dim_param = "b*t"
        for v in [v for v in model.graph.value_info if v.name in ("split", "out")]:
            model.graph.value_info.remove(v)
        model.graph.value_info.append(helper.make_tensor_value_info(
            "split", TensorProto.FLOAT, [H, K, "b", "t"] if side == 0 else [H, "b", "t", K]))
    return model


def _feeds(model) -> dict:
    rng = np.random.default_rng(0)
    shape = [d.dim_value or 6 for d in model.graph.input[0].type.tensor_type.shape.dim]  # n = 6
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    if len(model.graph.input) > 1:
        feeds["bt"] = np.zeros((2, 3), np.float32)
    return feeds


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("side,q", [(0, (0, 2, 1, 3)), (1, (1, 0, 2, 3))])
def test_the_split_moves_before_the_gemm_and_the_two_transposes_become_one(side, q, dynamic):
    model = _key(side, dynamic, q)
    out, count = split_before_gemms(model)
    onnx.checker.check_model(out, full_check=True)
    assert count == 1
    feeds = _feeds(model)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(ReferenceEvaluator(out).run(None, feeds)[0], want, rtol=1e-5, atol=1e-6)
    merged, n = merge_relayouts(out)
    assert n == 1 and len(_transposes(merged)) == 1
    np.testing.assert_allclose(ReferenceEvaluator(merged).run(None, feeds)[0], want, rtol=1e-5, atol=1e-6)


def test_a_gemm_whose_activation_is_not_a_transpose_is_left_alone():
    model = _key(0, False, (0, 2, 1, 3), from_transpose=False)
    out, count = split_before_gemms(model)
    assert count == 0 and out is model


@pytest.mark.parametrize("side,q", [(0, (0, 2, 3, 1)), (0, (2, 0, 1, 3)), (1, (0, 1, 2, 3))])
def test_a_transpose_that_moves_a_matrix_axis_or_would_not_merge_is_left_alone(side, q):
    """(0, 2, 3, 1) moves the GEMM's output axis; (2, 0, 1, 3) after (1, 0, 2) composes into a general perm;
    the identity has nothing to merge."""
    out, count = split_before_gemms(_key(side, False, q))
    assert count == 0
