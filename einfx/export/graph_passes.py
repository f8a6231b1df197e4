"""Whole-graph rewrites of an exported ONNX model: exact, pure functions from a ModelProto to a new one.

    dedupe            common-subexpression elimination: nodes with the same op, attributes and inputs (small
                      constant inputs compared by value) become one; q, k and v's identical input reshapes and
                      transposes collapse to one
    attention_biases  attention's key bias dropped (the softmax removes the shift it makes) and its value bias
                      carried through the linear ops after attention into the output projection's bias (the
                      softmax's rows sum to 1) (`einfx.export.biases`): two activation-sized Adds fewer a block
    fuse_siblings     MatMuls that read the same activation against constant right operands of the same batch
                      and contraction sizes become one MatMul against the operands concatenated on the last
                      axis, then a Split: q/k/v (or LLaMA's gate/up) run one GEMM instead of three
    share_relayouts   the fused siblings' identical relayouts after their Split made once before it, with the
                      first cores' rows reordered to match, and their next GEMMs stacked into one
                      (`einfx.export.shared_relayouts`): BTT q, k and v regroup for their second cores with one
                      Transpose and one GEMM instead of three each
    sink_transposes   a layer's output Transpose moved across the reshapes and elementwise ops that lead to
                      the next layer (fc1 -> bias -> GELU -> fc2): the ops run in the layer's own layout
                      (constants rearranged to match) and the Transpose meets the next layer's input one
    merge_relayouts   Transpose -> Reshapes (a bias or an activation between) -> Transpose becomes one Reshape
                      and one Transpose where that Transpose moves a single block of axes
                      (`einfx.export.relayouts`): a BTT key projection's output relayout and attention's head
                      split become one copy
    heads_first       attention (scores, scale, mask, softmax, values) run with its batch axes exchanged,
                      (heads, batch, ...), where that costs fewer Transposes (`einfx.export.batch_order`): a
                      head-aligned q or v is split into heads by a Reshape
    split_before_gemms  a token split and batch-axis Transpose after a batched GEMM moved before it, the core
                      broadcast (`einfx.export.early_splits`): a head-aligned key's split meets the Transpose
                      between its cores; merge_relayouts runs again after these two
    transpose_pairs   Transpose followed by Transpose becomes one Transpose, or nothing when they cancel; a
                      Transpose that keeps every axis in place goes
    orient_gemms      each chain of constant-core batched GEMMs computed the way round (y = C·X or yᵀ = Xᵀ·Cᵀ)
                      whose Transposes cost least, priced by the entries they move and whether the last axis
                      moves (`einfx.export.orientation`): the swap between a BTT MLP's fc1 and fc2 disappears
    plain_norm_sums   an Add of two activations that a LayerNormalization reads (a residual sum) becomes a
                      Sum of the same two: the same values, but a pattern onnxruntime's SkipLayerNormalization
                      fusion does not match; that fused kernel ran 3.4x slower than Add + LayerNormalization at
                      8 x 128 x 384 on the project's host (Xeon with AVX-512, onnxruntime 1.32, 2 threads),
                      so whether to keep it is timed (`einfx.export.pass_choice`)
    store_layouts     each weight stored in the layout its reader takes: a chain of Reshapes and Transposes of
                      an initializer becomes the initializer it computes (`einfx.export.stored_layouts`): every
                      GEMM reads a constant, pre-transposed weight
    prune             drop nodes and initializers nothing reads

Constant right operands are evaluated with numpy through the weight-side ops the exporter emits (Reshape,
Transpose, Identity, Cast, Constant), so the fused operand is a single pre-arranged initializer. Every
rewrite keeps the node order topological and the values bit-for-bit what they were, up to the runtime's
GEMM blocking, but attention_biases, which is exact in real arithmetic and moves float32 rounding only
(to_onnx verifies the result against torch).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from einfx.errors import ExportError
from einfx.export.batch_order import heads_first
from einfx.export.biases import attention_biases
from einfx.export.early_splits import split_before_gemms
from einfx.export.orientation import orient_gemms
from einfx.export.relayouts import merge_relayouts
from einfx.export.shared_relayouts import share_relayouts
from einfx.export.stored_layouts import store_layouts
from einfx.export.onnx_graph import (ELEMENTWISE, constant_values, copy_model, fresh, graph_index, last_dim,
                                      perm_of, prune, relay_region, rename, reshape_target)

__all__ = ["optimize_graph", "PASSES", "LABELS", "dedupe", "attention_biases", "fuse_siblings", "share_relayouts",
           "prune",
           "sink_transposes", "merge_relayouts", "heads_first", "split_before_gemms", "orient_gemms", "transpose_pairs",
           "plain_norm_sums", "store_layouts", "constant_values"]

# a constant input this small is compared by value in dedupe (shapes, axes, perms), larger ones by name
_SMALL = 64


def _key(node: onnx.NodeProto, values: dict[str, np.ndarray]):
    ins = []
    for name in node.input:
        v = values.get(name)
        if v is not None and v.size <= _SMALL:
            ins.append(("const", str(v.dtype), v.shape, v.tobytes()))
        else:
            ins.append(name)
    attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
    return node.op_type, node.domain, tuple(ins), attrs, len(node.output)


def dedupe(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Common-subexpression elimination; returns the new model and how many nodes were merged."""
    model = copy_model(model)
    graph = model.graph
    values = constant_values(graph)
    seen, mapping, keep, merged = {}, {}, [], 0
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = mapping.get(name, name)
        stateful = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute) \
            or node.op_type.startswith("Random") or node.op_type == "Constant"
        key = None if stateful or any(o in outputs for o in node.output) else _key(node, values)
        if key is not None and key in seen:
            for mine, theirs in zip(node.output, seen[key].output):
                mapping[mine] = theirs
            merged += 1
            continue
        if key is not None:
            seen[key] = node
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model, merged


