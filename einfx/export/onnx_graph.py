"""Helpers shared by the whole-graph rewrites of `einfx.export.graph_passes`: reading constants, perms and
shapes off an ONNX graph, fresh names, copies, and dropping what nothing reads."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["perm_of", "constant_values", "rename", "reshape_target", "last_dim", "prune", "fresh", "copy_model",
           "ELEMENTWISE", "Dim", "value_shapes", "dim_product", "divides", "graph_index", "relay_region", "runs",
           "elementwise_region", "transpose_input_shape", "rebuild", "is_transpose", "working_copy"]

# A dimension as a monomial: an integer factor times named symbols (the exporter's dim_params, such as
# "sequence*batch"), symbols sorted. Two dims are known equal when their monomials are; a dim_param that is
# not a product of integers and names is unknown (None).
Dim = tuple[int, tuple[str, ...]]
_FACTOR = re.compile(r"\d+|[A-Za-z_][A-Za-z0-9_]*")

# ops applied entry by entry (with numpy broadcasting of their other operands): they commute with any
# rearrangement of the entries, so a Transpose can move across them
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Gelu", "Erf", "Tanh", "Sigmoid", "Relu", "Sqrt", "Neg", "Exp",
               "Cast", "Identity", "Abs", "Softplus", "HardSigmoid", "LeakyRelu", "Elu", "Selu"}


def perm_of(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def is_transpose(node: onnx.NodeProto | None, rank: int) -> bool:
    """Whether ``node`` is a default-domain Transpose with an explicit perm of ``rank`` axes."""
    return node is not None and node.op_type == "Transpose" and node.domain in ("", "ai.onnx") \
        and len(perm_of(node) or ()) == rank


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every value computable from initializers alone through Reshape / Transpose / Identity / Cast / Constant."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        try:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            elif not node.input or any(i not in values for i in node.input if i):
                continue
            elif node.op_type == "Reshape":
                data, shape = values[node.input[0]], values[node.input[1]]
                shape = [d if d != 0 else data.shape[i] for i, d in enumerate(shape.tolist())]
                values[node.output[0]] = data.reshape(shape)
            elif node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                values[node.output[0]] = np.transpose(values[node.input[0]], perm)
            elif node.op_type == "Identity":
                values[node.output[0]] = values[node.input[0]]
            elif node.op_type == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                values[node.output[0]] = values[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(to))
        except (ValueError, KeyError):
            continue
    return values


def rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Point every reader of a removed value at its replacement (graph outputs are never removed)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]


def reshape_target(node: onnx.NodeProto | None, values: dict[str, np.ndarray]) -> list[int] | None:
    """A Reshape's constant target with at most one -1 and no 0 (copy) entries, else None."""
    if node is None or node.op_type != "Reshape" or node.input[1] not in values:
        return None
    target = [int(d) for d in values[node.input[1]].reshape(-1)]
    if 0 in target or target.count(-1) > 1 or any(d < -1 for d in target):
        return None
    return target


def last_dim(name: str, producer: dict, values: dict[str, np.ndarray]) -> int | None:
    """The last entry of a shape value, when it is a constant or a Concat ending in a constant."""
    if name in values:
        return int(values[name].reshape(-1)[-1])
    node = producer.get(name)
    if node is not None and node.op_type == "Concat" and node.input and node.input[-1] in values:
        return int(values[node.input[-1]].reshape(-1)[-1])
    return None


def prune(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Drop nodes whose outputs nothing reads and initializers no node reads; returns the count dropped."""
    model = copy_model(model)
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep, dropped = [], 0
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
        else:
            dropped += 1
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = [i for i in graph.initializer if i.name in needed]
    dropped += len(graph.initializer) - len(used)
    del graph.initializer[:]
    graph.initializer.extend(used)
    return model, dropped


def fresh(name: str, taken: set) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim | None:
    if d.HasField("dim_value"):
        return int(d.dim_value), ()
    if not d.HasField("dim_param"):
        return None
    coeff, names = 1, []
    for factor in d.dim_param.replace(" ", "").split("*"):
        if not _FACTOR.fullmatch(factor):
            return None
        if factor.isdigit():
            coeff *= int(factor)
        else:
            names.append(factor)
    return coeff, tuple(sorted(names))


def value_shapes(graph: onnx.GraphProto) -> dict[str, tuple[Dim, ...]]:
    """The shape of every value the graph declares (value_info, inputs, outputs) whose dims are all known as
    monomials (`Dim`); values with an unknown rank or dim are left out."""
    out = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [_dim(d) for d in t.shape.dim]
        if all(d is not None for d in dims):
            out[v.name] = tuple(dims)
    return out


def dim_product(dims) -> Dim:
    coeff, names = 1, []
    for c, n in dims:
        coeff *= c
        names.extend(n)
    return coeff, tuple(sorted(names))


def divides(a: Dim, b: Dim) -> bool:
    """Whether ``a`` divides ``b`` as monomials (a sufficient condition, never a wrong yes)."""
    if a[0] == 0 or b[0] % a[0]:
        return False
    rest = list(b[1])
    for name in a[1]:
        if name not in rest:
            return False
        rest.remove(name)
    return True


def graph_index(graph: onnx.GraphProto) -> tuple[dict, dict, set, set]:
    """(value -> its producing node, value -> the nodes reading it, the graph's output names, every name taken
    by an initializer or a node output) of ``graph``."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    return producer, readers, outputs, taken


def relay_region(graph: onnx.GraphProto, region, entry: str, x: str, perm: list[int], tail: list[int], axis: int,
                 values: dict[str, np.ndarray], taken: set, suffix: str) -> set[str]:
    """Point the elementwise ``region`` that read ``entry`` = (a reshape of) Transpose(x, perm) at ``x`` itself:
    a bias that varies along the trailing axes ``axis:`` of the transposed tensor (their dims ``tail``) is
    rearranged into x's layout, and a scalar of a rank above x's becomes rank 0 (it would grow the result's
    rank); returns the region's outputs, whose declared shapes are stale now."""
    inverse = list(np.argsort(perm))
    relaid = set()
    for node in region:
        relaid.update(node.output)
        for i, name in enumerate(node.input):
            if name == entry:
                node.input[i] = x
            elif name in values and values[name].size == 1 and values[name].ndim > len(perm):
                new = fresh(f"{name}_scalar", taken)
                graph.initializer.append(numpy_helper.from_array(values[name].reshape(()), new))
                node.input[i] = new
            elif name in values and values[name].size > 1:
                shaped = values[name].reshape([1] * axis + list(tail))
                new = fresh(f"{name}_{suffix}", taken)
                graph.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(np.transpose(shaped, inverse)), new))
                node.input[i] = new
    return relaid


