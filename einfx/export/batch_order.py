"""heads_first: attention run with its two batch axes exchanged, when that saves Transposes.

Attention is a region of batched ops over rank-4 tensors, (batch, heads, tokens, head dim) as a model writes
it: the scores MatMul, a scale, the mask Add, the Softmax over the key axis, the MatMul with the values.
Every op in it treats its two leading axes alike, so the whole region can run with them exchanged, as
(heads, batch, tokens, head dim), and give the same entries. The Transposes that feed it (the head splits of
q, k and v) and the one that reads it (the head merge) then change their perms: a layer whose factorization
is aligned to the heads (`einfx.structures.factorize`) writes q and v as (heads, n, head dim) already, so with
the heads first, their head splits become Reshapes and the head merge moves one axis, which
`einfx.export.relayouts.merge_relayouts` and `einfx.export.orientation.orient_gemms` then fold into the output
projection's first GEMM.

A region is grown from a MatMul of two activations along MatMuls, elementwise ops and Softmax; it is entered
only through rank-4 Transposes (into its MatMuls) and other operands of its elementwise ops (a mask, a scale),
and left only through rank-4 Transposes. The exchange is applied where it lowers the cost of those Transposes
(one that moves a single block of axes counted as one, a general perm as three, one that becomes the identity
as none). An entry that a Transpose before it (through Reshapes and a bias) would merge with, were the merged
perm a single block (`einfx.export.relayouts.merged_transpose`), is priced with it: a key relaid as
(heads, n, head dim) and split for attention's (batch, heads, head dim, keys) needs two Transposes, but with the
heads first the two merge into a swap of the last two axes, which both runtimes read inside the scores MatMul.
Another operand of rank 4 is exchanged too: a mask (batch, 1, keys, keys) by Squeeze and Unsqueeze, for its
exchanged axis is 1, anything else by a Transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from einfx.export.onnx_graph import (ELEMENTWISE, fresh, is_transpose, perm_of, prune, rebuild, rename,
                                     transpose_input_shape, working_copy)
from einfx.export.relayouts import merged_transpose, moves_one_axis

__all__ = ["heads_first"]

_SWAP = [1, 0, 2, 3]  # the two batch axes exchanged (its own inverse)
_GENERAL = 3
_SOFTMAX = ("Softmax", "LogSoftmax")


@dataclass
class _Region:
    nodes: list          # the region's ops
    entries: list        # rank-4 Transposes whose outputs only region MatMuls read
    exits: list          # rank-4 Transposes that read region values
    others: list         # (node, input index) of non-constant operands from outside (masks)


def heads_first(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Attention regions run with their batch axes exchanged where that costs fewer Transposes (see the
    module's docstring); returns the new model and how many Transposes that removed."""
    out, values, shapes, producer, readers, outputs, taken, nodes = working_copy(model)
    graph = out.graph
    leads = {}  # an entry -> (the Transpose before it, their merged perm and its dims) where they would merge
    for node in nodes:
        found = merged_transpose(node, values, shapes, producer, readers, outputs)
        if found is not None:
            leads[id(found[0])] = (node, found[1], found[2])
    seen, regions = set(), []
    for node in nodes:
        if id(node) in seen or not _activation_matmul(node, values, shapes):
            continue
        region = _grow(node, values, shapes, producer, readers, outputs)
        if region is None:
            continue
        seen.update(id(n) for n in region.nodes)
        costs = [_entry_costs(t, shapes, leads) for t in region.entries]
        before = sum(c[0] for c in costs) + sum(_cost(t, perm_of(t), shapes) for t in region.exits)
        after = sum(c[1] for c in costs) + sum(_cost(t, _exit_perm(t), shapes) for t in region.exits) \
            + sum(not _squeezable(shapes[n.input[i]]) for n, i in region.others)
        if after < before:
            regions.append(region)
    if not regions:
        return model, 0
    removed, mapping, inserted, exchanged = 0, {}, {}, {}
    for region in regions:
        for t in region.entries:
            removed += _repermute(t, _entry_perm(t), mapping, outputs)
        for t in region.exits:
            removed += _repermute(t, _exit_perm(t), mapping, outputs)
        for node, i in region.others:
            name = node.input[i]
            if name not in exchanged:
                exchanged[name], made = _exchange(name, shapes[name], taken)
                removed -= not _squeezable(shapes[name])
                inserted.setdefault(id(producer[name]) if name in producer else None, []).extend(made)
            node.input[i] = exchanged[name]
        for node in region.nodes:
            _exchange_constants(node, values, graph, taken)
            if node.op_type in _SOFTMAX:
                rank_axis = next((a.i for a in node.attribute if a.name == "axis"), -1) % 4
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("axis", _SWAP[rank_axis]))
        _permute_infos(graph, [o for n in region.nodes for o in n.output]
                       + [t.output[0] for t in region.entries])
    rebuild(graph, nodes, after=inserted)
    rename(graph, mapping)
    for info in [v for v in graph.value_info if v.name in mapping]:
        graph.value_info.remove(info)
    return prune(out)[0], removed


def _activation_matmul(node, values, shapes) -> bool:
    return node.op_type == "MatMul" and node.domain in ("", "ai.onnx") \
        and all(i not in values and len(shapes.get(i, ())) == 4 for i in node.input)