def fuse_siblings(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """One MatMul per group of MatMuls that share their activation operand and have constant other operands
    of the same shape but for the free axis; returns the new model and the number of MatMuls removed.

    ``x @ W_i`` (constant on the right) concatenates the W_i on their last axis and splits the output's last
    axis; ``W_i @ x`` (constant on the left, a plan that computes y transposed) concatenates on the W_i's
    row axis and splits the output's second-to-last axis.
    """
    model = copy_model(model)
    graph = model.graph
    values = constant_values(graph)
    groups = defaultdict(list)
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = node.input[0], node.input[1]
        if b in values and a not in values and values[b].ndim >= 2:
            w = values[b]
            groups[("right", a, w.shape[:-1], str(w.dtype))].append(i)
        elif a in values and b not in values and values[a].ndim >= 2:
            w = values[a]
            groups[("left", b, w.shape[:-2] + w.shape[-1:], str(w.dtype))].append(i)
    replaced, removed = {}, 0
    existing = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    for (side, x, _, _), members in groups.items():
        if len(members) < 2:
            continue
        nodes = [graph.node[i] for i in members]
        right = side == "right"
        weights = [values[n.input[1] if right else n.input[0]] for n in nodes]
        axis = -1 if right else -2
        base = fresh(f"{nodes[0].output[0]}_siblings", existing)
        w_name, s_name = fresh(base + "_weight", existing), fresh(base + "_split", existing)
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=axis), w_name))
        graph.initializer.append(numpy_helper.from_array(np.array([w.shape[axis] for w in weights], np.int64), s_name))
        inputs = [x, w_name] if right else [w_name, x]
        fused = [helper.make_node("MatMul", inputs, [base], name=base),
                 helper.make_node("Split", [base, s_name], [n.output[0] for n in nodes], axis=axis,
                                  name=base + "/split")]
        replaced[members[0]] = fused
        for i in members[1:]:
            replaced[i] = []
        removed += len(members) - 1
    if not replaced:
        return model, 0
    new = []
    for i, node in enumerate(graph.node):
        new.extend(replaced.get(i, [node]))
    del graph.node[:]
    graph.node.extend(new)
    return prune(model)[0], removed


