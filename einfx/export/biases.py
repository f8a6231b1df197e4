"""attention_biases: the key bias dropped and the value bias folded into the next bias, exactly.

Attention reads its key and value through a softmax over the key positions j:

    scores[i, j] = q_i · (k_j + b_k)      = q_i · k_j + q_i · b_k
    out_i        = Σ_j p_ij (v_j + b_v)   = Σ_j p_ij v_j + b_v        (Σ_j p_ij = 1)

The key bias adds q_i · b_k to every score of row i, a shift the softmax removes; the value bias leaves the
attention as a constant, which the linear ops after it (head merge, the output projection's cores) carry to
the output projection's bias. So both bias Adds, activation-sized, go: the key's is dropped and the value's,
pushed through those ops with numpy, joins the next constant Add.

Found on the graph, not on module names: a bias is an Add of a constant whose way to a MatMul operand is
Transposes, Reshapes and products with constants; relaid along that way (`relay_constant`), it must be
constant along the key axis (the operand's last axis for the key, its second-to-last for the value). The
scores must reach a Softmax over their last axis through Adds (a mask) and products with constants that are
constant along that axis; the value's MatMul must read the Softmax itself. Every value on those ways has one
reader, so nothing else sees the change. Shapes come from the exporter's value_info; where one is missing
the bias stays.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from einfx.export.onnx_graph import (Dim, constant_values, copy_model, fresh, graph_index, perm_of, prune, rename,
                                     runs, value_shapes)

__all__ = ["attention_biases", "relay_constant"]

_LAYOUT = ("Transpose", "Reshape", "Identity")
_SCALE = ("Mul", "Div")


def attention_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Drop key biases and fold value biases into the next bias (see the module's docstring); returns the new
    model and how many bias Adds it removed."""
    model = copy_model(model)
    graph = model.graph
    values = constant_values(graph)
    shapes = value_shapes(graph)
    producer, readers, outputs, taken = graph_index(graph)
    gone = {}

    def single(name):
        return len(readers[name]) == 1 and name not in outputs

    for softmax in [n for n in graph.node if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]:
        p = softmax.output[0]
        if not _over_last_axis(softmax, shapes):
            continue
        scores = _scores(softmax.input[0], values, producer, single)
        if scores is not None:
            found = _bias(scores.input[1], values, shapes, producer, single)
            if found is not None and found[1].shape[-1] == 1 and id(found[0]) not in gone:
                gone[id(found[0])] = found[0]
        for pv in readers[p]:
            if pv.op_type != "MatMul" or pv.input[0] != p or len(shapes.get(pv.input[1], ())) < 2:
                continue
            found = _bias(pv.input[1], values, shapes, producer, single)
            if found is None or found[1].shape[-2] != 1 or id(found[0]) in gone:
                continue
            target = _fold_target(pv.output[0], found[1], values, shapes, readers, single)
            if target is None:
                continue
            add, slot, merged = target
            name = fresh(f"{add.input[slot]}_value_bias", taken)
            graph.initializer.append(numpy_helper.from_array(merged.astype(values[add.input[slot]].dtype), name))
            add.input[slot] = name
            values[name] = merged
            gone[id(found[0])] = found[0]
    for add in gone.values():
        rename(graph, {add.output[0]: _data_inputs(add, values)[0]})
    keep = [n for n in graph.node if id(n) not in gone]
    del graph.node[:]
    graph.node.extend(keep)
    return prune(model)[0], len(gone)


def relay_constant(c: np.ndarray, node: onnx.NodeProto, values: dict[str, np.ndarray],
                   shapes: dict[str, tuple[Dim, ...]]) -> np.ndarray | None:
    """What ``node`` makes of an additive constant ``c`` on its data input (c of that input's rank, each dim
    1 or the input's): the constant on its output, such that node(x + c) = node(x) + result, or None when
    the node is not linear in that input or a shape is unknown. Transpose, Reshape (each run of axes wholly
    broadcast or wholly known), Identity, Mul/Div by a constant and MatMul against a constant."""
    op = node.op_type
    if op == "Identity":
        return c
    if op == "Transpose":
        return np.transpose(c, perm_of(node))
    if op == "Reshape":
        before, after = shapes.get(node.input[0]), shapes.get(node.output[0])
        if before is None or after is None or len(before) != c.ndim:
            return None
        pairs = runs(list(before), list(after))
        if pairs is None:
            return None
        target = []
        for (i0, i1), (j0, j1) in pairs:
            if all(c.shape[i] == 1 for i in range(i0, i1)):
                target += [1] * (j1 - j0)
            elif all(not before[i][1] and c.shape[i] == before[i][0] for i in range(i0, i1)) \
                    and all(not after[j][1] for j in range(j0, j1)):
                target += [after[j][0] for j in range(j0, j1)]
            else:
                return None
        return c.reshape(target)
    if op in _SCALE:
        consts = [i for i in node.input if i in values]
        if len(consts) != 1 or (op == "Div" and consts[0] != node.input[1]):
            return None
        out = c * values[consts[0]] if op == "Mul" else c / values[consts[0]]
        return out if out.ndim <= c.ndim else None
    if op == "MatMul":
        a, b = node.input
        if b in values and a not in values and c.ndim >= 2:
            w = values[b]
            return np.broadcast_to(c, c.shape[:-1] + (w.shape[-2],)) @ w
        if a in values and b not in values and c.ndim >= 2:
            w = values[a]
            return w @ np.broadcast_to(c, c.shape[:-2] + (w.shape[-1],) + c.shape[-1:])
    return None


