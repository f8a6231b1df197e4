"""`session`: provider choice and messages, io-binding runs, benchmark; the CUDA path where present."""

import pytest
import torch
from torch import nn

import einfx
from einfx.errors import ExportError
from einfx.export import Latency, session, to_onnx
from einfx.export.session import resolve_device

HAS_CUDA = resolve_device("auto") == "cuda"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    module = nn.Sequential(einfx.EinsumLinear(32, 48, einfx.Structure.btt(rank=2)), nn.Tanh()).eval()
    path = tmp_path_factory.mktemp("sess") / "m.onnx"
    to_onnx(module, (torch.randn(2, 32),), path, verify=False)
    return module, path


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on machines without CUDA")
def test_auto_falls_back_to_cpu_and_says_so(exported):
    sess = session(exported[1])
    assert sess.provider == "CPUExecutionProvider" and sess.device == "cpu"
    assert "CUDAExecutionProvider not available" in sess.message and "onnxruntime-gpu" in sess.message
    assert "running" in session(exported[1], "cpu").message


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on machines without CUDA")
def test_cuda_without_provider_is_refused(exported):
    with pytest.raises(ExportError, match=r"device='cuda' but onnxruntime offers .*CPUExecutionProvider.*onnxruntime-gpu"):
        session(exported[1], "cuda")


def test_bad_device_and_missing_file(exported, tmp_path):
    with pytest.raises(ExportError, match="unknown device 'gpu'; valid: auto, cpu, cuda"):
        session(exported[1], "gpu")
    with pytest.raises(ExportError, match="no ONNX file at .*nothing.onnx"):
        session(tmp_path / "nothing.onnx")


def test_graph_optimization_level_is_all(exported):
    import onnxruntime as ort

    sess = session(exported[1], "cpu")
    assert sess.inner.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_run_and_run_into_match_torch(exported):
    module, path = exported
    sess = session(path, "cpu")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = module(x)
    (got,) = sess.run([x])
    (into,) = sess.run_into([x], [want.shape])
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5) and torch.equal(got, into)
    with pytest.raises(ExportError, match=r"takes 1 input\(s\) \['input'\], got 2"):
        sess.run([x, x])


def test_benchmark_reports_median_of_repeats(exported):
    sess = session(exported[1], "cpu")
    lat = sess.benchmark([torch.randn(4, 32)], warmup=1, repeats=7)
    assert isinstance(lat, Latency) and lat.repeats == 7 and lat.provider == "CPUExecutionProvider"
    assert 0 < lat.min_ms <= lat.median_ms <= lat.max_ms
    with pytest.raises(ExportError, match="repeats >= 1"):
        sess.benchmark([torch.randn(4, 32)], repeats=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and CUDA")
def test_cuda_session_runs_on_gpu_with_io_binding(exported):
    module, path = exported
    sess = session(path, "auto")
    assert sess.provider == "CUDAExecutionProvider" and "CUDAExecutionProvider" in sess.message
    x = torch.randn(8, 32)
    (got,) = sess.run_into([x], [(8, 48)])
    assert got.device.type == "cuda"
    with torch.no_grad():
        assert torch.allclose(got.cpu(), module(x), atol=1e-4, rtol=1e-3)
    assert sess.benchmark([x], repeats=3).median_ms > 0


_SHARED_POOL_SCRIPT = r"""
import sys, torch
from einfx.export import session
path = sys.argv[1]
x = torch.randn(2, 32)
a = session(path, "cpu", threads=2, shared_pool=True)
b = session(path, "cpu", threads=1, shared_pool=True)   # joins the pool; its threads are ignored
c = session(path, "cpu", spinning=False)                 # a later plain einfx session joins it too
outs = [s.run([x])[0] for s in (a, b, c)]
assert all(not s.inner.get_session_options().use_per_session_threads for s in (a, b, c))
assert all(torch.equal(o, outs[0]) for o in outs)
print("ok", outs[0].shape[-1])
"""


def test_shared_pool_sessions_run_and_later_sessions_join_it(exported, tmp_path):
    # onnxruntime's process-wide pool outlives the call: run it in a process of its own
    import subprocess
    import sys

    script = tmp_path / "shared.py"
    script.write_text(_SHARED_POOL_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(exported[1])], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "48"]
