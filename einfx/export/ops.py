"""Static checks of an exported ONNX file: op counts, forbidden ops, the full ``onnx.checker`` pass.

``op_counts`` counts every node of the main graph, of nested subgraphs (If/Loop/Scan bodies) and of the
bodies of the model's local functions (a call to a local function is counted through its body, so the
counts say which primitive ops the runtime executes). ``check_onnx`` runs ``onnx.checker`` with
``full_check=True`` on the file path (the path form also handles external data and models over 2 GiB) and
refuses graphs holding an op of ``FORBIDDEN_OPS``: onnxruntime's Einsum is slow on CPU and CUDA (SPEC §4).
"""

from __future__ import annotations

import os
from collections import Counter

from einfx.errors import ExportError

__all__ = ["FORBIDDEN_OPS", "op_counts", "check_onnx", "load_graph"]

FORBIDDEN_OPS = ("Einsum",)


def load_graph(path: str | os.PathLike):
    """The ``onnx.ModelProto`` of a file, without loading its external data (cheap for big models)."""
    import onnx

    return onnx.load(os.fspath(path), load_external_data=False)


def _count_graph(graph, functions: dict, counts: Counter, names: dict, seen: frozenset) -> None:
    for node in graph.node:
        key = (node.domain, node.op_type)
        if key in functions and key not in seen:
            _count_graph(functions[key], functions, counts, names, seen | {key})
        else:
            counts[node.op_type] += 1
            names.setdefault(node.op_type, []).append(node.name)
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                _count_graph(attr.g, functions, counts, names, seen)
            for sub in attr.graphs:
                _count_graph(sub, functions, counts, names, seen)


def _walk(model) -> tuple[Counter, dict[str, list[str]]]:
    functions = {(f.domain, f.name): f for f in model.functions}
    counts: Counter = Counter()
    names: dict[str, list[str]] = {}
    _count_graph(model.graph, functions, counts, names, frozenset())
    return counts, names


def op_counts(model) -> dict[str, int]:
    """Node counts by op type, most frequent first.

    Args:
        model: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.
    """
    if not hasattr(model, "graph"):
        model = load_graph(model)
    counts, _ = _walk(model)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_onnx(path: str | os.PathLike, forbid: tuple[str, ...] = FORBIDDEN_OPS) -> dict[str, int]:
    """Run the full ONNX checker on ``path`` and refuse forbidden ops; return the op counts.

    Raises:
        ExportError: naming the file, the checker's message, or the forbidden op and the nodes holding it.
    """
    import onnx

    path = os.fspath(path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: the ONNX checker (full_check=True) rejected the model: {exc}") from exc
    counts, names = _walk(load_graph(path))
    for op in forbid:
        if counts.get(op):
            shown = ", ".join(repr(n) for n in names[op][:5])
            raise ExportError(
                f"{path}: the graph holds {counts[op]} {op} node(s) ({shown}); einfx exports structured layers "
                f"as MatMul/Transpose/Reshape only (forbidden ops: {', '.join(forbid)}). Lower the model with "
                "einfx.optimize before export, or replace the module that calls torch.einsum"
            )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
