"""Capture a model as a `torch.fx.GraphModule`, trying several tracing front ends in order.

Front ends (``FRONTENDS``), each failure recorded with its reason:

1. ``fx``: `torch.fx` symbolic tracing with einfx's leaf modules (EinsumLinear, GPT-2's Conv1D, and the
   modules `torch.fx` keeps as leaves: everything in ``torch.nn``);
2. ``hf_fx``: the Hugging Face transformers FX tracer, for transformers models (removed in transformers 5;
   then recorded as unavailable);
3. ``export``: `torch.export.export(..., strict=False)` on ``example_inputs``; its unlifted graph module
   (``ExportedProgram.module()``) keeps parameter paths and the pytree output structure (ModelOutput).

When all fail, `capture` raises `TraceError` listing every front end and why, unless the caller allows the
module-level fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn

from einfx.errors import TraceError
from einfx.layers.linear import EinsumLinear

__all__ = ["Capture", "EinfxTracer", "FRONTENDS", "capture", "fx_trace", "is_conv1d"]

FRONTENDS = ("fx", "hf_fx", "export")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear map whose 2-D ``weight`` is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(getattr(module, "weight", None), "dim", lambda: 0)() == 2


class EinfxTracer(fx.Tracer):
    """`torch.fx` tracer that keeps structured layers and Conv1D as ``call_module`` leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, EinsumLinear) or is_conv1d(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fx_trace(root: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``root`` with `EinfxTracer` and keep its class name."""
    graph = EinfxTracer().trace(root)
    return fx.GraphModule(root, graph, type(root).__name__)


@dataclass(frozen=True)
class Capture:
    """The result of tracing: the module to rewrite, the front end that produced it, and every failure.

    ``frontend`` is one of ``FRONTENDS``, or ``"module"`` for the module-level fallback (then ``module``
    is the model itself, not a GraphModule).
    """

    module: nn.Module
    frontend: str
    reasons: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_graph(self) -> bool:
        return isinstance(self.module, fx.GraphModule)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"


def _try_fx(model: nn.Module, example_inputs, example_kwargs) -> fx.GraphModule:
    return fx_trace(model)


def _try_hf_fx(model: nn.Module, example_inputs, example_kwargs) -> fx.GraphModule:
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:
        raise RuntimeError("transformers is not installed") from exc
    if not isinstance(model, PreTrainedModel):
        raise RuntimeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    try:
        from transformers.utils import fx as hf_fx  # removed in transformers 5
    except ImportError as exc:
        import transformers

        raise RuntimeError(f"unavailable: transformers {transformers.__version__} has no FX tracer "
                           "(transformers.utils.fx was removed)") from exc
    names = list(example_kwargs) if example_kwargs else None
    return hf_fx.symbolic_trace(model, input_names=names)


def _try_export(model: nn.Module, example_inputs, example_kwargs) -> nn.Module:
    if example_inputs is None and not example_kwargs:
        raise RuntimeError("needs example_inputs (torch.export runs the model on them)")
    args = tuple(example_inputs) if example_inputs is not None else ()
    kwargs = dict(example_kwargs or {})
    # The batch axis and the token axis of integer (batch, tokens) inputs are exported as Dim.AUTO, so that the
    # graph serves other batch and sequence sizes (export specializes the dims the model really fixes). Export also specializes every dim of size 1, so a
    # batch of 1 is first widened to 2 by repeating it. A model that only exports with static shapes is
    # captured at the example's shapes.
    attempts = [(_widen_batch(args), _widen_batch(kwargs), True), (args, kwargs, True), (args, kwargs, False)]
    if attempts[0][0] is args and attempts[0][1] is kwargs:
        attempts = attempts[1:]
    for i, (a, kw, dynamic) in enumerate(attempts):
        try:
            shapes = _auto_dynamic_shapes(a, kw) if dynamic else None
            return torch.export.export(model, a, kw, dynamic_shapes=shapes, strict=False).module()
        except Exception:  # noqa: BLE001 - the last attempt raises its own reason
            if i == len(attempts) - 1:
                raise
    raise AssertionError("unreachable")


def _widen_batch(value):
    """Repeat every tensor whose first dimension is 1 to a first dimension of 2 (same object if none is)."""
    if isinstance(value, torch.Tensor):
        return value.repeat(2, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == 1 else value
    if isinstance(value, (list, tuple)):
        items = [_widen_batch(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        items = {k: _widen_batch(v) for k, v in value.items()}
        return value if all(items[k] is value[k] for k in value) else items
    return value


def _auto_dynamic_shapes(args: tuple, kwargs: dict):
    def spec(value):
        # the axes that vary in deployment: batch, and the token axis of (batch, tokens) integer inputs and of
        # (batch, tokens, features) inputs; making
        # every axis symbolic (image height and width) costs torch.export minutes on windowed models (swin)
        if isinstance(value, torch.Tensor):
            if not value.dim():
                return None
            dims = [0] + ([1] if (value.dim() == 2 and not value.is_floating_point()) or value.dim() == 3 else [])
            return {i: torch.export.Dim.AUTO for i in dims}
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    if kwargs and not args:
        return {k: spec(v) for k, v in kwargs.items()}
    if kwargs:
        return (*[spec(a) for a in args], *[spec(v) for v in kwargs.values()])
    return tuple(spec(a) for a in args)


_RUNNERS: dict[str, Callable[[nn.Module, Any, Any], nn.Module]] = {
    "fx": _try_fx, "hf_fx": _try_hf_fx, "export": _try_export,
}


def capture(model: nn.Module, example_inputs=None, example_kwargs: Mapping | None = None, *,
            frontends=FRONTENDS, allow_module_fallback: bool = False) -> Capture:
    """Trace ``model`` with the first front end of ``frontends`` that succeeds.

    Args:
        model: the module to capture (not modified).
        example_inputs: positional example inputs (a tuple), required by ``export``.
        example_kwargs: keyword example inputs, for ``export``.
        frontends: the front ends to try, in order (a subset of ``FRONTENDS``).
        allow_module_fallback: return ``Capture(model, "module", reasons)`` instead of raising.

    Raises:
        TraceError: every front end failed (``.reasons`` maps each to its failure) and no fallback.
    """
    unknown = [f for f in frontends if f not in _RUNNERS]
    if unknown:
        raise TraceError(f"unknown tracing front ends {unknown}; valid: {', '.join(FRONTENDS)}")
    reasons: dict[str, str] = {}
    for name in frontends:
        try:
            module = _RUNNERS[name](model, example_inputs, example_kwargs)
        except Exception as exc:  # every front end fails in its own way; the reason is what matters
            reasons[name] = _short(exc)
            continue
        return Capture(module, name, reasons)
    if allow_module_fallback:
        return Capture(model, "module", reasons)
    listing = "\n".join(f"  - {name}: {why}" for name, why in reasons.items())
    raise TraceError(
        f"could not trace {type(model).__name__} with any front end:\n{listing}\n"
        "Pass example_inputs so that torch.export can run, or set the policy's fallback='module' to replace "
        "nn.Linear/Conv1D modules in place without a graph.",
        reasons,
    )
