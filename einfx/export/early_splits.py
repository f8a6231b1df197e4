"""split_before_gemms: a split of the tokens after a batched GEMM, and the Transpose after it, moved before it.

A key projection aligned to the heads ends in C · X, C a constant (heads, head dim, r) core and X (heads, r, n),
then splits the tokens, (heads, head dim, b, t), and moves the batch axis forward for attention,
(heads, b, head dim, t). The GEMM can take that layout directly: with X split and moved the same way,
(heads, b, r, t), and C broadcast over b as (heads, 1, head dim, r), the MatMul writes (heads, b, head dim, t)
itself. The Transpose now sits before the GEMM, next to the Transpose between the layer's cores, and
`einfx.export.relayouts.merge_relayouts` makes the two one: a Transpose fewer for the same GEMM work.

In general: y = MatMul over a constant rank-3 core and a rank-3 activation, read once by a Reshape that splits
its token axis in two (the other axes kept), read once by a rank-4 Transpose whose last two axes are the
GEMM's matrix axes in order (so the batch axes alone move). Applied only where the activation comes from a
Transpose read by the GEMM alone and the two compose into a Transpose that moves one block of axes, which is
where the merge follows.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from einfx.export.gemm_flip import core_side
from einfx.export.onnx_graph import (dim_product, fresh, perm_of, prune, rebuild, transpose_input_shape,
                                     working_copy)
from einfx.export.relayouts import moves_one_axis

__all__ = ["split_before_gemms"]


def split_before_gemms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The token split and batch-axis Transpose after a batched GEMM moved before it (see the module's
    docstring); returns the new model and how many GEMMs changed. Exact: the same products."""
    out, values, shapes, producer, readers, outputs, taken, nodes = working_copy(model)
    graph = out.graph
    replace, count = {}, 0
    for gemm in nodes:
        found = _match(gemm, values, shapes, producer, readers, outputs)
        if found is None:
            continue
        side, reshape, transpose, split = found
        replace[id(transpose)] = _rewrite(gemm, side, reshape, transpose, split, graph, values, shapes, taken)
        count += 1
    if not count:
        return model, 0
    rebuild(graph, nodes, replace=replace)
    return prune(out)[0], count


def _match(gemm, values, shapes, producer, readers, outputs):
    """(core side, the Reshape, the Transpose, the Reshape's 4-D shape) when ``gemm`` starts the pattern."""
    side = core_side(gemm, values)
    if side is None:
        return None
    x, y = gemm.input[1 - side], gemm.output[0]
    feeder = producer.get(x)
    if len(shapes.get(x, ())) != 3 or len(shapes.get(y, ())) != 3 or y in outputs or len(readers[y]) != 1 \
            or feeder is None or feeder.op_type != "Transpose" or len(readers[x]) != 1:
        return None
    reshape = readers[y][0]
    if reshape.op_type != "Reshape" or reshape.input[0] != y or len(readers[reshape.output[0]]) != 1 \
            or reshape.output[0] in outputs:
        return None
    transpose = readers[reshape.output[0]][0]
    q = perm_of(transpose)
    if transpose.op_type != "Transpose" or q is None or len(q) != 4 or q == [0, 1, 2, 3]:
        return None
    split = shapes.get(reshape.output[0]) or transpose_input_shape(transpose, shapes)
    if split is None or len(split) != 4:
        return None
    tokens = 2 if side == 0 else 1  # y = C · X is (B, K, n); y = X · C is (B, n, K)
    kept = [d for k, d in enumerate(shapes[y]) if k != tokens]
    if tokens == 2:
        ok = list(split[:2]) == kept and dim_product(split[2:]) == shapes[y][2] and q[2:] == [1, 3]
    else:
        ok = [split[0], split[3]] == kept and dim_product(split[1:3]) == shapes[y][1] and q[2:] == [2, 3]
    if not ok or sorted(q[:2]) != [0, tokens] or not _merges(feeder, tokens, q, split, shapes):
        return None
    return side, reshape, transpose, list(split)


