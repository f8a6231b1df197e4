"""Whole-graph rewrites are exact: random graphs and exported zoo models give the same outputs after them."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import einfx
from einfx import Structure
from einfx.export.graph_passes import (dedupe, fuse_siblings, optimize_graph, plain_norm_sums, prune, sink_transposes,
                                       transpose_pairs)
from einfx.export.runtimes import RUNTIMES, available, load

INSTALLED = [r for r in RUNTIMES if available(r)]


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _random_graph(seed: int, siblings: int = 3) -> onnx.ModelProto:
    """x (n, 4, 6) -> per sibling: Reshape(x) -> MatMul against a weight reached through Reshape / Transpose
    of an initializer (the exporter's weight-side ops) -> Transpose pairs -> Relu; summed. The reshapes of x
    are duplicates with differently named, equal shape constants; one sibling reads x directly."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(np.array([-1, 24], np.int64), "flat"))
    outs = []
    for k in range(siblings):
        width = int(rng.integers(2, 9))
        inits.append(numpy_helper.from_array(np.array([-1, 24], np.int64), f"flat_{k}"))  # equal by value
        w = rng.standard_normal((width, 24)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes += [helper.make_node("Reshape", ["x", f"flat_{k}"], [f"xf{k}"]),
                  helper.make_node("Transpose", [f"w{k}"], [f"wt{k}"], perm=[1, 0]),
                  helper.make_node("MatMul", [f"xf{k}", f"wt{k}"], [f"y{k}"]),
                  helper.make_node("Unsqueeze", [f"y{k}", "axis0"], [f"u{k}"]),
                  helper.make_node("Transpose", [f"u{k}"], [f"t{k}"], perm=[1, 2, 0]),
                  helper.make_node("Transpose", [f"t{k}"], [f"tt{k}"], perm=[2, 0, 1]),  # cancels the one before
                  helper.make_node("Relu", [f"tt{k}"], [f"r{k}"]),
                  helper.make_node("ReduceSum", [f"r{k}"], [f"s{k}"], keepdims=0)]
        outs.append(f"s{k}")
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    total = outs[0]
    for k, o in enumerate(outs[1:]):
        nodes.append(helper.make_node("Add", [total, o], [f"sum{k}"]))
        total = f"sum{k}"
    nodes.append(helper.make_node("Identity", [total], ["out"]))
    graph = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _run(model, x, runtime="onnxruntime"):
    return load(runtime, model)({"x": x})[0]


@pytest.mark.parametrize("runtime", INSTALLED)
@pytest.mark.parametrize("seed", range(4))
def test_rewrites_of_random_graphs_are_exact(seed, runtime):
    model = _random_graph(seed)
    x = np.random.default_rng(100 + seed).standard_normal((5, 4, 6)).astype(np.float32)
    expected = _run(model, x, runtime)
    rewritten, counts = optimize_graph(model)
    onnx.checker.check_model(rewritten)
    assert counts["deduplicated"] == 2  # the three reshapes of x become one
    assert counts["sibling matmuls fused"] == 2  # three MatMuls on one input become one
    assert counts["transpose pairs"] == 3
    ops = _ops(rewritten)
    assert ops["MatMul"] == 1 and ops["Split"] == 1 and ops["Reshape"] == 1 and ops["Transpose"] == 0
    np.testing.assert_allclose(_run(rewritten, x, runtime), expected, rtol=1e-5)


def test_each_pass_alone_is_exact_and_leaves_the_input_model_alone():
    model = _random_graph(7)
    before = model.SerializeToString()
    x = np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)
    expected = _run(model, x)
    for rewrite in (dedupe, fuse_siblings, sink_transposes, transpose_pairs, plain_norm_sums, prune):
        out, _ = rewrite(model)
        np.testing.assert_allclose(_run(out, x), expected, rtol=1e-5, err_msg=rewrite.__name__)
    assert model.SerializeToString() == before


def _ffn_graph(next_perm=(1, 2, 0), back=(-1, 4, 6), outside=False, bias_shape=(24,)) -> onnx.ModelProto:
    """A structured fc1's output meeting fc2's input, as einfx exports them: x (4, n, 6), the layer's own layout
    -> Transpose [1, 0, 2] -> Reshape (-1, 24) -> Reshape (1, -1, 24) -> + bias -> GELU (Erf form) -> Reshape
    back to (n, 4, 6) -> fc2's input Transpose ``next_perm`` -> MatMul against a constant."""
    rng = np.random.default_rng(0)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [c("s0", np.array([4, -1, 6], np.int64)), c("s1", np.array([-1, 24], np.int64)),
             c("s2", np.array([1, -1, 24], np.int64)), c("s3", np.array(back, np.int64)),
             c("bias", rng.standard_normal(bias_shape).astype(np.float32)), c("sqrt2", np.float32(np.sqrt(2))),
             c("one", np.ones((1, 1, 1), np.float32)), c("half", np.float32(0.5))]
    right = next_perm == (1, 0, 2)  # fc2 as x @ A (activation on the left), else A @ x
    a, b = back[1:]
    inits.append(c("w", rng.standard_normal((a, b, 3) if right else (a, 3, b)).astype(np.float32)))
    nodes = [helper.make_node("Reshape", ["x", "s0"], ["xr"]),
             helper.make_node("Transpose", ["xr"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["t", "s1"], ["r0"]),
             helper.make_node("Reshape", ["r0", "s2"], ["r1"]),
             helper.make_node("Add", ["r1", "bias"], ["b"]),
             helper.make_node("Div", ["b", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["b", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]),
             helper.make_node("Reshape", ["g", "s3"], ["u"]),
             helper.make_node("Transpose", ["u"], ["v"], perm=list(next_perm)),
             helper.make_node("MatMul", ["v", "w"] if right else ["w", "v"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "n", 6])]
    if outside:  # a value of the region read from outside it: a residual
        nodes.append(helper.make_node("Add", ["b", "res"], ["side"]))
        inputs.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, [1, "n", 24]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [a, "n", 3] if right else [a, 3, "n"])]
    if outside:
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, "n", 24]))
    graph = helper.make_graph(nodes, "ffn", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("runtime", INSTALLED)
@pytest.mark.parametrize("next_perm,left", [((1, 2, 0), 1), ((1, 0, 2), 0)], ids=["A@x", "x@A"])
def test_a_layer_output_transpose_sinks_to_the_next_layer_exactly(next_perm, left, runtime):
    model = _ffn_graph(next_perm)
    x = np.random.default_rng(1).standard_normal((4, 5, 6)).astype(np.float32)
    expected = load(runtime, model)({"x": x})[0]
    rewritten, counts = optimize_graph(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert counts["transposes sunk"] == 1 and counts["transpose pairs"] == 1
    # fc1's output Transpose and fc2's input Transpose become one [0, 2, 1] (a GEMM's transposed operand) or
    # cancel, and the bias, GELU and both reshapes run in fc1's own layout
    transposes = [n for n in rewritten.graph.node if n.op_type == "Transpose"]
    assert len(transposes) == left and all(list(n.attribute[0].ints) == [0, 2, 1] for n in transposes)
    assert _ops(rewritten)["Reshape"] == 1
    np.testing.assert_allclose(load(runtime, rewritten)({"x": x})[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("why,kwargs", [("a region value is read outside it", {"outside": True}),
                                        ("the reshape back gives another shape", {"back": (-1, 6, 4)}),
                                        ("a constant varies along more than the feature axis",
                                         {"bias_shape": (2, 1, 24)})])
def test_transposes_stay_where_sinking_would_change_the_result(why, kwargs):
    if "bias_shape" in kwargs:  # a (2, 1, 24) bias broadcasts the batch axis: nothing to move it to
        model = _ffn_graph()
        model.graph.initializer[4].CopyFrom(numpy_helper.from_array(np.ones((2, 1, 24), np.float32), "bias"))
    else:
        model = _ffn_graph(**kwargs)
    assert sink_transposes(model)[1] == 0, why


def test_passes_can_be_skipped_by_name():
    model = _ffn_graph()
    _, counts = optimize_graph(model, skip=("sink_transposes",))
    assert counts["transposes sunk"] == 0 and counts["transpose pairs"] == 0
    with pytest.raises(einfx.errors.ExportError, match=r"\['sink'\] are unknown; valid: dedupe, attention_biases, fuse_siblings"):
        optimize_graph(model, skip=("sink",))


def _norm_graph() -> onnx.ModelProto:
    """A post-norm residual block as BERT exports it: y = LN(x @ W + b + x), then a second norm of y + a
    constant (a bias Add read by a LayerNormalization, which is not a residual sum)."""
    rng = np.random.default_rng(3)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    inits = [c("w", rng.standard_normal((16, 16))), c("b", rng.standard_normal(16)), c("g", rng.random(16) + 0.5),
             c("beta", rng.standard_normal(16)), c("shift", rng.standard_normal(16))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["h"]),
             helper.make_node("Add", ["h", "x"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], axis=-1, epsilon=1e-12),
             helper.make_node("Add", ["y", "shift"], ["ys"]),
             helper.make_node("LayerNormalization", ["ys", "g", "beta"], ["z"], axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "norms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "n", 16])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, "n", 16])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("runtime", INSTALLED)
def test_a_residual_sum_read_by_a_norm_becomes_a_sum_exactly(runtime, tmp_path):
    import onnxruntime as ort

    model = _norm_graph()
    x = np.random.default_rng(4).standard_normal((2, 7, 16)).astype(np.float32)
    expected = load(runtime, model)({"x": x})
    out, count = plain_norm_sums(model)
    assert count == 1  # the residual h + x; the constant shift stays an Add
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Sum", "LayerNormalization", "Add",
                                                   "LayerNormalization"]
    for got, want in zip(load(runtime, out)({"x": x}), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if runtime == "onnxruntime":  # what the pass is for: onnxruntime no longer fuses the sum into its norm
        fused = {}
        for label, graph in (("before", model), ("after", out)):
            opts = ort.SessionOptions()
            opts.optimized_model_filepath = str(tmp_path / f"{label}.onnx")
            ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            fused[label] = _ops(onnx.load(str(tmp_path / f"{label}.onnx")))["SkipLayerNormalization"]
        assert fused == {"before": 1, "after": 0}


def test_siblings_need_the_same_leading_operand_shape():
    """x @ W (24, 3) and x @ V (1, 24, 3) broadcast differently: they stay apart; an activation operand too."""
    w = numpy_helper.from_array(np.ones((24, 3), np.float32), "w")
    v = numpy_helper.from_array(np.ones((1, 24, 3), np.float32), "v")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "v"], ["b"]),
             helper.make_node("MatMul", ["x", "xt"], ["c"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 24]),
                                           helper.make_tensor_value_info("xt", TensorProto.FLOAT, [24, 3])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abc"],
                              initializer=[w, v])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert fuse_siblings(model)[1] == 0


def zoo_bert(structure, layers: int = 2):
    """A small random BERT structured everywhere (no fold to dense), and its (ids, mask) example."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # intermediate 256: fc2 (256 -> 64) stays a BTT in the export (at 128 it is lowered as one GEMM)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=256,
                     vocab_size=100, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return einfx.optimize(model, einfx.Policy(default=structure, fold_to_dense=False), example_inputs=example), example


@pytest.mark.slow
@pytest.mark.parametrize("structure", [Structure.low_rank(rank=8), Structure.btt(rank=2)], ids=lambda s: s.name)
def test_qkv_of_a_zoo_bert_fuse_and_the_export_verifies(structure, tmp_path):
    opt, example = zoo_bert(structure)
    plain = einfx.export.to_onnx(opt, example, tmp_path / "plain.onnx", graph_passes=False, latency_repeats=0)
    fused = einfx.export.to_onnx(opt, example, tmp_path / "fused.onnx", latency_repeats=0)
    assert plain.verified and fused.verified  # against torch, at three shapes: the rewrites are exact
    assert fused.rewrites["sibling matmuls fused"] >= 2 * 2  # q, k, v -> one first GEMM, in both layers
    if structure.kind == "btt":  # fc1's output Transpose sinks through bias and GELU into fc2's, in both layers
        assert fused.rewrites["transposes sunk"] == 2
        assert fused.op_counts["Transpose"] <= plain.op_counts["Transpose"] - 2
    assert fused.op_counts["MatMul"] <= plain.op_counts["MatMul"] - 4
    feeds = {k: v.numpy() for k, v in example.items()}
    for runtime in INSTALLED:
        a = load(runtime, str(tmp_path / "plain.onnx"))
        b = load(runtime, str(tmp_path / "fused.onnx"))
        ya = a({k: feeds[k] for k in a.input_names})[0]
        yb = b({k: feeds[k] for k in b.input_names})[0]
        np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5 * np.abs(ya).max(), err_msg=runtime)


@pytest.mark.slow
def test_gate_and_up_of_a_zoo_llama_fuse_exactly(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=100, max_position_embeddings=32)
    model = LlamaModel(cfg).eval()
    example = {"input_ids": torch.randint(0, 100, (2, 10))}
    opt = einfx.optimize(model, einfx.Policy(default=Structure.low_rank(rank=8), fold_to_dense=False),
                         example_inputs=example)
    report = einfx.export.to_onnx(opt, example, tmp_path / "llama.onnx", latency_repeats=0)
    assert report.verified
    # q, k, v read one normalized tensor, gate and up another: 2 + 1 first GEMMs removed
    assert report.rewrites["sibling matmuls fused"] >= 3
    for runtime in INSTALLED:
        run = load(runtime, str(tmp_path / "llama.onnx"))
        got = run({"input_ids": example["input_ids"].numpy()})[0]
        with torch.no_grad():
            want = opt(**example).last_hidden_state.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=runtime)


def test_transpose_pairs_drops_identity_transposes_unless_they_make_a_graph_output():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 2]),  # a lone identity: read through
             helper.make_node("Relu", ["t"], ["z"]),
             helper.make_node("Transpose", ["z"], ["y"], perm=[0, 1, 2])]  # a graph output: stays
    graph = helper.make_graph(nodes, "identities", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    out, count = transpose_pairs(model)
    assert count == 1 and [n.output[0] for n in out.graph.node if n.op_type == "Transpose"] == ["y"]
    assert next(n for n in out.graph.node if n.output[0] == "z").input[0] == "r"
    x = np.random.default_rng(2).standard_normal((1, 3, 6)).astype(np.float32)
    np.testing.assert_array_equal(ReferenceEvaluator(out).run(None, {"x": x})[0],
                                  ReferenceEvaluator(model).run(None, {"x": x})[0])
