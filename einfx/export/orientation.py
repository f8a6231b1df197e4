"""orient_gemms: which way round each batched GEMM of a chain computes, chosen for the whole chain.

A structured layer is a chain of batched GEMMs against constant cores, with a Transpose between each two
(a BTT's cores, then the next layer's). Each GEMM can compute y = C · X, tokens last, or yᵀ = Xᵀ · Cᵀ, tokens
in the middle, for the same work (`einfx.export.gemm_flip`). Flipping a GEMM changes the perm of the
Transpose on each side of it: a Transpose that only exchanged the last two axes disappears, another turns into
one that moves a single block of axes, or into a general perm that runtimes run several times slower. Between
fc1 and fc2 of a BTT MLP, for example, the exporter writes

    fc1's last GEMM -> (32, 48, n) -> bias, GELU -> Transpose (0, 2, 1) -> fc2's first GEMM -> Transpose (2, 0, 1)

and with fc2's first GEMM flipped, the first Transpose is gone and the second becomes (1, 0, 2).

A Transpose is priced by what it moves (`transpose_cost`): its entries, times three for a general perm,
times four when the last axis moves, for then the entries are gathered one by one where a Transpose that
keeps the last axis copies whole rows. OpenVINO ran MiniLM btt(4)'s (128, 16, n) -> (16, n, 128) relayout
(between fc2's cores) in 3.8 ms at n = 1024 and the (16, n, 24) -> (n, 16, 24) after it in 0.08 ms. Priced
so, fc2's second GEMM is computed the other way round: the relayout between the cores keeps the tokens last,
(128, 16, n) -> (16, 128, n), and the one after it, (16, 24, n) -> (n, 16, 24), moves the last axis of a
tensor a fifth the size; the same count of Transposes. With default plans MiniLM btt(4) ran 5-6% faster in
onnxruntime and 6-8% in OpenVINO priced this way than with Transposes counted, btt(1) the same within noise.

The GEMMs form paths (each reads one activation and is read once); along a path, each Transpose's cost
depends on the orientations of the GEMMs on its two sides only, so a two-state dynamic program over the path
finds the cheapest orientations (a flip that changes nothing is a tie broken towards the graph as it was).
Elementwise ops between a GEMM and its Transpose (a bias, GELU) run in the GEMM's layout, their constants
rearranged; Transposes on the path's ends keep what they hand to the rest of the graph. Reshapes that keep
their input's declared shape are dropped first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from einfx.export.gemm_flip import core_side, read_swapped, set_perm, swap_info, swapped, transpose_gemm
from einfx.export.onnx_graph import (ELEMENTWISE, constant_values, copy_model, elementwise_region, fresh,
                                     graph_index, is_transpose, perm_of, prune, rebuild, rename,
                                     transpose_input_shape, value_shapes)
from einfx.export.relayouts import moves_one_axis

__all__ = ["orient_gemms", "transpose_cost"]

_IDENTITY = [0, 1, 2]
_GENERAL = 3  # the cost of a Transpose that moves more than one block of axes, in one-block Transposes
_INNERMOST = 4  # and of one that moves the last axis


@dataclass
class _Link:
    """What lies between one GEMM's output (or a value from outside the chains) and the next GEMM's activation
    (or the rest of the graph): an elementwise region, then a Transpose, either possibly absent."""

    source: str                                   # the GEMM's output, or the outside value
    dims: list                                    # its shape
    before: onnx.NodeProto | None                 # the GEMM that writes ``source``
    end: str                                      # what the Transpose reads (the region's exit, or source)
    transpose: onnx.NodeProto | None              # None: no Transpose here (one is made if a flip needs it)
    target: str                                   # what the far side reads (the Transpose's output, or end)
    after: onnx.NodeProto | None                  # the GEMM that reads ``target`` as its activation
    region: list = field(default_factory=list)    # elementwise nodes from source to end
    pinned: bool = False                          # ``target`` is a graph output: it keeps its producer

    def perm(self, flip_before: bool, flip_after: bool) -> list[int]:
        p = perm_of(self.transpose) if self.transpose is not None else list(_IDENTITY)
        if flip_before:
            p = read_swapped(p)
        if flip_after:
            p = swapped(p)
        return p

    def cost(self, flip_before: bool, flip_after: bool) -> float:
        p = self.perm(flip_before, flip_after)
        if self.pinned and (self.transpose is None) != (p == _IDENTITY):
            return float("inf")  # the Transpose would go, or one would be made: the output's name would move
        if p == _IDENTITY:
            return 0
        dims = self.dims
        if flip_before:
            dims = [dims[i] for i in (0, 2, 1)]
        return transpose_cost(p, dims)


def transpose_cost(perm: list[int], dims: list) -> float:
    """A rank-3 Transpose's price: its entries (the static part of its size; every activation here has the
    tokens as one factor), times `_GENERAL` for a perm that moves more than one block of axes, times
    `_INNERMOST` when the last axis moves (entries are then gathered one by one, not copied in rows)."""
    size = float(np.prod([d[0] for d in dims]))
    kept = [a for a in perm if dims[a] != (1, ())]
    price = size * (1 if moves_one_axis(perm, dims) else _GENERAL)
    return price * (_INNERMOST if kept and kept[-1] != max(kept) else 1)


def orient_gemms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Each chain of constant-core batched GEMMs computed the way round whose Transposes cost least (see the
    module's docstring); returns the new model and how many GEMMs it flipped. Exact: the same products, summed
    in the same order."""
    out = copy_model(model)
    graph = out.graph
    shapes = value_shapes(graph)
    _drop_identity_reshapes(graph, shapes)
    values = constant_values(graph)
    producer, readers, outputs, taken = graph_index(graph)
    nodes = list(graph.node)  # held, so that each node keeps its id
    sides = {id(n): s for n in nodes if (s := _core_side(n, values, shapes, readers, outputs)) is not None}
    links_out, links_in = {}, {}
    for node in nodes:
        if id(node) in sides:
            link = _out_link(node, sides, values, shapes, producer, readers, outputs)
            links_out[id(node)] = link
            if link.after is not None:
                links_in[id(link.after)] = link
    for node in nodes:
        if id(node) in sides and id(node) not in links_in:
            links_in[id(node)] = _in_link(node, sides[id(node)], shapes, producer, readers, outputs)
    flips = {}
    for node in nodes:
        if id(node) in sides and links_in[id(node)].before is None:  # a path starts here
            path = [node]
            while links_out[id(path[-1])].after is not None:
                path.append(links_out[id(path[-1])].after)
            links = [links_in[id(path[0])]] + [links_out[id(g)] for g in path]
            chosen = _orient(links)
            flips.update({id(g): f for g, f in zip(path, chosen)})
    flipped = sum(flips.values())
    if not flipped:
        return model, 0
    _apply(graph, nodes, flips, sides, links_in, links_out, values, shapes, producer, taken)
    return prune(out)[0], flipped


