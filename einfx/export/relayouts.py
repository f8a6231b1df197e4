"""merge_relayouts: Transpose -> Reshapes (with elementwise ops between) -> Transpose becomes one Transpose.

A structured layer leaves its last contraction in its own layout: a BTT at d = 384 = 16 · 24 gives
(16, 24, n). The exporter relays that to (n, 16, 24), reshapes it to (b, t, 384), adds the bias, and
attention then splits the heads, (b, t, 12, 32) -> (b, 12, t, 32): two Transposes around Reshapes that hide
from the runtime that the second undoes part of the first. Written over the layer's layout directly,

    y = Transpose(Reshape(x + bias', (12, 32, b, t)), (2, 0, 3, 1))

is the same tensor with one Transpose: the features (16, 24) are contiguous in x, so they reshape to the
heads' (12, 32) in place, whatever the two factorizations.

In general, with t = Transpose(x, p) and e the tensor the second Transpose (perm q) reads, the Reshapes
between them group t's axes and e's axes into runs of equal size (products of dims, symbolic dims such
as "sequence*batch" compared as monomials). When every run of t comes from consecutive axes of x in order,
x reshapes into e's dims run by run and one Transpose finishes; when every run of e lands on consecutive
output axes in order, one Transpose of x gathers each run and a Reshape finishes. Elementwise ops between
the two (a bias, an activation) move into x's layout, their constants rearranged to match, as in
`einfx.export.graph_passes.sink_transposes`. Shapes come from the graph's value_info (the exporter writes it);
a value without a declared shape is left alone.

When the merge would need a general 4-D perm, and a GEMM with a constant core sits next to the relayout (the
layer's last contraction before it, or its first after a head merge), that GEMM may be computed transposed,
yᵀ = xᵀ Cᵀ, which writes the tokens in the middle instead of last: with a factorization aligned to the heads
(12 x 32, `einfx.structures.factorize`) the relayout and the head split (or merge) then become one Transpose
that moves a single axis, and the Transpose on the GEMM's other side changes its perm without growing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from einfx.export.gemm_flip import core_side, read_swapped, set_perm, swap_info, swapped, transpose_gemm
from einfx.export.onnx_graph import (Dim, constant_values, copy_model, elementwise_region, fresh, graph_index,
                                     perm_of, prune, relay_region, runs, value_shapes)

__all__ = ["merge_relayouts", "merged_transpose", "moves_one_axis"]


@dataclass
class _Merge:
    first: onnx.NodeProto          # Transpose(x, p)
    reshapes: list                 # the Reshapes on the way (their outputs read by nothing else)
    region: list                   # elementwise nodes on the way (they stay where they are in the graph)
    entry: str                     # the value the region reads from the way (None without a region)
    exit: str                      # the value that leaves the region (x when there is none)
    last: onnx.NodeProto           # Transpose(e, q)
    target: str                    # a shape tensor holding e's shape (the last Reshape's target)
    axis: int                      # the first axis of t that a bias in the region spans
    order: list                    # positions of e's axes in the new Reshape's target, in order
    perm: list                     # the merged Transpose's perm
    reshape_first: bool            # Reshape then Transpose (else Transpose then Reshape)


def merge_relayouts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Transpose -> Reshape(s) and elementwise ops -> Transpose as one Reshape and one Transpose (see the
    module's docstring); returns the new model and how many Transposes it removed. Exact: the same entries
    in the same places."""
    model = copy_model(model)
    graph = model.graph
    values = constant_values(graph)
    shapes = value_shapes(graph)
    producer, readers, outputs, taken = graph_index(graph)
    replace, drop, relaid, count = {}, set(), set(), 0
    for node in list(graph.node):
        plan = _plan(node, values, shapes, producer, readers, outputs)
        if plan is None:
            plan = _flipped(node, graph, values, shapes, producer, readers, outputs, taken, drop)
        if plan is None or any(id(n) in drop for n in [plan.first, plan.last, *plan.reshapes, *plan.region]):
            continue
        x = plan.first.input[0]
        p = perm_of(plan.first)
        t_shape = [shapes[x][i] for i in p]
        relaid |= relay_region(graph, plan.region, plan.entry, x, p, [d[0] for d in t_shape[plan.axis:]], plan.axis,
                               values, taken, "relaid")
        base = plan.last.output[0]
        new_nodes = []
        if plan.target in values:
            target = fresh(f"{base}_shape", taken)
            graph.initializer.append(numpy_helper.from_array(
                values[plan.target].reshape(-1)[plan.order].astype(np.int64), target))
        else:
            index, target = fresh(f"{base}_shape_index", taken), fresh(f"{base}_shape", taken)
            graph.initializer.append(numpy_helper.from_array(np.array(plan.order, np.int64), index))
            new_nodes.append(helper.make_node("Gather", [plan.target, index], [target], axis=0, name=target))
        source = x if not plan.region else plan.exit
        middle = None if plan.perm == sorted(plan.perm) else fresh(f"{base}_merged", taken)
        if middle is None:  # the two Transposes cancel: a Reshape is all that is left
            new_nodes.append(helper.make_node("Reshape", [source, target], [base], name=base + "_merged_r"))
        elif plan.reshape_first:
            new_nodes += [helper.make_node("Reshape", [source, target], [middle], name=middle),
                          helper.make_node("Transpose", [middle], [base], perm=plan.perm, name=base + "_merged_t")]
        else:
            new_nodes += [helper.make_node("Transpose", [source], [middle], perm=plan.perm, name=middle),
                          helper.make_node("Reshape", [middle, target], [base], name=base + "_merged_r")]
        replace[id(plan.last)] = new_nodes
        drop.update({id(plan.first)} | {id(r) for r in plan.reshapes})
        count += 1
    if not count and not drop:
        return model, 0
    for v in [v for v in graph.value_info if v.name in relaid]:  # their shapes are x's layout's now
        graph.value_info.remove(v)
    new = []
    for node in graph.node:
        if id(node) not in drop:
            new.extend(replace.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(new)
    return prune(model)[0], count


def merged_transpose(first, values, shapes, producer, readers, outputs
                     ) -> tuple[onnx.NodeProto, list[int], list[Dim]] | None:
    """What `merge_relayouts` would make of the Transpose ``first`` and the Transpose its way (Reshapes, an
    elementwise region) ends at, as one Reshape and then one Transpose, even where that Transpose would move
    more than one block of axes and the merge is therefore not made: (the far Transpose, the merged perm, the
    dims it permutes), or None. `einfx.export.batch_order.heads_first` prices with it a merge that exchanging
    attention's batch axes makes possible."""
    plan = _plan(first, values, shapes, producer, readers, outputs, any_perm=True)
    if plan is None or not plan.reshape_first:
        return None
    e_shape = shapes[plan.last.input[0]]
    return plan.last, plan.perm, [e_shape[j] for j in plan.order]


def _plan(first, values, shapes, producer, readers, outputs, any_perm: bool = False) -> _Merge | None:
    if first.op_type != "Transpose" or first.domain not in ("", "ai.onnx") or perm_of(first) is None:
        return None
    x, p = first.input[0], perm_of(first)
    if x in values or x not in shapes or len(shapes[x]) != len(p) or first.output[0] in outputs:
        return None
    t_shape = [shapes[x][i] for i in p]
    way = _way(first, readers, outputs)
    if way is None:
        return None
    reshapes, region, entry, exit_, last = way
    if not reshapes or last.input[0] not in shapes or perm_of(last) is None:
        return None
    e_shape, q = list(shapes[last.input[0]]), perm_of(last)
    if len(q) != len(e_shape):
        return None
    axis = len(t_shape)
    if region:
        axis = _bias_axis(region, entry, t_shape, values, shapes)
        if axis is None:
            return None
    target = reshapes[-1].input[1]
    if not _plain_target(target, values, producer, len(e_shape)):
        return None
    pairs = runs(t_shape, e_shape)
    if pairs is None:
        return None
    # Reshape x into e's dims run by run, then one Transpose: each run of t is consecutive axes of x, in order
    if all(p[i0:i1] == list(range(p[i0], p[i0] + i1 - i0)) for (i0, i1), _ in pairs):
        in_x = sorted(pairs, key=lambda r: p[r[0][0]])
        order = [j for _, (j0, j1) in in_x for j in range(j0, j1)]
        perm = [order.index(j) for j in q]
        if not any_perm and not moves_one_axis(perm, [e_shape[j] for j in order]):
            return None
        return _Merge(first, reshapes, region, entry, exit_, last, target, axis, order, perm, True)
    # one Transpose gathering each run of x, then Reshape: each run of e lands on consecutive output axes, in order
    out = {}
    for run in pairs:
        (j0, j1) = run[1]
        where = [m for m, j in enumerate(q) if j0 <= j < j1]
        if [q[m] for m in where] != list(range(j0, j1)) or where != list(range(where[0], where[0] + len(where))):
            return None
        out[where[0]] = run
    perm = [p[i] for m in sorted(out) for i in range(*out[m][0])]
    if not any_perm and not moves_one_axis(perm, list(shapes[x])):
        return None
    return _Merge(first, reshapes, region, entry, exit_, last, target, axis, list(q), perm, False)


def _flipped(first, graph, values, shapes, producer, readers, outputs, taken, drop) -> _Merge | None:
    """The merge of ``first`` once a GEMM next to it is computed the other way round, or None.

    A layer's contraction y = C · X (C a constant (B, K, R) core, y (B, K, N)) puts the tokens last; the same
    GEMM as yᵀ = Xᵀ · Cᵀ writes (B, N, K) for the same work (and X · C the other way round). Where a relayout
    and a head split or merge cannot become one Transpose (it would be a general 4-D perm), the other
    orientation often can:

    - output side: ``first`` relays the layer's last GEMM output y (through an identity Reshape at most) and X
      is a Transpose; X's perm and ``first``'s are composed with (0, 2, 1);
    - input side: ``first`` (attention's head merge) reaches, through Reshapes, the Transpose X that feeds the
      layer's first GEMM, whose output y goes to one Transpose (through an identity Reshape at most); X's perm
      and that Transpose's are composed with (0, 2, 1).

    The Transpose on the far side must still move one block of axes, and the graph is changed only when the
    merge is planned."""
    if first.op_type != "Transpose" or perm_of(first) is None or first.input[0] in values:
        return None
    return _flip_output(first, graph, values, shapes, producer, readers, outputs, taken, drop) \
        or _flip_input(first, graph, values, shapes, producer, readers, outputs, taken, drop)


def _gemm_side(gemm, values, readers, outputs, drop) -> int | None:
    """Which operand of a MatMul is its one constant rank-3 core (0 or 1), when its output has one reader."""
    if gemm is None or id(gemm) in drop or gemm.output[0] in outputs or len(readers[gemm.output[0]]) != 1:
        return None
    return core_side(gemm, values)


def _identity_reshape(node, readers, shapes, outputs) -> bool:
    """Whether ``node`` is a Reshape that keeps its input's shape, its output read once and not a graph output."""
    return node is not None and node.op_type == "Reshape" and node.output[0] not in outputs \
        and len(readers[node.output[0]]) == 1 and node.input[0] in shapes \
        and shapes.get(node.output[0]) == shapes[node.input[0]]


def _past_identity(name, producer, readers, shapes, outputs):
    """(the value before an identity Reshape that produces ``name``, that Reshape), or (name, None)."""
    node = producer.get(name)
    if _identity_reshape(node, readers, shapes, outputs):
        return node.input[0], node
    return name, None


def _flip_output(first, graph, values, shapes, producer, readers, outputs, taken, drop) -> _Merge | None:
    y, bypass = _past_identity(first.input[0], producer, readers, shapes, outputs)
    gemm = producer.get(y)
    side = _gemm_side(gemm, values, readers, outputs, drop)
    if side is None or y not in shapes:
        return None
    z = gemm.input[1 - side]
    feeder = producer.get(z)
    if feeder is None or feeder.op_type != "Transpose" or len(readers[z]) != 1 or z in outputs \
            or len(shapes.get(z, ())) != 3 or feeder.input[0] not in shapes \
            or not moves_one_axis(swapped(perm_of(feeder)), list(shapes[feeder.input[0]])):
        return None
    p, old_input = perm_of(first), first.input[0]
    probe = fresh(f"{y}_flipped", taken)
    shapes[probe] = tuple(shapes[y][i] for i in (0, 2, 1))
    first.input[0] = probe
    set_perm(first, read_swapped(p))
    readers[probe] = [first]
    plan = _plan(first, values, shapes, producer, readers, outputs)
    if plan is None:
        first.input[0] = old_input
        set_perm(first, p)
        return None
    new_z = fresh(f"{z}_flipped", taken)
    set_perm(feeder, swapped(perm_of(feeder)))
    feeder.output[0] = new_z
    swap_info(graph, shapes, z, new_z)
    new_y = transpose_gemm(gemm, side, new_z, graph, values, shapes, taken)
    first.input[0] = new_y
    shapes[new_y] = shapes[probe]
    producer[new_y], producer[new_z], readers[new_z], readers[new_y] = gemm, feeder, [gemm], [first]
    if bypass is not None:
        drop.add(id(bypass))  # nothing reads it now
    return plan


def _flip_input(first, graph, values, shapes, producer, readers, outputs, taken, drop) -> _Merge | None:
    way = _way(first, readers, outputs)
    if way is None or way[1]:  # no elementwise region on this side
        return None
    last = way[4]
    x = last.output[0]
    gemm = readers[x][0] if len(readers[x]) == 1 and x not in outputs else None
    side = _gemm_side(gemm, values, readers, outputs, drop)
    if side is None or gemm.input[1 - side] != x or len(shapes.get(x, ())) != 3:
        return None
    y = gemm.output[0]
    reader, bypass = readers[y][0], None
    if _identity_reshape(reader, readers, shapes, outputs):
        bypass, reader = reader, readers[reader.output[0]][0]
    if reader.op_type != "Transpose" or perm_of(reader) is None or y not in shapes \
            or not moves_one_axis(read_swapped(perm_of(reader)), [shapes[y][i] for i in (0, 2, 1)]):
        return None
    q = perm_of(last)
    set_perm(last, swapped(q))
    plan = _plan(first, values, shapes, producer, readers, outputs)
    if plan is None:
        set_perm(last, q)
        return None
    new_x = fresh(f"{x}_flipped", taken)
    last.output[0] = new_x
    swap_info(graph, shapes, x, new_x)
    new_y = transpose_gemm(gemm, side, new_x, graph, values, shapes, taken)
    reader.input[0] = new_y
    set_perm(reader, read_swapped(perm_of(reader)))
    producer[new_x], producer[new_y], readers[new_x], readers[new_y] = last, gemm, [gemm], [reader]
    if bypass is not None:
        drop.add(id(bypass))
    return plan


def moves_one_axis(perm: list[int], dims: list[Dim]) -> bool:
    """Whether a Transpose of ``dims`` by ``perm`` moves a single block of axes, once unit axes are dropped and
    axes that stay neighbours are merged: a plain or batched 2-D transpose, or rows moved whole. Runtimes run
    those at copy speed; onnxruntime ran a general 4-D perm such as (2, 0, 3, 1) at (12, 32, 8, 128) 6x slower
    than either of the two one-block Transposes it replaced."""
    kept = [a for a in perm if dims[a] != (1, ())]
    rank = {a: i for i, a in enumerate(sorted(kept))}
    kept = [rank[a] for a in kept]
    merged = [a for k, a in enumerate(kept) if k == 0 or kept[k - 1] != a - 1]
    rank = {a: i for i, a in enumerate(sorted(merged))}
    merged = [rank[a] for a in merged]
    return any(merged[:k] + merged[k + 1:] == sorted(merged[:k] + merged[k + 1:]) for k in range(len(merged))) \
        or len(merged) <= 1


def _way(first, readers, outputs):
    """From ``first``'s output to the next Transpose: Reshapes and one elementwise region, every value on the way
    read only on it; (reshapes, region nodes, the region's entry, its exit, the last Transpose) or None."""
    reshapes, region, entry, exit_ = [], [], None, None
    name = first.output[0]
    while True:
        users = readers[name]
        if name in outputs or not users:
            return None
        if len(users) == 1 and users[0].input[0] == name and users[0].op_type == "Transpose" \
                and users[0].domain in ("", "ai.onnx"):
            return reshapes, region, entry, exit_, users[0]
        if len(users) == 1 and users[0].op_type == "Reshape" and users[0].input[0] == name:
            reshapes.append(users[0])
            name = users[0].output[0]
            continue
        if region:
            return None  # one elementwise region on the way at most
        found = elementwise_region(name, readers, outputs)
        if found is None:
            return None
        region, exit_ = found
        entry, name = name, exit_


def _bias_axis(region, entry, t_shape, values, shapes) -> int | None:
    """The first axis of t whose trailing axes make the region's last axis, where its constants may vary (a
    bias); None when a region operand is not a constant, a scalar or such a bias."""
    if entry not in shapes:
        return None
    entry_shape = shapes[entry]
    width = entry_shape[-1]
    if width[1]:
        return None
    axis, span = len(t_shape), 1
    while axis > 0 and span < width[0] and not t_shape[axis - 1][1]:
        axis, span = axis - 1, span * t_shape[axis - 1][0]
    inside = {entry} | {o for n in region for o in n.output}
    for node in region:
        for i in node.input:
            if not i or i in inside:
                continue
            if i not in values:
                return None
            c = values[i]
            if c.ndim > len(entry_shape):
                return None  # it would grow the rank
            if c.size > 1 and not (span == width[0] and c.size == width[0] and c.shape[-1] == width[0]):
                return None
    return axis


def _plain_target(name, values, producer, rank=None) -> bool:
    """Whether a Reshape target never copies an input dim (no 0 entry): a constant without 0 (of ``rank``
    entries at the top), a Shape (the dims of a real tensor), or a Concat, Gather or Slice of such values."""
    if name in values:
        v = values[name].reshape(-1)
        return (rank is None or v.size == rank) and 0 not in v.tolist()
    node = producer.get(name)
    if node is None:
        return False
    if node.op_type == "Shape":
        return rank is None
    if node.op_type == "Concat":
        return all(_plain_target(i, values, producer) for i in node.input)
    if node.op_type in ("Gather", "Slice"):
        return _plain_target(node.input[0], values, producer)
    return False