def transpose_pairs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Transpose(Transpose(x, p), q) -> Transpose(x, p∘q), or x when the composition is the identity (only
    where the inner Transpose has no other reader); a lone Transpose that keeps every axis in place (a flip in
    merge_relayouts can leave one) is x too. Graph outputs stay."""
    model = copy_model(model)
    graph = model.graph
    producer, readers, outputs, _ = graph_index(graph)
    mapping, drop, count = {}, set(), 0
    for node in graph.node:
        if node.op_type != "Transpose":
            continue
        if perm_of(node) == sorted(perm_of(node) or [None]) and node.output[0] not in outputs:
            mapping[node.output[0]] = mapping.get(node.input[0], node.input[0])
            drop.add(id(node))
            count += 1
            continue
        inner = producer.get(node.input[0])
        if inner is None or inner.op_type != "Transpose" or len(readers[inner.output[0]]) != 1 \
                or inner.output[0] in outputs:
            continue
        p, q = perm_of(inner), perm_of(node)
        if p is None or q is None or len(p) != len(q):
            continue
        composed = [p[i] for i in q]
        drop.add(id(inner))
        count += 1
        del node.attribute[:]
        node.input[0] = inner.input[0]
        if composed == sorted(composed) and node.output[0] not in outputs:
            mapping[node.output[0]] = inner.input[0]
            drop.add(id(node))
        else:
            node.attribute.append(helper.make_attribute("perm", composed))
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    rename(graph, mapping)
    return model, count


def sink_transposes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Move a Transpose across Reshape -> elementwise ops -> Reshape back to the same shape; returns the count.

    The pattern, as a layer's output meets the next layer's input (t's shape known up to one axis, from the
    constant Reshape that makes x)::

        t = Transpose(x, p); r = Reshape(t, ...); z = elementwise ops of r and constants; u = Reshape(z, shape(t))
        ->  z' = the same ops of x, constants rearranged into x's layout;  u = Transpose(z', p)

    exact, since the ops act entry by entry. Constants must be scalars or vary along the last axis of r only
    (a bias), that axis spanning trailing axes of t; no value inside may be read from outside. The moved
    Transpose then meets the next layer's input Transpose, and `transpose_pairs` merges or cancels them.
    """
    model = copy_model(model)
    graph = model.graph
    values = constant_values(graph)
    producer, readers, outputs, existing = graph_index(graph)
    replace, drop, relaid, count = {}, set(), set(), 0
    for t_node in list(graph.node):
        plan = _sinkable(t_node, values, producer, readers, outputs)
        if plan is None or id(t_node) in drop or any(id(n) in drop for n in plan[0] + plan[1]):
            continue
        chain, region, r2, x_shape, axis = plan
        p = perm_of(t_node)
        t_shape = [x_shape[q] for q in p]
        relaid |= relay_region(graph, region, chain[-1].output[0], t_node.input[0], p,
                               [int(d) for d in t_shape[axis:]], axis, values, existing, "sunk")
        moved = fresh(f"{r2.output[0]}_sunk", existing)
        replace[id(r2)] = helper.make_node("Transpose", [r2.input[0]], [r2.output[0]], perm=p, name=moved)
        drop.update({id(t_node)} | {id(r) for r in chain})
        count += 1
    if not count:
        return model, 0
    stale = [v for v in graph.value_info if v.name in relaid]  # their shapes are now x's layout's
    for v in stale:
        graph.value_info.remove(v)
    new_nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(new_nodes)
    return prune(model)[0], count


def _sinkable(t_node, values, producer, readers, outputs):
    """When ``t_node`` starts the pattern of `sink_transposes`: (the reshapes after it, the region's nodes, r2,
    x's shape with -1 for its unknown axis, the first axis of t that the constants span); else None."""
    if t_node.op_type != "Transpose" or perm_of(t_node) is None or t_node.output[0] in outputs:
        return None
    x_shape = reshape_target(producer.get(t_node.input[0]), values)
    p = perm_of(t_node)
    if x_shape is None or len(x_shape) != len(p) or t_node.input[0] in values:
        return None
    t_shape = [x_shape[q] for q in p]
    users = readers[t_node.output[0]]
    if len(users) != 1 or users[0].op_type != "Reshape":
        return None
    chain = [users[0]]  # Reshape after Reshape (a plan's restore, then the model's view): one reshape
    while len(readers[chain[-1].output[0]]) == 1 and readers[chain[-1].output[0]][0].op_type == "Reshape" \
            and readers[chain[-1].output[0]][0].input[0] == chain[-1].output[0] \
            and chain[-1].output[0] not in outputs:
        chain.append(readers[chain[-1].output[0]][0])
    if any(r.output[0] in outputs for r in chain):
        return None
    r1 = chain[-1]
    width = last_dim(r1.input[1], producer, values)
    # the axis of t from which the trailing axes make r1's last axis (where a bias varies)
    axis, span = len(t_shape), 1
    while axis > 0 and width is not None and span < width and t_shape[axis - 1] > 0:
        axis, span = axis - 1, span * t_shape[axis - 1]
    bias_ok = width is not None and span == width
    region, seen, frontier, r2 = [], set(), [r1.output[0]], None
    while frontier:  # every node reachable from r1 up to r2: elementwise ops only
        name = frontier.pop()
        for node in readers[name]:
            if id(node) in seen or node is r2:
                continue
            if node.op_type == "Reshape" and node.input[0] == name and node.input[1] in values:
                if r2 is not None or name == r1.output[0]:
                    return None
                r2 = node
                continue
            if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx") or \
                    any(o in outputs for o in node.output):
                return None
            region.append(node)
            seen.add(id(node))
            frontier.extend(node.output)
    inside = {r1.output[0]} | {o for n in region for o in n.output}
    for node in region:  # the other operands: constants, scalars or a bias along r1's last axis
        for i in node.input:
            if i in inside:
                continue
            if i not in values:
                return None  # a non-constant operand from outside the region
            c = values[i]
            if c.size > 1 and not (bias_ok and c.shape[-1] == width and c.size == width):
                return None
    if r2 is None or not region or r2.input[0] not in {o for n in region for o in n.output}:
        return None
    # every value of the region is read inside it or by r2 only (checked above: readers are region or r2)
    # r2 must give back t's shape: the same dims, at most one -1, and t's unknown axis (if any) that -1; the
    # region neither grows nor shrinks the entries, so the -1 resolves to t's dim
    target = [int(d) for d in values[r2.input[1]].reshape(-1)]
    if len(target) != len(t_shape) or target.count(-1) > 1 or any(d == 0 or d < -1 for d in target):
        return None
    if any(a != b and a != -1 for a, b in zip(target, t_shape)):
        return None
    return chain, region, r2, x_shape, axis