def _drop_identity_reshapes(graph, shapes) -> None:
    """Readers of a Reshape that keeps its input's declared shape read its input instead."""
    outputs = {o.name for o in graph.output}
    mapping, drop, nodes = {}, set(), list(graph.node)  # the list keeps each node's id fixed
    for node in nodes:
        if node.op_type == "Reshape" and node.output[0] not in outputs and node.input[0] in shapes \
                and shapes.get(node.output[0]) == shapes[node.input[0]]:
            mapping[node.output[0]] = mapping.get(node.input[0], node.input[0])
            drop.add(id(node))
    if not drop:
        return
    rename(graph, mapping)
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in drop)
    for info in [v for v in graph.value_info if v.name in mapping]:
        graph.value_info.remove(info)


def _core_side(node, values, shapes, readers, outputs) -> int | None:
    """Which operand of a MatMul is its constant rank-3 core, when the other is a rank-3 activation of known
    shape and the output, of known shape, is read once inside the graph."""
    side = core_side(node, values)
    if side is None or node.output[0] in outputs or len(readers[node.output[0]]) != 1 \
            or len(shapes.get(node.output[0], ())) != 3 or len(shapes.get(node.input[1 - side], ())) != 3:
        return None
    return side


def _out_link(gemm, sides, values, shapes, producer, readers, outputs) -> _Link:
    y = gemm.output[0]
    region, end = [], y
    found = elementwise_region(y, readers, outputs) if readers[y][0].op_type in ELEMENTWISE else None
    if found is not None and _relayable(found[0], y, values, shapes[y]):
        region, end = found
    transpose, target = None, end
    if len(readers[end]) == 1 and is_transpose(readers[end][0], 3) and end not in outputs:
        transpose = readers[end][0]
        target = transpose.output[0]
    reader = readers[target][0] if len(readers[target]) == 1 and target not in outputs else None
    after = reader if reader is not None and id(reader) in sides \
        and reader.input[1 - sides[id(reader)]] == target else None
    pinned = target in outputs or (region and end in outputs)
    return _Link(y, list(shapes[y]), gemm, end, transpose, target, after, region, bool(pinned))


