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
import warnings

import torch
from torch import nn

from einfx.cli.data import read_data
from einfx.cli.outputs import ONNX_NAME
from einfx.rewriter.report import NOT_MEASURED
from einfx.errors import UnmatchedPatternWarning
from einfx.zoo import ModelSpec, build_model
from einfx.errors import EinfxError

__all__ = ["convert_one", "explain_one", "load_policy", "count_params", "count_flops"]

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


def _jsonable(report) -> object:
    to_json = getattr(report, "to_json", None)
    if callable(to_json):
        data = to_json()
        return json.loads(data) if isinstance(data, str) else data
    return [dict(row) if isinstance(row, dict) else str(row) for row in getattr(report, "rows", [])]


def explain_one(spec: ModelSpec, policy: str, tokens: int = 128, data: str | None = None):
    """Build the model of ``spec`` and return ``einfx.explain`` for it under the policy file ``policy`` (with
    the calibration batches of the file ``data``, see `einfx.cli.data`)."""
    policy_obj = load_policy(policy)
    built = build_model(spec, tokens)
    batches = read_data(data, built, tokens) if data is not None else None
    return _api("explain")(built.module, policy_obj, example_inputs=built.example_inputs, data=batches)


def convert_one(spec: ModelSpec, policy: str, out_dir: str, dtype: str = "float32", tokens: int = 128,
                data: str | None = None, runtime: str | None = None,
                deploy_shape: tuple[int, ...] | None = None) -> dict:
    """Convert one model: build, optimize (with its explain report), export ``out_dir/model.onnx``, verify it.

    Args:
        spec: the model spec.
        policy: path of the policy file (YAML or TOML).
        out_dir: an existing (staging) directory; model.onnx is written there.
        dtype: ONNX dtype, "float32" or "float16".
        tokens: sequence length of text models.
        data: a file of calibration inputs (`einfx.cli.data`): the layers are fitted to them and the report
            carries the fidelity of the converted model to the original on them.
        runtime: ``"onnxruntime"`` or ``"openvino"``: the layers' plans and folds are measured there
            (`einfx.export.tune`) and the file is verified there; None: the cost model decides.
        deploy_shape: with ``runtime``, the static (batch, sequence) or (batch,) shape that runtime will
            compile the file at (`einfx.export.to_onnx`'s ``deploy_shape``).

    Returns:
        The report: ``model`` (family, inputs), ``explain`` (rows), ``params`` / ``flops`` (before, after),
        ``export`` (max_rel_error, op_counts, dtype, deploy passes) and ``latency_ms`` (median torch
        latency before/after in float32 on CPU; onnxruntime latency measured by ``to_onnx`` on its
        verification device), ``fidelity`` (`einfx.fidelity` against the original on the ``data`` batches, or
        the sentence saying it was not measured) and ``data``. Errors propagate (EinfxError subclasses name the
        failing step).
    """
    policy_obj = load_policy(policy)
    built = build_model(spec, tokens)
    model, inputs = built.module, built.example_inputs
    batches = read_data(data, built, tokens) if data is not None else None
    params_before, flops_before = count_params(model), count_flops(model, inputs)
    latency_before = _torch_latency_ms(model, inputs)
    with warnings.catch_warnings():  # one policy serves many models: unmatched patterns go to the report only
        warnings.simplefilter("ignore", UnmatchedPatternWarning)
        optimized = _api("optimize")(model, policy_obj, example_inputs=inputs, data=batches)  # keeps eval mode
    # optimize() attaches the same report explain() returns; explain only when it does not (one capture less).
    report = getattr(optimized, "einfx_report", None)
    if report is None:
        report = _api("explain")(model, policy_obj, example_inputs=inputs, data=batches)
    params_after, flops_after = count_params(optimized), count_flops(optimized, inputs)
    latency_after = _torch_latency_ms(optimized, inputs)
    # to_onnx flattens dict/tuple outputs (Hugging Face ModelOutput) and applies the deploy passes itself.
    tuning = {"runtime": runtime} if runtime is not None else {}
    if deploy_shape is not None:
        tuning["deploy_shape"] = tuple(deploy_shape)
    exported = _api("export.to_onnx")(optimized, inputs, os.path.join(out_dir, ONNX_NAME), dtype=dtype,
                                      verify=True, **tuning)
    fid = getattr(report, "fidelity", None)
    return {
        "model": {"family": built.family, **built.info, "example_inputs": [list(t.shape) for t in inputs]},
        "fidelity": dict(fid) if fid is not None else NOT_MEASURED,
        "data": batches.describe() if batches is not None else None,
        "explain": _jsonable(report),
        "params": {"before": params_before, "after": params_after},
        "flops": {"before": flops_before, "after": flops_after, "per": "forward pass on the example inputs"},
        "export": {
            "dtype": dtype,
            "max_rel_error": _float_or_none(getattr(exported, "max_rel_error", None)),
            "op_counts": dict(getattr(exported, "op_counts", {}) or {}),
            "passes": list(getattr(exported, "passes", ()) or ()),
            "runtime": runtime,
            "deploy_shape": list(deploy_shape) if deploy_shape is not None else None,
            "tuned": {name: t.describe() for name, t in (getattr(exported, "tuned", None) or {}).items()},
            "graph_rewrites": dict(getattr(exported, "rewrites", {}) or {}),
            "graph_pass_choice": (exported.pass_choice.to_dict() if getattr(exported, "pass_choice", None)
                                  is not None else None),
            "note": getattr(exported, "note", ""),
        },
        "latency_ms": {"torch_before": latency_before, "torch_after": latency_after,
                       "onnxruntime": _float_or_none(getattr(exported, "latency_ms", None))},
    }


def _float_or_none(value):
    return None if value is None else float(value)
