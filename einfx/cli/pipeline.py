"""The one adapter between the command line and the einfx passes: policy -> optimize -> ONNX export.

Every call into ``einfx.Policy``, ``einfx.explain``, ``einfx.optimize`` and ``einfx.export`` made by the
command line goes through this module, so the batch machinery (specs, sharding, resume, workers, summary)
is independent of them and can be tested with another converter of the same signature as `convert_one`.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from torch import nn

from einfx.cli.outputs import ONNX_NAME
from einfx.cli.specs import ModelSpec, build_model
from einfx.errors import EinfxError

__all__ = ["convert_one", "explain_one", "load_policy", "count_params", "count_flops", "FirstTensor"]

LATENCY_RUNS = 5


def load_policy(path: str):
    """Read a policy file (YAML or TOML) with ``einfx.Policy.from_file``.

    Raises:
        PolicyError: unreadable or invalid policy (raised by einfx.Policy).
        EinfxError: this einfx build has no ``einfx.Policy``.
    """
    import einfx

    policy_class = getattr(einfx, "Policy", None)
    if policy_class is None:
        raise EinfxError("einfx.Policy is not available in this build of einfx; cannot read policy "
                         f"{path!r}")
    return policy_class.from_file(path)


def _api(name: str):
    import einfx

    if name == "export.to_onnx":
        try:
            from einfx.export import to_onnx
        except ImportError as exc:
            raise EinfxError(f"einfx.export.to_onnx is not available in this build of einfx: {exc}") from exc
        return to_onnx
    fn = getattr(einfx, name, None)
    if fn is None:
        raise EinfxError(f"einfx.{name} is not available in this build of einfx")
    return fn


class FirstTensor(nn.Module):
    """Wrap a model so that it returns one tensor (logits / last hidden state / ``out``), for export.

    Hugging Face and torchvision segmentation models return dicts or tuples; ONNX export and parity checks
    want the main tensor. The wrapped model is kept as ``inner``.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return _first_tensor(self.inner(*args))


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # ModelOutput is a dict subclass, in field order
        for key in ("logits", "last_hidden_state", "out"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise EinfxError(f"the model returned {type(out).__name__}, which holds no tensor to export")


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_flops(model: nn.Module, inputs: tuple) -> int:
    """FLOPs (2 × multiply-adds of matmul/bmm/conv ops) of one forward pass, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return int(counter.get_total_flops())


def _torch_latency_ms(model: nn.Module, inputs: tuple, runs: int = LATENCY_RUNS) -> float:
    with torch.no_grad():
        model(*inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _onnx_latency_ms(path: str, inputs: tuple, runs: int = LATENCY_RUNS) -> float:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    kinds = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(double)": np.float64}
    feed = {}
    for meta, value in zip(session.get_inputs(), inputs):
        feed[meta.name] = value.detach().cpu().numpy().astype(kinds.get(meta.type, None) or value.numpy().dtype)
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _jsonable(report) -> object:
    to_json = getattr(report, "to_json", None)
    if callable(to_json):
        data = to_json()
        return json.loads(data) if isinstance(data, str) else data
    return [dict(row) if isinstance(row, dict) else str(row) for row in getattr(report, "rows", [])]


def explain_one(spec: ModelSpec, policy: str, tokens: int = 128):
    """Build the model of ``spec`` and return ``einfx.explain`` for it under the policy file ``policy``."""
    policy_obj = load_policy(policy)
    built = build_model(spec, tokens)
    return _api("explain")(built.module, policy_obj, example_inputs=built.example_inputs)


def convert_one(spec: ModelSpec, policy: str, out_dir: str, dtype: str = "float32", tokens: int = 128) -> dict:
    """Convert one model: build, explain, optimize, export ``out_dir/model.onnx`` and verify it.

    Args:
        spec: the model spec.
        policy: path of the policy file (YAML or TOML).
        out_dir: an existing (staging) directory; model.onnx is written there.
        dtype: ONNX dtype, "float32" or "float16".
        tokens: sequence length of text models.

    Returns:
        The report: ``model`` (family, inputs), ``explain`` (rows), ``params`` / ``flops`` (before, after),
        ``export`` (max_rel_error, op_counts, dtype) and ``latency_ms`` (torch before/after in float32 on
        CPU, onnxruntime CPU). Errors propagate (EinfxError subclasses name the failing step).
    """
    policy_obj = load_policy(policy)
    built = build_model(spec, tokens)
    model, inputs = built.module, built.example_inputs
    params_before, flops_before = count_params(model), count_flops(model, inputs)
    latency_before = _torch_latency_ms(model, inputs)
    rows = _jsonable(_api("explain")(model, policy_obj, example_inputs=inputs))
    optimized = _api("optimize")(model, policy_obj, example_inputs=inputs)
    optimized.eval()
    params_after, flops_after = count_params(optimized), count_flops(optimized, inputs)
    latency_after = _torch_latency_ms(optimized, inputs)
    path = os.path.join(out_dir, ONNX_NAME)
    exported = _api("export.to_onnx")(FirstTensor(optimized), inputs, path, dtype=dtype, verify=True)
    try:
        onnx_ms = _onnx_latency_ms(path, inputs)
    except Exception as exc:  # latency is informative only; a model onnxruntime cannot time still converted
        onnx_ms = f"not measured: {type(exc).__name__}: {str(exc)[:200]}"
    return {
        "model": {"family": built.family, **built.info, "example_inputs": [list(t.shape) for t in inputs]},
        "explain": rows,
        "params": {"before": params_before, "after": params_after},
        "flops": {"before": flops_before, "after": flops_after, "per": "forward pass on the example inputs"},
        "export": {
            "dtype": dtype,
            "max_rel_error": _float_or_none(getattr(exported, "max_rel_error", None)),
            "op_counts": dict(getattr(exported, "op_counts", {}) or {}),
        },
        "latency_ms": {"torch_before": latency_before, "torch_after": latency_after, "onnxruntime": onnx_ms},
    }


def _float_or_none(value):
    return None if value is None else float(value)