def _in_link(gemm, side, shapes, producer, readers, outputs) -> _Link:
    x = gemm.input[1 - side]
    feeder = producer.get(x)
    if is_transpose(feeder, 3) and len(readers[x]) == 1 and transpose_input_shape(feeder, shapes) is not None:
        return _Link(feeder.input[0], transpose_input_shape(feeder, shapes), None, feeder.input[0], feeder, x, gemm)
    return _Link(x, list(shapes[x]), None, x, None, x, gemm)


def _relayable(region, entry, values, shape) -> bool:
    """Whether every operand of ``region`` from outside it is a constant that broadcasts to ``shape`` (rank 3)
    without growing it, so the region can run with the last two axes swapped."""
    inside = {entry} | {o for n in region for o in n.output}
    for node in region:
        for name in node.input:
            if not name or name in inside:
                continue
            if name not in values or values[name].ndim > 3:
                return False
            c = values[name]
            for d, (size, symbols) in zip(c.shape[::-1], shape[::-1]):
                if d != 1 and (symbols or d != size):
                    return False
    return True


def _orient(links) -> list[bool]:
    """The flips of the path's GEMMs (links[k] runs from GEMM k - 1 to GEMM k; the first and last reach
    outside) with the least total cost, ties broken towards fewer flips."""
    best = {False: (0, 0, []), True: (float("inf"), 0, [])}  # state: whether the GEMM before the link flips
    for k, link in enumerate(links):
        last = k == len(links) - 1
        nxt = {}
        for flip_after in ([False] if last else [False, True]):
            nxt[flip_after] = min(
                ((cost + link.cost(flip_before, flip_after), n + flip_after, path + ([] if last else [flip_after]))
                 for flip_before, (cost, n, path) in best.items()), key=lambda c: c[:2])
        best = nxt
    return best[False][2]


def _apply(graph, nodes, flips, sides, links_in, links_out, values, shapes, producer, taken) -> None:
    new_out, stale, inserted, mapping = {}, set(), {}, {}
    for node in nodes:
        if flips.get(id(node)):
            side = sides[id(node)]
            new_out[id(node)] = transpose_gemm(node, side, node.input[1 - side], graph, values, shapes, taken)
    done = set()
    for link in list(links_in.values()) + list(links_out.values()):
        if id(link) in done:
            continue
        done.add(id(link))
        flip_before = link.before is not None and flips.get(id(link.before), False)
        flip_after = link.after is not None and flips.get(id(link.after), False)
        if not (flip_before or flip_after):
            continue
        source = new_out[id(link.before)] if flip_before else link.source
        end = source
        if link.region:
            end = link.end
            for node in link.region:
                for i, name in enumerate(node.input):
                    if name == link.source:
                        node.input[i] = source
                    elif flip_before and name in values and values[name].size > 1:
                        node.input[i] = _swapped_constant(graph, values, name, taken)
                stale.update(node.output)
        p = link.perm(flip_before, flip_after)
        if p == _IDENTITY:
            result = end
        elif link.transpose is not None:
            link.transpose.input[0] = end
            set_perm(link.transpose, p)
            result = link.transpose.output[0]
            if flip_after:
                result = fresh(f"{result}_flipped", taken)
                swap_info(graph, shapes, link.transpose.output[0], result)
                link.transpose.output[0] = result
        else:
            result = fresh(f"{end}_relaid", taken)
            where = link.before if flip_before and not link.region else producer.get(end)
            inserted.setdefault(id(where) if where is not None else None, []).append(
                helper.make_node("Transpose", [end], [result], perm=p, name=result))
        if link.after is not None:
            link.after.input[sides[id(link.after)] if flip_after else 1 - sides[id(link.after)]] = result
        elif result != link.target:
            mapping[link.target] = result
    rename(graph, mapping)  # before the new Transposes join: one may read the value it renames
    rebuild(graph, nodes, after=inserted)
    for info in [v for v in graph.value_info if v.name in stale]:
        graph.value_info.remove(info)


def _swapped_constant(graph, values, name, taken) -> str:
    c = values[name]
    c = c.reshape((1,) * (3 - c.ndim) + c.shape)
    new = fresh(f"{name}_swapped", taken)
    values[new] = np.ascontiguousarray(c.transpose(0, 2, 1))
    graph.initializer.append(numpy_helper.from_array(values[new], new))
    return new
