"""`to_onnx`: parity for every named structure, dtypes, external data, failures that leave no file."""

import os
import shutil
import warnings

import onnx
import pytest
import torch
from torch import nn

import einfx
from einfx.errors import ExportError
from einfx.export import onnx_export, to_onnx
from einfx.export.session import resolve_device

STRUCTURES = {
    "dense": einfx.Structure.dense(),
    "low_rank": einfx.Structure.low_rank(rank=8),
    "kronecker": einfx.Structure.kronecker(),
    "tensor_train": einfx.Structure.tensor_train(rank=2),
    "btt": einfx.Structure.btt(rank=2),
    "monarch": einfx.Structure.monarch(),
    "theta": einfx.Structure.from_theta((0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.25)),
    "btt_moe": einfx.Structure.btt_moe(experts=4, k=2),
}


def _mlp(structure, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(einfx.EinsumLinear(64, 96, structure), nn.GELU(), einfx.EinsumLinear(96, 64, structure))


def _example(batch=2, seq=6, seed=1):
    return torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(seed))


def _exact_reference_check(path, module, x):
    """Independent of einfx.export's own verification: onnxruntime's plain run() against torch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = module.eval()(x)
    return (got - want).abs().max().item() / want.abs().max().item()


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_parity_every_named_structure(tmp_path, name):
    module = _mlp(STRUCTURES[name])
    x = _example()
    path = tmp_path / "m.onnx"
    report = to_onnx(module, (x,), path, dynamic_axes={"input": {1: "seq"}}, latency_repeats=2)
    assert report.verified and report.max_rel_error <= 1e-4
    shapes = [c.input_shapes[0] for c in report.checks]
    assert shapes[0] == (2, 6, 64) and len(set(shapes)) == 3  # the example and two other batch/seq sizes
    assert {s[0] for s in shapes} == {1, 2, 4} and {s[1] for s in shapes} == {3, 5, 6}
    assert "Einsum" not in report.op_counts and report.op_counts.get("MatMul", 0) >= 2
    assert report.dynamic_axes == {"input": {0: "batch", 1: "seq"}}
    assert report.latency.median_ms > 0 and report.providers == ("CPUExecutionProvider",)
    assert os.listdir(tmp_path) == ["m.onnx"] and report.file_bytes == path.stat().st_size
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", 64]
    for shape in ((3, 4), (1, 1)):
        assert _exact_reference_check(path, module, _example(*shape, seed=7)) <= 1e-4


def test_explicit_verify_inputs(tmp_path):
    module = _mlp(STRUCTURES["btt"])
    extra = [(_example(5, 2, seed=3),), (_example(1, 9, seed=4),)]
    report = to_onnx(module, (_example(),), tmp_path / "m.onnx", dynamic_axes={0: [1]}, verify_inputs=extra,
                     latency_repeats=0)
    assert [c.input_shapes for c in report.checks] == [((2, 6, 64),), ((5, 2, 64),), ((1, 9, 64),)]
    assert report.latency is None and report.dynamic_axes == {"input": {0: "batch", 1: "input_dim1"}}


def test_float16_export_verified_against_float32_torch(tmp_path):
    module = _mlp(STRUCTURES["btt"]).train()
    report = to_onnx(module, (_example(),), tmp_path / "h.onnx", dtype="float16", latency_repeats=0)
    assert report.tolerance == 2e-2 and report.verified
    # float16 rounding is visible against float32 torch, and far inside the tolerance
    assert 1e-5 < report.max_rel_error <= 2e-2
    graph = onnx.load(report.path).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # the caller's module is neither cast nor switched to eval mode
    assert module.training and all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.skipif(resolve_device("auto") == "cuda", reason="checks the CPU-only behaviour")
def test_bfloat16_on_cpu_is_exported_but_not_verified(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = to_onnx(_mlp(STRUCTURES["btt"]), (_example(),), tmp_path / "b.onnx", dtype="bfloat16")
    assert not report.verified and report.checks == () and "no bfloat16 kernels" in report.note
    assert any("no bfloat16 kernels" in str(w.message) for w in caught)
    assert onnx.load(report.path).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16


@pytest.mark.skipif(resolve_device("auto") != "cuda", reason="needs onnxruntime-gpu and CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_parity_on_cuda(tmp_path, dtype):
    report = to_onnx(_mlp(STRUCTURES["btt"]), (_example(),), tmp_path / "g.onnx", dtype=dtype, device="cuda")
    assert report.verified and report.providers == ("CUDAExecutionProvider",) and report.max_rel_error <= 2e-2


def test_external_data_round_trip(tmp_path):
    module = _mlp(STRUCTURES["btt"])
    x = _example()
    report = to_onnx(module, (x,), tmp_path / "ext.onnx", external_data=True, latency_repeats=0)
    assert report.data_path == str(tmp_path / "ext.onnx.data") and report.data_bytes > 0
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    # the weights live in the data file: without it the .onnx file holds no raw weight bytes
    bare = onnx.load(report.path, load_external_data=False)
    assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in bare.graph.initializer if init.dims and
               int(torch.tensor(list(init.dims)).prod()) >= 256)
    # moved together, the two files still load (the reference is relative)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("ext.onnx", "ext.onnx.data"):
        shutil.move(tmp_path / f, moved / f)
    assert _exact_reference_check(moved / "ext.onnx", module, x) <= 1e-4
    full = onnx.load(moved / "ext.onnx")
    arrays = sorted(onnx.numpy_helper.to_array(i).size for i in full.graph.initializer)
    assert sum(arrays) >= sum(p.numel() for p in module.parameters())


def test_large_weights_choose_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)  # stand-in for 2 GiB
    report = to_onnx(_mlp(STRUCTURES["btt"]), (_example(),), tmp_path / "big.onnx", latency_repeats=0)
    assert report.data_path is not None and os.path.exists(report.data_path)
    small = to_onnx(_mlp(STRUCTURES["btt"]), (_example(),), tmp_path / "small.onnx", latency_repeats=0,
                    verify=False)
    assert small.data_path is None or small.data_path.endswith("small.onnx.data")


class _SVD(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = einfx.EinsumLinear(16, 16, einfx.Structure.btt())

    def forward(self, x):
        return torch.linalg.svd(self.proj(x)).S


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def _assert_no_new_file(tmp_path, keep=("keep.onnx",)):
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert (tmp_path / "keep.onnx").read_bytes() == b"old model"


def test_op_without_onnx_translation_names_node_and_op(tmp_path):
    (tmp_path / "keep.onnx").write_bytes(b"old model")
    with pytest.raises(ExportError, match=r"cannot export _SVD to ONNX: node '_linalg_svd' \(op aten\._linalg_svd\.default\)"):
        to_onnx(_SVD(), (torch.randn(3, 16),), tmp_path / "keep.onnx")
    _assert_no_new_file(tmp_path)


def test_data_dependent_control_flow_names_the_code(tmp_path):
    (tmp_path / "keep.onnx").write_bytes(b"old model")
    with pytest.raises(ExportError) as err:
        to_onnx(_Branchy(), (torch.randn(3, 4),), tmp_path / "other.onnx")
    assert "cannot export _Branchy" in str(err.value) and "data-dependent" in str(err.value)
    assert "'if x.sum() > 0:' in forward" in str(err.value)
    _assert_no_new_file(tmp_path)


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    real = onnx_export.reference_outputs
    monkeypatch.setattr(onnx_export, "reference_outputs", lambda m, xs: [y + 1e-2 * y.abs().max() for y in real(m, xs)])
    (tmp_path / "keep.onnx").write_bytes(b"old model")
    with pytest.raises(ExportError, match=r"beyond the float32 tolerance 0\.0001.*\n.*FAIL"):
        to_onnx(_mlp(STRUCTURES["btt"]), (_example(),), tmp_path / "keep.onnx")
    _assert_no_new_file(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8"}, "unknown export dtype 'int8'; valid: float32, float16, bfloat16"),
    ({"dynamic_axes": {"tokens": [1]}}, r"dynamic_axes names input 'tokens'; the module's inputs are \['input'\]"),
    ({"dynamic_axes": {0: {3: "x"}}}, r"dim 3 is not a dimension of input 'input' of shape \(2, 6, 64\)"),
    ({"device": "tpu"}, "unknown device 'tpu'; valid: auto, cpu, cuda"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        to_onnx(_mlp(STRUCTURES["btt"]), (_example(),), tmp_path / "m.onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_bad_inputs_and_folder(tmp_path):
    with pytest.raises(ExportError, match=r"example_inputs\[0\] must be a torch.Tensor, got list"):
        to_onnx(_mlp(STRUCTURES["btt"]), ([1.0],), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="folder .*missing.* does not exist"):
        to_onnx(_mlp(STRUCTURES["btt"]), (_example(),), tmp_path / "missing" / "m.onnx")


def test_graph_module_gets_fold_and_lower_passes(tmp_path):
    pytest.importorskip("einfx.passes.lower")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    policy = einfx.Policy(default=einfx.Structure.btt(rank=1), init="project")
    gm = einfx.optimize(model, policy, example_inputs=(_example(),))
    report = to_onnx(gm, (_example(),), tmp_path / "gm.onnx", dynamic_batch=False, latency_repeats=0)
    assert report.passes == ("fold_to_dense", "lower") and report.verified
    assert "Einsum" not in report.op_counts


class _FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, 3, 4).sum(1)


def test_dynamic_axis_that_the_model_fixes_is_explained(tmp_path):
    with pytest.raises(ExportError, match=r"_FixedBatch to ONNX with the requested dynamic axes: the model fixes "
                                          r"their sizes \(inputs\[0\]\.shape\[0\] is fixed at 2\)\. Export with "
                                          r"dynamic_batch=False"):
        to_onnx(_FixedBatch(), (torch.randn(2, 12),), tmp_path / "f.onnx")
    assert os.listdir(tmp_path) == []
    report = to_onnx(_FixedBatch(), (torch.randn(2, 12),), tmp_path / "f.onnx", dynamic_batch=False, latency_repeats=0)
    assert report.verified and len(report.checks) == 1


class _Zero(nn.Module):
    def forward(self, x):
        return x * 0.0


def test_all_zero_reference_is_flagged(tmp_path):
    with pytest.warns(UserWarning, match="all zero: parity there says little"):
        report = to_onnx(_Zero(), (torch.randn(2, 3),), tmp_path / "z.onnx", latency_repeats=0)
    assert report.verified and report.max_rel_error == 0.0 and "all zero" in report.note
