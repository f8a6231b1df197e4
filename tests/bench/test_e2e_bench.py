"""bench/e2e.py's transpose counts: a Transpose of constants alone (a weight's, which a runtime computes once) is
not an activation Transpose, in the file or in what the runtime runs."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from einfx.export.runtimes import RUNTIMES, available

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from e2e import activation_transposes, executed_transposes  # noqa: E402


def _graph(path) -> None:
    """x (n, 6) @ Transpose(w) (a weight's Transpose), then a Transpose of the activation and a Relu."""
    w = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"]),
             helper.make_node("Transpose", ["y"], ["t"], perm=[1, 0]),
             helper.make_node("Relu", ["t"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_the_file_count_leaves_the_weight_transpose_out(tmp_path):
    _graph(tmp_path / "g.onnx")
    assert activation_transposes(str(tmp_path / "g.onnx")) == 1


@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if available(r)])
def test_the_runtime_count_leaves_the_weight_transpose_out(runtime, tmp_path):
    _graph(tmp_path / "g.onnx")
    assert executed_transposes(runtime, str(tmp_path / "g.onnx")) == 1
