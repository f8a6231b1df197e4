"""Computing a batched GEMM the other way round: y = C · X (C a constant (B, K, R) core, X (B, R, N)) as
yᵀ = Xᵀ · Cᵀ writes (B, N, K) for the same work (and X · C the other way round). The rewrites that choose a
GEMM's orientation (`einfx.export.relayouts`, `einfx.export.orientation`) share these helpers; every perm here
is of rank 3 and "swapped" means the last two axes exchanged."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from einfx.export.onnx_graph import fresh

__all__ = ["core_side", "set_perm", "swapped", "read_swapped", "transpose_gemm", "swap_info"]

def core_side(node, values) -> int | None:
    """Which operand of a MatMul (0 or 1) is its one constant rank-3 core, or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    constant = [i for i, name in enumerate(node.input) if name in values]
    if len(constant) != 1 or values[node.input[constant[0]]].ndim != 3:
        return None
    return constant[0]


def set_perm(node, perm) -> None:
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("perm", list(perm)))


def swapped(perm) -> list[int]:
    """The perm that yields the result of ``perm`` with its last two axes swapped (rank 3)."""
    return [perm[0], perm[2], perm[1]]


def read_swapped(perm) -> list[int]:
    """The perm that reads, from a tensor with its last two axes swapped (rank 3), what ``perm`` gave."""
    return [(0, 2, 1)[a] for a in perm]


def transpose_gemm(gemm, side, activation, graph, values, shapes, taken) -> str:
    """Make ``gemm`` compute its output with the last two axes swapped from ``activation`` (its activation
    operand, swapped already); returns the output's new name."""
    y = gemm.output[0]
    core = gemm.input[side]
    core_t = fresh(f"{core}_t", taken)
    values[core_t] = np.ascontiguousarray(values[core].transpose(0, 2, 1))
    graph.initializer.append(numpy_helper.from_array(values[core_t], core_t))
    new_y = fresh(f"{y}_flipped", taken)
    gemm.input[:] = [activation, core_t] if side == 0 else [core_t, activation]
    gemm.output[0] = new_y
    swap_info(graph, shapes, y, new_y)
    return new_y


def swap_info(graph, shapes, old: str, new: str) -> None:
    """Declare ``new`` as ``old`` with its last two axes swapped (rank 3)."""
    if old in shapes:
        shapes[new] = tuple(shapes[old][i] for i in (0, 2, 1))
    for info in [v for v in graph.value_info if v.name == old]:
        dims = info.type.tensor_type.shape.dim
        graph.value_info.remove(info)
        graph.value_info.append(helper.make_tensor_value_info(
            new, info.type.tensor_type.elem_type, [dims[i].dim_value or dims[i].dim_param or None for i in (0, 2, 1)]))