def _grow(seed, values, shapes, producer, readers, outputs) -> _Region | None:
    """The region around ``seed`` (see the module's docstring), or None where it is entered or left otherwise."""
    members, frontier = {id(seed): seed}, [seed]
    entries, exits, others = {}, {}, []
    while frontier:
        node = frontier.pop()
        for i, name in enumerate(node.input):
            if not name or name in values:
                continue
            source = producer.get(name)
            if source is not None and id(source) in members:
                continue
            if node.op_type == "MatMul":
                if not is_transpose(source, 4) or transpose_input_shape(source, shapes) is None or name in outputs:
                    return None
                entries[id(source)] = source
            elif node.op_type in ELEMENTWISE and len(shapes.get(name, ())) == 4:
                others.append((node, i))
            else:
                return None
        for name in node.output:
            if name in outputs or len(shapes.get(name, (0,) * 4)) != 4:
                return None
            for reader in readers[name]:
                if id(reader) in members or id(reader) in exits:
                    continue
                if is_transpose(reader, 4) and reader.input[0] == name \
                        and transpose_input_shape(reader, shapes) is not None:
                    exits[id(reader)] = reader
                elif _joins(reader, values, shapes):
                    members[id(reader)] = reader
                    frontier.append(reader)
                else:
                    return None
    inside = set(members)
    for t in entries.values():  # an entry's output is read by the region alone
        if any(id(r) not in inside for r in readers[t.output[0]]):
            return None
    return _Region(list(members.values()), list(entries.values()), list(exits.values()), others)


def _joins(node, values, shapes) -> bool:
    """Whether ``node`` may run with its batch axes exchanged inside a region."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "MatMul":
        return _activation_matmul(node, values, shapes)
    if node.op_type in _SOFTMAX:
        return True
    if node.op_type in ELEMENTWISE:
        return all(values[i].ndim <= 4 for i in node.input if i in values)
    return False


def _entry_perm(t) -> list[int]:
    """The perm that writes the entry's output with the batch axes exchanged."""
    p = perm_of(t)
    return [p[a] for a in _SWAP]


def _exit_perm(t) -> list[int]:
    """The perm that reads, from the exchanged region value, what the exit wrote."""
    return [_SWAP[a] for a in perm_of(t)]


def _cost(t, perm, shapes) -> int:
    return _perm_cost(perm, transpose_input_shape(t, shapes))


def _perm_cost(perm, dims) -> int:
    if perm == sorted(perm):
        return 0
    return 1 if moves_one_axis(perm, dims) else _GENERAL


def _entry_costs(t, shapes, leads) -> tuple[int, int]:
    """The cost of entry ``t`` (with the Transpose before it that a merge would fold into it, if any) as the
    graph is and with the batch axes exchanged: the merge is made afterwards only where the merged Transpose
    moves one block of axes (`einfx.export.relayouts.merge_relayouts`)."""
    before, after = _cost(t, perm_of(t), shapes), _cost(t, _entry_perm(t), shapes)
    if id(t) not in leads:
        return before, after
    first, perm, dims = leads[id(t)]
    own = _cost(first, perm_of(first), shapes)
    merged = _perm_cost([perm[a] for a in _SWAP], dims)
    return own + before, min(own + after, merged if merged <= 1 else own + after)


def _repermute(t, perm, mapping, outputs) -> int:
    """Give ``t`` its new perm; an identity one makes its readers read its input. Returns Transposes removed."""
    if perm == sorted(perm) and t.output[0] not in outputs:
        mapping[t.output[0]] = t.input[0]
        return 1
    del t.attribute[:]
    t.attribute.append(helper.make_attribute("perm", perm))
    return 0


def _squeezable(shape) -> bool:
    return shape[0] == (1, ()) or shape[1] == (1, ())


def _exchange(name, shape, taken) -> tuple[str, list]:
    """Nodes that write ``name`` with its two leading axes exchanged: a Squeeze and an Unsqueeze when one of
    them is 1, else a Transpose; (the new value, the nodes)."""
    new = fresh(f"{name}_heads_first", taken)
    if not _squeezable(shape):
        return new, [helper.make_node("Transpose", [name], [new], perm=_SWAP, name=new)]
    unit = 1 if shape[1] == (1, ()) else 0
    squeezed, axes_in, axes_out = fresh(f"{new}_squeezed", taken), fresh(f"{new}_axis", taken), \
        fresh(f"{new}_axis", taken)
    nodes = [helper.make_node("Constant", [], [axes_in], value=numpy_helper.from_array(np.array([unit], np.int64))),
             helper.make_node("Constant", [], [axes_out],
                              value=numpy_helper.from_array(np.array([1 - unit], np.int64))),
             helper.make_node("Squeeze", [name, axes_in], [squeezed], name=squeezed),
             helper.make_node("Unsqueeze", [squeezed, axes_out], [new], name=new)]
    return new, nodes


def _exchange_constants(node, values, graph, taken) -> None:
    """A constant operand of ``node`` that varies along an exchanged axis, written exchanged."""
    for i, name in enumerate(node.input):
        if name not in values or values[name].ndim < 3 or values[name].size == 1:
            continue
        c = values[name].reshape((1,) * (4 - values[name].ndim) + values[name].shape)
        new = fresh(f"{name}_heads_first", taken)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(c.transpose(_SWAP)), new))
        node.input[i] = new


def _permute_infos(graph, names) -> None:
    """The declared shapes of ``names`` with their two leading axes exchanged."""
    wanted = set(names)
    for info in graph.value_info:
        if info.name in wanted and len(info.type.tensor_type.shape.dim) == 4:
            dims = info.type.tensor_type.shape.dim
            copies = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
            for k, a in enumerate(_SWAP):
                copies[k].CopyFrom(dims[a])
            del dims[:]
            dims.extend(copies)
