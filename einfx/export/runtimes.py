"""The runtimes an exported graph is deployed to, behind one small interface: load a model, run it on numpy feeds.

    onnxruntime   CPU provider (CUDA when onnxruntime-gpu and a GPU are there and device="cuda")
    openvino      CPU plugin, f32 precision hint (so that comparisons with float32 onnxruntime are like for like)

A `Runner` holds a compiled model and runs it; ``runtime_id(name)`` names the runtime, its version and the
host, which is what a tuning cache must match to be trusted (einfx.export.tune).
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx

from einfx.errors import ExportError
from einfx.export.session import _options

__all__ = ["RUNTIMES", "Runner", "available", "load", "runtime_id", "check_runtime"]

RUNTIMES = ("onnxruntime", "openvino")


def check_runtime(name: str) -> str:
    """``name`` if it is a known runtime that is installed, else `ExportError` naming the valid ones."""
    if name not in RUNTIMES:
        raise ExportError(f"unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}")
    if not available(name):
        raise ExportError(f"runtime {name!r} is not installed (pip install {name})")
    return name


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_id(name: str, threads: int, device: str = "cpu") -> dict:
    """What a measurement in runtime ``name`` depends on: runtime version, device, threads and the host CPU."""
    check_runtime(name)
    module = __import__(name)
    return {"runtime": name, "version": getattr(module, "__version__", "?"), "device": device,
            "threads": int(threads), "host": _cpu_model(), "machine": platform.machine()}


@dataclass
class Runner:
    """A model compiled in a runtime: ``runner(feeds)`` returns the outputs as numpy arrays, in order."""

    runtime: str
    run: Callable[[Mapping[str, np.ndarray]], list]
    input_names: tuple[str, ...]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list:
        return self.run(feeds)


def _source(model) -> bytes | str:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return os.fspath(model)


def load(name: str, model, threads: int = 0, device: str = "cpu", *, spinning: bool = True) -> Runner:
    """Compile ``model`` (an `onnx.ModelProto` or a path) in runtime ``name`` with ``threads`` (0: default).

    ``spinning=False`` stops onnxruntime's idle worker threads from spinning between runs: several sessions
    timed in turn (the tuner) would otherwise steal each other's cores.

    Raises:
        ExportError: unknown or missing runtime, or the runtime refuses the model (its message included).
    """
    check_runtime(name)
    try:
        if name == "onnxruntime":
            return _ORT(model, threads, device, spinning)
        return _openvino(model, threads, device)
    except ExportError:
        raise
    except Exception as exc:  # each runtime raises its own exception types
        raise ExportError(f"{name} could not load the model: {type(exc).__name__}: {exc}") from exc


def _ORT(model, threads: int, device: str, spinning: bool) -> Runner:
    import onnxruntime as ort

    opts = _options(threads or None, spinning)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(_source(model), opts, providers=providers)
    names = tuple(i.name for i in sess.get_inputs())
    return Runner("onnxruntime", lambda feeds: sess.run(None, dict(feeds)), names)


def _openvino(model, threads: int, device: str) -> Runner:
    import openvino as ov

    if device != "cpu":
        raise ExportError(f"the openvino runner here runs on the CPU, not {device!r}")
    core = ov.Core()
    src = _source(model)
    ov_model = core.read_model(src) if isinstance(src, str) else core.read_model(src, b"")
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    names = tuple(p.get_any_name() for p in compiled.inputs)
    outputs = list(compiled.outputs)

    def run(feeds):
        result = request.infer(dict(feeds))
        return [np.array(result[o]) for o in outputs]

    return Runner("openvino", run, names)