def _data_inputs(node, values):
    """The activation inputs of a node: a layout op's first, an arithmetic op's non-constant ones."""
    if node.op_type in _LAYOUT:
        return [node.input[0]] if node.input[0] not in values else []
    return [i for i in node.input if i not in values]


def _over_last_axis(softmax, shapes) -> bool:
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    rank = len(shapes.get(softmax.input[0], ()))
    return axis == -1 or (rank and axis == rank - 1)


def _scores(name, values, producer, single):
    """The MatMul q @ kᵀ whose output reaches the Softmax input ``name`` through ops that change each row by
    a shift or a positive-or-negative scale that is constant along the last axis, or None."""
    while True:
        node = producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "MatMul":
            if not single(node.output[0]) or any(i in values for i in node.input):
                return None
            return node
        if node.op_type == "Add" or (node.op_type == "Sub" and node.input[0] not in values):
            path = [i for i in node.input if i not in values and producer.get(i) is not None]
            # the Add with a mask: keep walking up the score side, the side a MatMul feeds
            nxt = next((i for i in path if _reaches_matmul(i, producer)), None)
            if nxt is None or list(node.input).count(nxt) != 1 or (node.op_type == "Sub" and nxt != node.input[0]):
                return None
        elif node.op_type in _SCALE:
            nxt = node.input[0]
            factor = values.get(node.input[1])
            if nxt in values or factor is None or (factor.ndim and factor.shape[-1] != 1):
                return None
        else:
            return None
        if not single(nxt):
            return None
        name = nxt


def _reaches_matmul(name, producer) -> bool:
    """Whether ``name`` comes from a MatMul through Add/Sub/Mul/Div only (the score side of a masked Add)."""
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "MatMul":
            return True
        if node.op_type not in ("Add", "Sub") + _SCALE:
            return False
        name = node.input[0]
    return False


def _bias(operand, values, shapes, producer, single):
    """(the bias Add, its constant relaid to ``operand``'s layout) when ``operand`` is a bias Add seen through
    layout ops and constant products, each value read once; else None."""
    way, name = [], operand
    while True:
        if not single(name):
            return None
        node = producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Add":
            consts = [i for i in node.input if i in values]
            data = _data_inputs(node, values)
            if len(consts) != 1 or len(data) != 1 or data[0] not in shapes:
                return None
            break
        if node.op_type not in _LAYOUT + _SCALE or len(_data_inputs(node, values)) != 1:
            return None
        way.append(node)
        name = _data_inputs(node, values)[0]
    c = values[consts[0]]
    rank = len(shapes[data[0]])
    if c.ndim > rank:
        return None
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    for step in reversed(way):
        c = relay_constant(c, step, values, shapes)
        if c is None:
            return None
    if c.ndim != len(shapes.get(operand, ())) or c.ndim < 2:
        return None
    return node, c


def _fold_target(name, c, values, shapes, readers, single):
    """Follow an additive constant ``c`` on value ``name`` down its one-reader way through linear ops to an Add
    of a constant; (that Add, the constant's slot, the constant plus c) or None."""
    while single(name):
        node = readers[name][0]
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Add":
            slot = next((k for k, i in enumerate(node.input) if i in values), None)
            if slot is None or node.input[1 - slot] != name:
                return None
            bias = values[node.input[slot]]
            if bias.ndim > c.ndim:
                return None
            merged = bias + c
            while merged.ndim > bias.ndim and merged.shape[0] == 1:
                merged = merged[0]
            return node, slot, merged
        if _data_inputs(node, values) != [name]:
            return None
        c = relay_constant(c, node, values, shapes)
        if c is None:
            return None
        name = node.output[0]
    return None
