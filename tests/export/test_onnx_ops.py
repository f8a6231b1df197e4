"""Static checks of ONNX files: op counts (subgraphs and local functions included), no Einsum, checker."""

import onnx
import pytest
from onnx import TensorProto, helper

from einfx.errors import ExportError
from einfx.export import check_onnx, op_counts


def _model(nodes, functions=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph(nodes, "g", [x], [y])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_op_counts_expand_local_functions(tmp_path):
    body = [helper.make_node("MatMul", ["a", "a"], ["t"]), helper.make_node("Relu", ["t"], ["b"])]
    fn = helper.make_function("local", "MyLinear", ["a"], ["b"], body, [helper.make_opsetid("", 18)])
    nodes = [helper.make_node("MyLinear", ["x"], ["h"], domain="local"), helper.make_node("MyLinear", ["h"], ["y"], domain="local")]
    model = _model(nodes, [fn])
    assert op_counts(model) == {"MatMul": 2, "Relu": 2}
    path = tmp_path / "f.onnx"
    onnx.save(model, path)
    assert op_counts(path) == {"MatMul": 2, "Relu": 2}


def test_op_counts_enter_subgraphs():
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 2])])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["o2"])], "else", [],
                              [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2, 2])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    assert op_counts(_model(nodes)) == {"Abs": 1, "Cast": 1, "If": 1, "Neg": 1, "ReduceSum": 1}


def test_check_onnx_refuses_einsum_naming_the_node(tmp_path):
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,jk->ik", name="slow_einsum")
    path = tmp_path / "e.onnx"
    onnx.save(_model([node]), path)
    with pytest.raises(ExportError, match=r"1 Einsum node.*'slow_einsum'.*forbidden ops: Einsum"):
        check_onnx(path)
    assert check_onnx(path, forbid=()) == {"Einsum": 1}


def test_check_onnx_runs_the_full_checker(tmp_path):
    # The output's declared rank (2) contradicts what Transpose with a 3-axis perm can produce.
    node = helper.make_node("Transpose", ["x"], ["y"], perm=[2, 0, 1])
    path = tmp_path / "bad.onnx"
    onnx.save(_model([node]), path)
    with pytest.raises(ExportError, match=r"bad\.onnx: the ONNX checker \(full_check=True\) rejected"):
        check_onnx(path)
