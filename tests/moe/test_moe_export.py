"""ONNX export with a dynamic batch: static k, no data-dependent shapes, onnxruntime parity at 3 batch sizes."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import einfx
from einfx.moe import MoEFeedForward

pytestmark = pytest.mark.slow  # each export takes several seconds on two cores

BATCHES = (1, 3, 17)
# ops whose output shape depends on data; none may appear
DATA_DEPENDENT_OPS = {"NonZero", "Compress", "Unique", "Loop", "If"}


def _export_and_check(module, path, d_in):
    module.eval()
    x = torch.randn(2, 5, d_in)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & DATA_DEPENDENT_OPS, ops
    assert "Einsum" not in ops and "TopK" not in ops  # ties are broken by explicit ranks
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in BATCHES:
        xb = torch.randn(b, 5, d_in)
        with torch.no_grad():
            want = module(xb).numpy()
        got = sess.run(None, {name: xb.numpy()})[0]
        assert got.shape == want.shape
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < 1e-5, (b, rel)
    return ops


@pytest.mark.parametrize("path", ["masked", "sparse"])
def test_btt_moe_exports_once_for_every_batch_size(tmp_path, path):
    torch.manual_seed(0)
    layer = einfx.EinsumLinear(64, 48, einfx.Structure.btt_moe(experts=4, k=2))
    with torch.no_grad():
        layer.gate.normal_()
    layer.set_path(path)
    ops = _export_and_check(layer, tmp_path / f"moe_{path}.onnx", 64)
    assert ("Gather" in ops) == (path == "sparse")  # the sparse path gathers expert slices


def test_auto_path_and_standard_moe_export(tmp_path):
    torch.manual_seed(1)
    layer = einfx.EinsumLinear(60, 50, einfx.Structure.btt_moe(experts=3, k=1))  # padded sizes
    with torch.no_grad():
        layer.gate.normal_()
    _export_and_check(layer, tmp_path / "moe_auto.onnx", 60)
    block = MoEFeedForward(24, 16, experts=4, k=2)  # "auto": masked while exporting
    with torch.no_grad():
        block.gate.normal_()
    _export_and_check(block, tmp_path / "ffn.onnx", 24)