def plain_norm_sums(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Add(a, b) -> Sum(a, b) where a LayerNormalization reads the sum and neither operand is a constant;
    returns the new model and the count. Sum broadcasts as Add does, so every reader sees the same values."""
    model = copy_model(model)
    graph = model.graph
    values = constant_values(graph)
    normed = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")}
    count = 0
    for node in graph.node:
        if (node.op_type == "Add" and node.domain in ("", "ai.onnx") and node.output[0] in normed
                and not any(i in values for i in node.input)):
            node.op_type = "Sum"
            count += 1
    return model, count


# the passes in the order optimize_graph runs them, each with the name of its count in the report;
# merge_relayouts runs again once heads_first and split_before_gemms have moved Transposes, its counts summed
_STEPS = [("dedupe", dedupe, "deduplicated"), ("attention_biases", attention_biases, "attention biases folded"),
          ("fuse_siblings", fuse_siblings, "sibling matmuls fused"),
          ("share_relayouts", share_relayouts, "sibling relayouts shared"),
          ("sink_transposes", sink_transposes, "transposes sunk"),
          ("merge_relayouts", merge_relayouts, "relayouts merged"),
          ("heads_first", heads_first, "attention transposes removed by heads first"),
          ("split_before_gemms", split_before_gemms, "token splits moved before a GEMM"),
          ("merge_relayouts", merge_relayouts, "relayouts merged"),
          ("transpose_pairs", transpose_pairs, "transpose pairs"),
          ("orient_gemms", orient_gemms, "GEMMs flipped by orientation"),
          ("plain_norm_sums", plain_norm_sums, "norm sums kept plain"),
          ("store_layouts", store_layouts, "weight relayouts stored"), ("prune", prune, "pruned")]
PASSES = tuple(dict.fromkeys(name for name, _, _ in _STEPS))
LABELS = {name: label for name, _, label in _STEPS}  # pass -> the name of its count in the report


def optimize_graph(model: onnx.ModelProto, skip: Collection[str] = ()) -> tuple[onnx.ModelProto, dict[str, int]]:
    """dedupe, attention_biases, fuse_siblings, share_relayouts, sink_transposes, merge_relayouts, heads_first,
    split_before_gemms, merge_relayouts again, transpose_pairs, orient_gemms, plain_norm_sums, store_layouts and
    prune, in that order, but those named in ``skip``; returns the model and the counts (0 for a skipped pass).

    Raises:
        ExportError: a name in ``skip`` is not one of `PASSES`.
    """
    unknown = sorted(set(skip) - set(PASSES))
    if unknown:
        raise ExportError(f"graph passes {unknown} are unknown; valid: {', '.join(PASSES)}")
    counts = {}
    for name, rewrite, label in _STEPS:
        count = 0
        if name not in skip:
            model, count = rewrite(model)
        counts[label] = counts.get(label, 0) + count
    return model, counts
