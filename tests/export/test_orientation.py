"""orient_gemms is exact, never makes the Transposes dearer, and removes the swap between a BTT MLP's fc1 and
fc2."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import einfx
from einfx import Policy, Structure
from einfx.export.graph_passes import constant_values, optimize_graph
from einfx.export.orientation import orient_gemms, transpose_cost
from einfx.export.runtimes import RUNTIMES, available, load

INSTALLED = [r for r in RUNTIMES if available(r)]
PERMS = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]


def _transposes(model) -> list[list[int]]:
    return [list(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]


def _activation_transposes(model) -> int:
    values = constant_values(model.graph)
    return sum(n.op_type == "Transpose" and n.input[0] not in values for n in model.graph.node)


def _cost(model) -> float:
    """The Transposes priced as orient_gemms prices them (`transpose_cost`: entries, a general perm and a moved
    last axis dearer), the symbolic axis counted as 1."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.value_info) + list(model.graph.input)}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "Transpose":
            dims = [(d, ()) if isinstance(d, int) else (1, (d,)) for d in shapes[node.input[0]]]
            total += transpose_cost(list(node.attribute[0].ints), dims)
    return total


def _chain(seed: int, gemms: int) -> onnx.ModelProto:
    """x (4, 6, n) through ``gemms`` batched GEMMs against random constant cores (left or right), with a
    random rank-3 Transpose (or none) before each and after the last, and sometimes a bias and a Relu after
    a GEMM; shapes inferred by onnx, n symbolic."""
    rng = np.random.default_rng(seed)
    nodes, inits, shape, name = [], [], [4, 6, "n"], "x"
    for k in range(gemms + 1):
        perm = PERMS[rng.integers(len(PERMS))]
        if perm != [0, 1, 2]:
            nodes.append(helper.make_node("Transpose", [name], [f"t{k}"], perm=perm))
            name, shape = f"t{k}", [shape[a] for a in perm]
        if k == gemms:
            break
        batch = shape[0]
        if not isinstance(batch, int):  # the tokens went first: a batch the cores cannot have, so move them
            nodes.append(helper.make_node("Transpose", [name], [f"u{k}"], perm=[1, 0, 2]))
            name, shape = f"u{k}", [shape[1], shape[0], shape[2]]
            batch = shape[0]
        width = int(rng.integers(2, 6))
        if isinstance(shape[2], int) and (not isinstance(shape[1], int) or rng.random() < 0.5):
            core = rng.standard_normal((batch, shape[2], width)).astype(np.float32)  # x @ C
            inputs, shape = [name, f"c{k}"], [batch, shape[1], width]
        else:
            core = rng.standard_normal((batch, width, shape[1])).astype(np.float32)  # C @ x
            inputs, shape = [f"c{k}", name], [batch, width, shape[2]]
        inits.append(numpy_helper.from_array(core, f"c{k}"))
        nodes.append(helper.make_node("MatMul", inputs, [f"y{k}"]))
        name = f"y{k}"
        if rng.random() < 0.4:
            bias = rng.standard_normal([d if isinstance(d, int) and rng.random() < 0.5 else 1
                                        for d in shape]).astype(np.float32)
            inits.append(numpy_helper.from_array(bias, f"bias{k}"))
            nodes += [helper.make_node("Add", [name, f"bias{k}"], [f"a{k}"]),
                      helper.make_node("Relu", [f"a{k}"], [f"r{k}"])]
            name = f"r{k}"
    nodes.append(helper.make_node("Identity", [name], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6, "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


@pytest.mark.parametrize("seed", range(40))
def test_a_random_chain_runs_exactly_as_before_with_no_more_transposes(seed):
    model = _chain(seed, gemms=1 + seed % 4)
    out, flipped = orient_gemms(model)
    onnx.checker.check_model(out, full_check=True)
    assert (flipped == 0) == (out is model)
    assert flipped <= sum(n.op_type == "MatMul" for n in model.graph.node)
    assert _cost(out) <= _cost(model)
    x = np.random.default_rng(seed).standard_normal((4, 6, 5)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = ReferenceEvaluator(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_swap_between_two_gemms_disappears_and_the_next_transpose_moves_one_block():
    """C2 @ Transpose(C1 @ x, (0, 2, 1)) -> Transpose(..., (2, 0, 1)): with the second GEMM flipped, the swap
    is gone and the last Transpose becomes (1, 0, 2)."""
    rng = np.random.default_rng(0)
    c1, c2 = rng.standard_normal((4, 6, 6)).astype(np.float32), rng.standard_normal((4, 6, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["c1", "x"], ["y1"]),
             helper.make_node("Transpose", ["y1"], ["t1"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t1", "c2"], ["y2"]),
             helper.make_node("Transpose", ["y2"], ["y"], perm=[2, 0, 1])]
    graph = helper.make_graph(nodes, "swap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6, "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(c1, "c1"), numpy_helper.from_array(c2, "c2")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    out, flipped = orient_gemms(model)
    assert flipped == 1 and _transposes(out) == [[1, 0, 2]]
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(out).run(None, {"x": x})[0],
                               ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_flip_that_needs_a_new_transpose_after_a_region_keeps_the_graph_valid():
    """Transpose (2, 1, 0), a general perm, feeds C @ x, then a bias and a Relu that the graph output reads:
    flipped, the GEMM reads a one-block Transpose, and a swap after the Relu (read from the region's exit,
    which keeps its name) restores the layout: two cheap Transposes for one slow one."""
    rng = np.random.default_rng(0)
    core, bias = rng.standard_normal((4, 3, 6)).astype(np.float32), rng.standard_normal((4, 3, 1)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 1, 0]),
             helper.make_node("MatMul", ["core", "t"], ["g"]),
             helper.make_node("Add", ["g", "bias"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Identity", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "region", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 6, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(core, "core"), numpy_helper.from_array(bias, "bias")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    out, flipped = orient_gemms(model)
    onnx.checker.check_model(out, full_check=True)
    assert flipped == 1 and sorted(_transposes(out)) == [[0, 2, 1], [2, 0, 1]] and _cost(out) < _cost(model)
    x = rng.standard_normal((5, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(out).run(None, {"x": x})[0],
                               ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_chain_that_flipping_cannot_improve_is_returned_as_it_was():
    model = _chain(0, gemms=0)
    out, flipped = orient_gemms(model)
    assert flipped == 0 and out is model


@pytest.mark.parametrize("runtime", INSTALLED)
def test_a_btt_mlp_loses_the_transpose_between_fc1_and_fc2_and_runs_like_torch(runtime, tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384)).eval()
    model = einfx.optimize(mlp, Policy(default=Structure.btt(rank=1), fold_to_dense=False),
                           example_inputs=(torch.randn(8, 384),))
    einfx.export.to_onnx(model, (torch.randn(8, 384),), tmp_path / "m.onnx", graph_passes=False, latency_repeats=0,
                         dynamic_axes={0: {0: "tokens"}})
    exported = onnx.load(str(tmp_path / "m.onnx"))
    without, _ = optimize_graph(exported, skip=("orient_gemms",))
    full, counts = optimize_graph(exported)
    onnx.checker.check_model(full, full_check=True)
    assert counts["GEMMs flipped by orientation"] >= 1
    assert _activation_transposes(full) == _activation_transposes(without) - 1
    x = torch.randn(13, 384)
    with torch.no_grad():
        want = model(x).numpy()
    run = load(runtime, full)
    got = run({run.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
