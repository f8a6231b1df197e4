"""share_relayouts: the identical relayouts of fused siblings' outputs made once, before their Split.

`fuse_siblings` computes q, k and v's first BTT cores as one GEMM and splits its output; each sibling then
regroups its slice for its second core with the same Reshape and Transpose (on MiniLM at btt(4)):

    y = C · X                 (16, 144, n)     the stacked first cores, rows (sibling, rank, head)
    q, k, v = Split(y)        (16, 48, n) each
    Reshape -> (64, 12, n)    in-block and rank axes merged
    Transpose (1, 2, 0) -> (12, n, 64)          three Transposes, one per sibling

With the stacked core's rows reordered to (rank, sibling, head), which costs nothing (a constant's layout),
the three slices are one tensor's rows and the three regroups are one:

    y' = C' · X               (16, 144, n)     rows (rank, sibling, head)
    Reshape -> (64, 36, n); Transpose (1, 2, 0) -> (36, n, 64); Split -> (12, n, 64) each

Each slice then goes to its own second core, y_i = Z_i · D_i (D_i constant, (12, 64, 32) here); with the
relayout shared, the three GEMMs become one against the cores stacked on the batch axis, and the Split moves
after it. onnxruntime reads the shared Transpose inside that GEMM (its fused MatMul takes a transposed batch),
as it read each sibling's before.

The same entries land in the same places and each product is summed as before, so the pass is exact. It
applies to a Split along the rows (axis -2) of a MatMul against a constant rank-3 left operand, whose
equal-sized outputs are each read once, by Reshapes of one target (B, s, n) -> (B·a, s / a, n) and then
Transposes of one perm; the second GEMMs are stacked where each slice's only reader is a MatMul against a
constant rank-3 right operand of one shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from einfx.export.onnx_graph import (fresh, is_transpose, perm_of, prune, rebuild, working_copy)

__all__ = ["share_relayouts"]


@dataclass(frozen=True)
class _Group:
    gemm: onnx.NodeProto       # MatMul(C, X), C constant (B, m·s, K)
    split: onnx.NodeProto      # Split(y) along the rows into m slices of s
    reshapes: tuple            # one per slice: (B, s, n) -> (B·a, c, n)
    transposes: tuple          # one per slice, all of the same perm
    blocks: int                # B
    ways: int                  # a: the row factor merged into the batch axis
    rows: int                  # c = s / a
    seconds: tuple             # each slice's next GEMM against a constant core, stacked into one; or ()


def share_relayouts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """One Reshape and Transpose before each sibling Split instead of one per slice (see the module's
    docstring); returns the new model and how many Transposes it removed."""
    out, values, shapes, producer, readers, outputs, taken, nodes = working_copy(model)
    graph = out.graph
    replace, removed = {}, 0
    for split in nodes:
        group = _group(split, values, shapes, producer, readers, outputs)
        if group is None:
            continue
        replace[id(group.gemm)] = _shared(group, graph, values, taken)
        replace[id(split)] = []
        for node in group.reshapes + group.transposes + group.seconds:
            replace[id(node)] = []
        removed += len(group.transposes) - 1
    if not replace:
        return model, 0
    rebuild(graph, nodes, replace=replace)
    live = {o for n in graph.node for o in n.output}
    for info in [v for v in graph.value_info if v.name not in live]:
        graph.value_info.remove(info)
    return prune(out)[0], removed


def _group(split, values, shapes, producer, readers, outputs) -> _Group | None:
    if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.output) < 2:
        return None
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    gemm = producer.get(split.input[0])
    if axis not in (1, -2) or gemm is None or gemm.op_type != "MatMul" or gemm.domain not in ("", "ai.onnx") \
            or gemm.input[0] not in values or gemm.input[1] in values or values[gemm.input[0]].ndim != 3 \
            or len(readers[gemm.output[0]]) != 1 or gemm.output[0] in outputs:
        return None
    blocks, total, _ = values[gemm.input[0]].shape
    x = shapes.get(gemm.input[1])
    if x is not None and (len(x) != 3 or x[0] not in ((blocks, ()), (1, ()))) or (x is None and blocks == 1):
        return None  # the output's batch would not be the core's
    ways = len(split.output)
    sizes = values[split.input[1]].tolist() if len(split.input) > 1 and split.input[1] in values else None
    if total % ways or (sizes is not None and sizes != [total // ways] * ways):
        return None
    size = total // ways
    reshapes, transposes = [], []
    for o in split.output:
        if o in outputs or len(readers[o]) != 1 or readers[o][0].op_type != "Reshape":
            return None
        reshape = readers[o][0]
        r = reshape.output[0]
        if r in outputs or len(readers[r]) != 1 or not is_transpose(readers[r][0], 3) \
                or readers[r][0].output[0] in outputs:
            return None
        reshapes.append(reshape)
        transposes.append(readers[r][0])
    targets = {tuple(values[r.input[1]].tolist()) if r.input[1] in values else None for r in reshapes}
    perms = {tuple(perm_of(t)) for t in transposes}
    if len(targets) != 1 or len(perms) != 1 or None in targets:
        return None
    target = targets.pop()
    if len(target) != 3 or target[0] <= 0 or target[0] % blocks or target[1] <= 0 or target[2] != -1:
        return None
    a, c = target[0] // blocks, target[1]
    if a * c != size:
        return None
    return _Group(gemm, split, tuple(reshapes), tuple(transposes), blocks, a, c,
                  _second_gemms(transposes, c, values, readers))


def _second_gemms(transposes, rows, values, readers) -> tuple:
    """Each slice's reader, when every slice (relaid with its rows as the batch axis) is read only by a MatMul
    against a constant rank-3 right operand with that batch size, all of one shape: those MatMuls, stacked
    into one after the shared relayout. Otherwise ()."""
    if perm_of(transposes[0])[0] != 1:
        return ()
    gemms = []
    for t in transposes:
        users = readers[t.output[0]]
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].domain not in ("", "ai.onnx") \
                or users[0].input[0] != t.output[0] or users[0].input[1] not in values:
            return ()
        gemms.append(users[0])
    cores = [values[g.input[1]] for g in gemms]
    if cores[0].ndim != 3 or cores[0].shape[0] != rows or any(c.shape != cores[0].shape for c in cores):
        return ()
    return tuple(gemms)


def _shared(group: _Group, graph, values, taken) -> list:
    """The MatMul against the reordered core, the one Reshape and Transpose, and the Split into the old
    Transposes' outputs."""
    gemm, m, a, c = group.gemm, len(group.transposes), group.ways, group.rows
    core = values[gemm.input[0]]
    b, _, k = core.shape
    reordered = core.reshape(b, m, a, c, k).transpose(0, 2, 1, 3, 4).reshape(core.shape)
    core_name = fresh(f"{gemm.input[0]}_shared", taken)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(reordered), core_name))
    y, regrouped, relaid, split = (fresh(f"{gemm.output[0]}_shared{suffix}", taken)
                                   for suffix in ("", "_regrouped", "_relaid", "_split"))
    target, sizes = fresh(f"{y}_target", taken), fresh(f"{y}_sizes", taken)
    graph.initializer.append(numpy_helper.from_array(np.array([b * a, m * c, -1], np.int64), target))
    graph.initializer.append(numpy_helper.from_array(np.array([c] * m, np.int64), sizes))
    perm = perm_of(group.transposes[0])
    nodes = [helper.make_node("MatMul", [core_name, gemm.input[1]], [y], name=y),
             helper.make_node("Reshape", [y, target], [regrouped], name=regrouped),
             helper.make_node("Transpose", [regrouped], [relaid], perm=perm, name=relaid)]
    if not group.seconds:
        return nodes + [helper.make_node("Split", [relaid, sizes], [t.output[0] for t in group.transposes],
                                         axis=perm.index(1), name=split)]
    stacked, product = fresh(f"{y}_second_cores", taken), fresh(f"{y}_second", taken)
    graph.initializer.append(numpy_helper.from_array(
        np.concatenate([values[g.input[1]] for g in group.seconds], axis=0), stacked))
    return nodes + [helper.make_node("MatMul", [relaid, stacked], [product], name=product),
                    helper.make_node("Split", [product, sizes], [g.output[0] for g in group.seconds], axis=0,
                                     name=split)]
