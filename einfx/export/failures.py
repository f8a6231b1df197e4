"""Turn a failure of ``torch.onnx.export`` into an `ExportError` that names the node and the op.

The dynamo exporter fails in one of three steps, and its messages carry what a user needs:
    step 1, torch.export:   "The following call raised this error:\\n  File ..., line N, in forward\\n    <code>"
                            with a root cause such as GuardOnDataDependentSymNode (data-dependent control flow)
    step 1, dynamic axes:   "... tracing inferred a static shape of 2 for dimension inputs[0].shape[0]"
    step 3, translation:    "Error when translating node %<node> : ... target=torch.ops.<op>](args ..."
                            "No ONNX function found for <OpOverload(op='<op>', overload='<overload>')>"
This module reads those strings; when they change, the error still carries the exporter's own summary.
"""

from __future__ import annotations

import re

from einfx.errors import ExportError

__all__ = ["explain_export_failure"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE = re.compile(r"translating node %(\S+)")
_TARGET = re.compile(r"target=(?:torch\.ops\.)?([\w.]+)")
_OVERLOAD = re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)")
_CALL = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)')
_STATIC = re.compile(r"inferred a static shape of (\d+) for dimension ([\w\[\]]+(?:\.[\w\[\]]+)*)")
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "UserError")


def _chain(exc: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def explain_export_failure(exc: BaseException, what: str) -> ExportError:
    """An `ExportError` for a failed export of ``what`` (a module description), naming node and op."""
    chain = _chain(exc)
    text = "\n".join(_ANSI.sub("", str(e)) for e in chain)
    root = chain[-1]
    node = op = None
    if m := _NODE.search(text):
        node = m.group(1)
        if t := _TARGET.search(text[m.end():]):
            op = t.group(1)
    if m := _OVERLOAD.search(text):
        op = f"{m.group(1)}.{m.group(2)}"
    if node is not None:
        return ExportError(
            f"cannot export {what} to ONNX: node {node!r} (op {op or 'unknown'}) has no ONNX translation: "
            f"{_first_line(root)}. Replace that op in the model, or keep the module that calls it out of the "
            "exported graph"
        )
    static = _STATIC.findall(text)
    if static:
        dims = "; ".join(f"{dim} is fixed at {size}" for size, dim in dict.fromkeys(static))
        return ExportError(
            f"cannot export {what} to ONNX with the requested dynamic axes: the model fixes their sizes ({dims}). "
            "Export with dynamic_batch=False and without those dynamic_axes, or capture the model with dynamic "
            "shapes"
        )
    call = _CALL.search(text)
    where = f"{call.group(4).strip()!r} in {call.group(3)} ({call.group(1)}:{call.group(2)})" if call else None
    kind = type(root).__name__
    if kind in _DATA_DEPENDENT or "data-dependent" in text:
        reason = f"data-dependent Python control flow or shape ({kind})"
    else:
        reason = kind
    at = f"node {where}" if where else "an unnamed node"
    return ExportError(
        f"cannot export {what} to ONNX: torch.export failed at {at}, op: {reason}: {_first_line(root)}. "
        "Make the control flow static (torch.cond, or no branch on tensor values) or keep that module out "
        "of the exported graph"
    )