def _merges(feeder, tokens, q, split, shapes) -> bool:
    """Whether the feeding Transpose and ``q``, once the split is before the GEMM, compose into a Transpose
    that moves one block of axes (the merge that makes the rewrite pay)."""
    source = transpose_input_shape(feeder, shapes)
    p = perm_of(feeder)
    if source is None or len(p) != 3:
        return False
    t0 = p[tokens]  # the source axis the tokens come from

    def expand(a):
        return [a] if a < t0 else [t0, t0 + 1] if a == t0 else [a + 1]

    wide = [b for a in p for b in expand(a)]
    halves = split[2:] if tokens == 2 else split[1:3]
    dims = list(source[:t0]) + list(halves) + list(source[t0 + 1:])
    return moves_one_axis([wide[j] for j in q], dims)


def _rewrite(gemm, side, reshape, transpose, split, graph, values, shapes, taken) -> list:
    """The nodes that replace ``transpose``: X split and moved as the Transpose moved y, then the GEMM against
    the core broadcast over the new batch axis."""
    x = gemm.input[1 - side]
    core = values[gemm.input[side]]
    q = perm_of(transpose)
    base = transpose.output[0]
    width = shapes[x][1 if side == 0 else 2]  # the contracted axis of x (an integer: the core's)
    nodes = []
    target = reshape.input[1]
    if target in values:
        dims = values[target].reshape(-1).astype(np.int64).copy()
        dims[1 if side == 0 else 3] = core.shape[2 if side == 0 else 1]
        new_target = fresh(f"{base}_split_shape", taken)
        graph.initializer.append(numpy_helper.from_array(dims, new_target))
    else:  # the same token dims, the core's contracted size for its output size
        new_target = fresh(f"{base}_split_shape", taken)
        pieces = []
        for lo, hi in ([(0, 1)] if side == 0 else [(0, 3)]):
            pieces.append(_slice(target, lo, hi, base, graph, taken, nodes))
        contracted = fresh(f"{base}_contracted", taken)
        graph.initializer.append(numpy_helper.from_array(np.array([width[0]], np.int64), contracted))
        pieces.append(contracted)
        if side == 0:
            pieces.append(_slice(target, 2, 4, base, graph, taken, nodes))
        nodes.append(helper.make_node("Concat", pieces, [new_target], axis=0, name=new_target))
    split_x, moved = fresh(f"{base}_split", taken), fresh(f"{base}_moved", taken)
    x_split = list(split)
    x_split[1 if side == 0 else 3] = width
    elem = next((v.type.tensor_type.elem_type for v in graph.value_info if v.name == x), onnx.TensorProto.FLOAT)
    _declare(graph, split_x, x_split, elem)
    _declare(graph, moved, [x_split[a] for a in q], elem)
    shapes[split_x] = tuple(x_split)
    broadcast = core[:, None] if q[0] == 0 else core  # the core's batch axis where the Transpose put B
    name = fresh(f"{gemm.input[side]}_broadcast", taken)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(broadcast), name))
    nodes += [helper.make_node("Reshape", [x, new_target], [split_x], name=split_x),
              helper.make_node("Transpose", [split_x], [moved], perm=q, name=moved),
              helper.make_node("MatMul", [name, moved] if side == 0 else [moved, name], [base], name=base)]
    return nodes


def _slice(target, lo, hi, base, graph, taken, nodes) -> str:
    starts, ends, out = fresh(f"{base}_lo", taken), fresh(f"{base}_hi", taken), fresh(f"{base}_dims", taken)
    graph.initializer.append(numpy_helper.from_array(np.array([lo], np.int64), starts))
    graph.initializer.append(numpy_helper.from_array(np.array([hi], np.int64), ends))
    nodes.append(helper.make_node("Slice", [target, starts, ends], [out], name=out))
    return out


def _declare(graph, name, dims, elem) -> None:
    graph.value_info.append(helper.make_tensor_value_info(
        name, elem, [d[0] if not d[1] else "*".join(([str(d[0])] if d[0] != 1 else []) + list(d[1])) for d in dims]))
