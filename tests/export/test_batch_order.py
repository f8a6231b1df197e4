"""heads_first runs attention with its batch axes exchanged where that removes Transposes, exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from einfx.export.batch_order import heads_first
from einfx.export.relayouts import merge_relayouts

H, D = 4, 8


def _transposes(model) -> list[list[int]]:
    return [list(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]


def _attention(q_perm, k_perm, v_perm, q_shape, k_shape, v_shape, probs_out=False) -> onnx.ModelProto:
    """softmax(q kᵀ · scale + mask) v, then the head merge (b, t, heads, head dim); q, k and v reach it through
    Transposes of the given inputs, the mask is (b, 1, t, t)."""
    nodes = [helper.make_node("Transpose", ["qi"], ["q"], perm=q_perm),
             helper.make_node("Transpose", ["ki"], ["k"], perm=k_perm),
             helper.make_node("Transpose", ["vi"], ["v"], perm=v_perm),
             helper.make_node("MatMul", ["q", "k"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["c"]),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1, 3])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in [("qi", q_shape), ("ki", k_shape), ("vi", v_shape), ("mask", ["b", 1, "t", "t"])]]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if probs_out:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _feeds(model, b=2, t=5) -> dict:
    rng = np.random.default_rng(0)
    sizes = {"b": b, "t": t}
    feeds = {}
    for v in model.graph.input:
        shape = [d.dim_value or sizes[d.dim_param] for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["mask"] = np.where(rng.random(feeds["mask"].shape) < 0.2, -1e4, 0).astype(np.float32)
    return feeds


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    feeds = _feeds(a)
    for want, got in zip(ReferenceEvaluator(a).run(None, feeds), ReferenceEvaluator(b).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_head_aligned_q_and_v_lose_their_head_splits_and_the_mask_is_reshaped_not_transposed():
    """q and v arrive as (heads, b, t, head dim), k as (heads, head dim, b, t): with the heads first, q's and
    v's splits are gone, k's moves one axis, the merge moves one axis, and the mask (b, 1, t, t) becomes
    (1, b, t, t) by Squeeze and Unsqueeze."""
    model = _attention([1, 0, 2, 3], [2, 0, 1, 3], [1, 0, 2, 3], [H, "b", "t", D], [H, D, "b", "t"],
                       [H, "b", "t", D])
    out, removed = heads_first(model)
    onnx.checker.check_model(out, full_check=True)
    assert removed == 2
    assert _transposes(out) == [[0, 2, 1, 3], [1, 2, 0, 3]]
    assert {"Squeeze", "Unsqueeze"} <= {n.op_type for n in out.graph.node}
    softmax = next(n for n in out.graph.node if n.op_type == "Softmax")
    assert softmax.attribute[0].i == 3
    _same(model, out)


def test_a_dense_attention_is_left_as_it_was():
    """q, k and v split from (b, t, heads, head dim): exchanging the batch axes would make k's split a
    general perm, so nothing changes."""
    model = _attention([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3], ["b", "t", H, D], ["b", "t", H, D],
                       ["b", "t", H, D])
    out, removed = heads_first(model)
    assert removed == 0 and out is model


def test_a_region_value_read_outside_it_keeps_the_region_as_it_was():
    model = _attention([1, 0, 2, 3], [2, 0, 1, 3], [1, 0, 2, 3], [H, "b", "t", D], [H, D, "b", "t"],
                       [H, "b", "t", D], probs_out=True)
    out, removed = heads_first(model)
    assert removed == 0 and out is model


def test_a_key_relaid_before_its_split_is_priced_with_the_merge_the_exchange_makes_possible():
    """k leaves its last GEMM as (heads, n, head dim) and reaches attention through (1, 0, 2), a Reshape to
    (b, t, heads, head dim) and (0, 2, 3, 1): two Transposes that cannot merge (the merged perm would be
    (1, 0, 3, 2)). With the heads first they merge into a swap of the last two axes, so the exchange is made
    and q's and v's splits go."""
    b, t = 2, 5
    nodes = [helper.make_node("Transpose", ["kx"], ["kt"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["kt", "k_shape"], ["kr"]),
             helper.make_node("Transpose", ["qi"], ["q"], perm=[1, 0, 2, 3]),
             helper.make_node("Transpose", ["kr"], ["k"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["vi"], ["v"], perm=[1, 0, 2, 3]),
             helper.make_node("MatMul", ["q", "k"], ["s"]),
             helper.make_node("Add", ["s", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["c"]),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1, 3])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in
              [("qi", [H, b, t, D]), ("kx", [H, b * t, D]), ("vi", [H, b, t, D]), ("mask", [b, 1, t, t])]]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.array([b, t, H, D], np.int64), "k_shape")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    out, removed = heads_first(model)
    assert removed == 2  # q's and v's splits
    merged, count = merge_relayouts(out)
    assert count == 1 and sorted(_transposes(merged)) == [[0, 1, 3, 2], [1, 2, 0, 3]]
    _same(model, merged)
