"""attention_biases drops the key bias and folds the value bias exactly, and only where the math allows."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import einfx
from einfx import Structure
from einfx.export.biases import attention_biases, relay_constant
from einfx.export.onnx_graph import value_shapes
from einfx.export.runtimes import RUNTIMES, available, load

INSTALLED = [r for r in RUNTIMES if available(r)]
B, S, H, DH = 2, 5, 2, 3
D = H * DH


def _attention(*, key_bias_shape=(D,), softmax_axis=-1, act_before_out=False, value_read_twice=False):
    """x -> q, k, v projections with biases -> heads -> softmax(q kᵀ · s + mask) v -> merge -> out projection +
    bias, written with static shapes (onnx's shape inference fills value_info)."""
    rng = np.random.default_rng(0)
    consts = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in [
        ("wq", (D, D)), ("wk", (D, D)), ("wv", (D, D)), ("wo", (D, D)), ("bq", (D,)), ("bk", key_bias_shape),
        ("bv", (D,)), ("bo", (D,))]}
    consts |= {"heads": np.array([B, S, H, DH], np.int64), "merged": np.array([B, S, D], np.int64),
               "scale": np.array(0.5, np.float32)}
    n = helper.make_node
    nodes = []
    for p in "qkv":
        nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"]), n("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                  n("Reshape", [f"{p}1", "heads"], [f"{p}2"])]
    nodes += [n("Transpose", ["q2"], ["q3"], perm=[0, 2, 1, 3]), n("Transpose", ["k2"], ["k3"], perm=[0, 2, 3, 1]),
              n("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]),
              n("MatMul", ["q3", "k3"], ["s0"]), n("Mul", ["s0", "scale"], ["s1"]), n("Add", ["s1", "mask"], ["s2"]),
              n("Softmax", ["s2"], ["p"], axis=softmax_axis), n("MatMul", ["p", "v3"], ["a0"]),
              n("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]), n("Reshape", ["a1", "merged"], ["a2"])]
    if act_before_out:
        nodes.append(n("Gelu", ["a2"], ["a3"]))
    nodes += [n("MatMul", ["a3" if act_before_out else "a2", "wo"], ["o0"]), n("Add", ["o0", "bo"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if value_read_twice:
        outputs.append(helper.make_tensor_value_info("v1", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, D]),
                             helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, 1, S])],
        outputs, initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _feeds():
    rng = np.random.default_rng(1)
    mask = np.zeros((B, 1, 1, S), np.float32)
    mask[1, ..., -2:] = -1e4  # the second sequence's last two positions are padding
    return {"x": rng.standard_normal((B, S, D)).astype(np.float32), "mask": mask}


def _adds(model) -> int:
    return collections.Counter(n.op_type for n in model.graph.node)["Add"]


@pytest.mark.parametrize("runtime", INSTALLED)
def test_key_bias_dropped_and_value_bias_folded_exactly(runtime):
    model = _attention()
    out, count = attention_biases(model)
    onnx.checker.check_model(out, full_check=True)
    assert count == 2 and _adds(out) == _adds(model) - 2
    kept = {i for n in out.graph.node if n.op_type == "Add" for i in n.input}
    assert "bk" not in kept and "bv" not in kept and "bq" in kept and "bo" not in kept  # bo replaced by bo + bv Wo
    want, got = load(runtime, model)(_feeds())[0], load(runtime, out)(_feeds())[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_folded_output_bias_is_the_value_bias_through_the_output_projection():
    model = _attention()
    out, _ = attention_biases(model)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    add = next(n for n in out.graph.node if n.op_type == "Add" and n.output[0] == "y")
    np.testing.assert_allclose(new[add.input[1]].reshape(-1), init["bo"] + init["bv"] @ init["wo"], rtol=1e-6)


def test_a_key_bias_that_varies_along_the_positions_stays():
    # a (S, D) constant is a per-position term, not a shift of each score row: only the value bias goes
    model = _attention(key_bias_shape=(S, D))
    out, count = attention_biases(model)
    assert count == 1
    assert "bk" in {i for n in out.graph.node for i in n.input}
    want, got = load("onnxruntime", model)(_feeds())[0], load("onnxruntime", out)(_feeds())[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_softmax_over_another_axis_leaves_both_biases():
    assert attention_biases(_attention(softmax_axis=2))[1] == 0


def test_a_nonlinear_op_before_the_next_bias_keeps_the_value_bias():
    out, count = attention_biases(_attention(act_before_out=True))
    assert count == 1 and "bv" in {i for n in out.graph.node for i in n.input}


def test_a_value_bias_read_elsewhere_stays():
    out, count = attention_biases(_attention(value_read_twice=True))
    assert count == 1 and "bv" in {i for n in out.graph.node for i in n.input}


def test_relay_constant_through_a_reshape_needs_whole_runs():
    model = _attention()
    shapes = value_shapes(model.graph)
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape" and n.output[0] == "v2")
    # (1, 1, D) -> (1, 1, H, DH): the batch and position runs broadcast, the feature run known
    c = np.arange(D, dtype=np.float32).reshape(1, 1, D)
    np.testing.assert_array_equal(relay_constant(c, reshape, {}, shapes), c.reshape(1, 1, H, DH))
    # a constant that varies along the positions but not the batch still splits run by run
    c2 = np.ones((1, S, D), np.float32)
    assert relay_constant(c2, reshape, {}, shapes).shape == (1, S, H, DH)
    merge = next(n for n in model.graph.node if n.op_type == "Reshape" and n.output[0] == "a2")
    # (B, S, H, DH) -> (B, S, D) ... a constant broadcast over only some of a run cannot be relaid
    odd = np.ones((1, 1, 1, DH), np.float32)
    assert relay_constant(odd, merge, {}, shapes) is None


def _zoo_bert(structure):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     vocab_size=100, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    example = {"input_ids": ids, "attention_mask": mask}
    if structure is None:
        return model, example
    return einfx.optimize(model, einfx.Policy(default=structure, fold_to_dense=False), example_inputs=example), example


@pytest.mark.parametrize("structure", [None, pytest.param(Structure.btt(rank=2), marks=pytest.mark.slow)],
                         ids=["dense", "btt"])
def test_a_zoo_bert_loses_two_bias_adds_a_block_and_still_verifies(structure, tmp_path):
    model, example = _zoo_bert(structure)
    plain = einfx.export.to_onnx(model, example, tmp_path / "plain.onnx", graph_passes=False, latency_repeats=0)
    folded = einfx.export.to_onnx(model, example, tmp_path / "folded.onnx", latency_repeats=0)
    assert plain.verified and folded.verified  # against torch at three shapes, padding masked
    assert folded.rewrites["attention biases folded"] == 2 * 2  # key and value, in both layers
    assert folded.op_counts["Add"] <= plain.op_counts["Add"] - 4
    feeds = {k: v.numpy() for k, v in example.items()}
    for runtime in INSTALLED:
        a, b = load(runtime, str(tmp_path / "plain.onnx")), load(runtime, str(tmp_path / "folded.onnx"))
        ya, yb = a({k: feeds[k] for k in a.input_names})[0], b({k: feeds[k] for k in b.input_names})[0]
        np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5 * np.abs(ya).max(), err_msg=runtime)
