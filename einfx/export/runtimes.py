"""The runtimes an exported graph is deployed to, behind one small interface: load a model, run it on numpy feeds.

    onnxruntime   CPU provider (CUDA when onnxruntime-gpu and a GPU are there and device="cuda")
    openvino      CPU plugin, f32 precision hint (so that comparisons with float32 onnxruntime are like for like)

A `Runner` holds a compiled model and runs it; ``runtime_id(name)`` names the runtime, its version and the
host, which is what a tuning cache must match to be trusted (einfx.export.tune).

A model with dynamic axes can be compiled for one static input shape (``shapes=``), as OpenVINO deployments
do with ``Model.reshape``: OpenVINO then plans its memory and kernels for that shape (MiniLM btt(1) ran 8-20%
faster so in a fresh process, dense the same; bench/results/e2e.md). onnxruntime takes the same sizes as
free-dimension overrides of the inputs' named axes.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

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


def load(name: str, model, threads: int = 0, device: str = "cpu", *, spinning: bool = True,
         shapes: Mapping[str, Sequence[int]] | None = None) -> Runner:
    """Compile ``model`` (an `onnx.ModelProto` or a path) in runtime ``name`` with ``threads`` (0: default).

    ``spinning=False`` stops onnxruntime's idle worker threads from spinning between runs: several sessions
    timed in turn (the tuner) would otherwise steal each other's cores. ``shapes`` (input name -> static
    shape) compiles the model for those input shapes only (see the module docstring); the runner then refuses
    feeds of other shapes.

    Raises:
        ExportError: unknown or missing runtime, ``shapes`` that name no input or contradict the model, or the
            runtime refuses the model (its message included).
    """
    check_runtime(name)
    overrides = {}
    if shapes is not None:
        inputs = _graph_inputs(model)
        shapes = _static_shapes(inputs, shapes)
        overrides = _dim_overrides(inputs, shapes)
    try:
        if name == "onnxruntime":
            return _ORT(model, threads, device, spinning, overrides)
        return _openvino(model, threads, device, shapes)
    except ExportError:
        raise
    except Exception as exc:  # each runtime raises its own exception types
        raise ExportError(f"{name} could not load the model: {type(exc).__name__}: {exc}") from exc


def _graph_inputs(model) -> list:
    graph = model.graph if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model),
                                                                              load_external_data=False).graph
    return list(graph.input)


def _static_shapes(inputs, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` checked against the model's inputs: every name an input, every size positive and equal to
    the input's fixed dims, of the input's rank."""
    declared = {i.name: i.type.tensor_type.shape.dim for i in inputs}
    out = {}
    for name, shape in shapes.items():
        if name not in declared:
            raise ExportError(f"static shape given for {name!r}, which is not an input of the model; inputs: "
                              f"{', '.join(declared)}")
        shape = tuple(int(d) for d in shape)
        dims = declared[name]
        if len(shape) != len(dims) or any(d <= 0 for d in shape) \
                or any(dim.HasField("dim_value") and dim.dim_value != d for dim, d in zip(dims, shape)):
            want = [dim.dim_value if dim.HasField("dim_value") else dim.dim_param or "?" for dim in dims]
            raise ExportError(f"static shape {shape} for input {name!r} does not fit its declared shape {want}")
        out[name] = shape
    return out


def _dim_overrides(inputs, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The named dynamic axes of the inputs in ``shapes`` -> their sizes there (onnxruntime's overrides)."""
    sizes: dict[str, int] = {}
    for i in inputs:
        for dim, size in zip(i.type.tensor_type.shape.dim, shapes.get(i.name, ())):
            if dim.dim_param:
                if sizes.setdefault(dim.dim_param, size) != size:
                    raise ExportError(f"static shapes give axis {dim.dim_param!r} two sizes, {sizes[dim.dim_param]} "
                                      f"and {size} (input {i.name!r})")
    return sizes


def _ORT(model, threads: int, device: str, spinning: bool, overrides: Mapping[str, int]) -> Runner:
    import onnxruntime as ort

    opts = _options(threads or None, spinning)
    for axis, size in overrides.items():
        opts.add_free_dimension_override_by_name(axis, size)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(_source(model), opts, providers=providers)
    names = tuple(i.name for i in sess.get_inputs())
    return Runner("onnxruntime", lambda feeds: sess.run(None, dict(feeds)), names)


def _openvino(model, threads: int, device: str, shapes=None) -> Runner:
    import openvino as ov

    if device != "cpu":
        raise ExportError(f"the openvino runner here runs on the CPU, not {device!r}")
    core = ov.Core()
    src = _source(model)
    ov_model = core.read_model(src) if isinstance(src, str) else core.read_model(src, b"")
    if shapes:
        ov_model.reshape({port: ov.PartialShape(list(shapes[port.get_any_name()]))
                          for port in ov_model.inputs if port.get_any_name() in shapes})
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