def runs(a: list[Dim], b: list[Dim]):
    """Split two shapes of the same size into runs of consecutive axes of equal products:
    [((i0, i1), (j0, j1)), ...], or None when the dims do not allow it as far as monomials tell."""
    runs, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        i0, j0 = i, j
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            # grow the side known to be the smaller: a divisor, or the smaller factor over the same names
            grow_a = divides(pa, pb) or (pa[1] == pb[1] and pa[0] < pb[0])
            grow_b = divides(pb, pa) or (pa[1] == pb[1] and pb[0] < pa[0])
            if grow_a and i < len(a):
                pa, i = dim_product([pa, a[i]]), i + 1
            elif grow_b and j < len(b):
                pb, j = dim_product([pb, b[j]]), j + 1
            else:
                return None
        runs.append(((i0, i), (j0, j)))
    if not runs:
        return None
    # trailing unit dims join the last run
    if any(d != (1, ()) for d in a[i:]) or any(d != (1, ()) for d in b[j:]):
        return None
    (i0, _), (j0, _) = runs[-1]
    runs[-1] = ((i0, len(a)), (j0, len(b)))
    return runs


def elementwise_region(entry, readers, outputs):
    """The elementwise nodes reachable from ``entry`` until one value leaves them for a non-elementwise reader;
    (nodes, that value) or None when the region has other exits."""
    nodes, seen, frontier, exits = [], set(), [entry], set()
    while frontier:
        name = frontier.pop()
        for node in readers[name]:
            if id(node) in seen:
                continue
            if node.op_type in ELEMENTWISE and node.domain in ("", "ai.onnx") \
                    and not any(o in outputs for o in node.output):
                seen.add(id(node))
                nodes.append(node)
                frontier.extend(node.output)
            else:
                exits.add(name)
    if not nodes or len(exits) != 1:
        return None
    exit_ = exits.pop()
    if exit_ == entry or len(readers[exit_]) != 1 or exit_ in outputs:
        return None
    for node in nodes:  # a region value is read in the region, or it is the exit
        for o in node.output:
            if o != exit_ and any(id(r) not in seen for r in readers[o]):
                return None
    return nodes, exit_


def transpose_input_shape(t: onnx.NodeProto, shapes) -> list[Dim] | None:
    """A Transpose's input shape: declared, or read back from its declared output; None when neither is."""
    if t.input[0] in shapes:
        return list(shapes[t.input[0]])
    perm = perm_of(t)
    if t.output[0] not in shapes or perm is None or len(perm) != len(shapes[t.output[0]]):
        return None
    dims = [None] * len(perm)
    for i, a in enumerate(perm):
        dims[a] = shapes[t.output[0]][i]
    return dims


def rebuild(graph: onnx.GraphProto, nodes: list, after: dict | None = None, replace: dict | None = None) -> None:
    """Set ``graph``'s nodes to ``nodes`` (held by the caller, so their ids are fixed) with the nodes in
    ``after[id(node)]`` right after ``node`` (``after[None]`` first) and ``node`` itself swapped for
    ``replace[id(node)]``; a topological order stays one when each new node reads only what comes before it."""
    after, replace = after or {}, replace or {}
    order = list(after.get(None, []))
    for node in nodes:
        order += replace.get(id(node), [node]) + after.get(id(node), [])
    del graph.node[:]
    graph.node.extend(order)


def working_copy(model: onnx.ModelProto) -> tuple:
    """What a rewrite that keeps node identities starts from: (a copy of ``model``, its constant values, its
    declared shapes, producer, readers, output names and taken names (`graph_index`), and the copy's nodes as
    a list held by the caller, so that each node keeps its id)."""
    out = copy_model(model)
    graph = out.graph
    return (out, constant_values(graph), value_shapes(graph), *graph_index(graph), list(graph.node))
