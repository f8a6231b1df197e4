"""store_layouts: weights stored in the layout their readers use, and identity Transposes dropped.

The exporter writes a parameter as it is held in torch and the plan's reshapes and permutes of it as nodes:

    B (1, 384, 96, 1, 1)  ->  Reshape (384, 96)  ->  Transpose (1, 0)  ->  Reshape (1, 96, 384)  ->  MatMul

Runtimes fold such chains when they load the file, but the file still says "transpose this weight" and a
reader (or a tool that counts a graph's Transposes) sees an activation-free Transpose as work. This pass
evaluates each chain (`constant_values`: Reshape, Transpose, Identity, Cast of initializers) and stores its
result as the initializer the reader takes, so every GEMM reads a constant, pre-transposed weight.

A chain is stored only where the initializer it starts from has no reader outside its chain and no other
chain's result is stored from it, so the file never holds a weight twice; shape operands (a Reshape's
second input) are shared small constants and stay. Transposes whose perm is the identity are dropped (their
readers read the input). Both rewrites keep every value, so the pass is exact.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from einfx.export.onnx_graph import perm_of, prune, rename, working_copy

__all__ = ["store_layouts"]

_CHAIN = {"Reshape", "Transpose", "Identity", "Cast"}  # the ops `constant_values` evaluates


def store_layouts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Chains of constant relayouts replaced by stored initializers, identity Transposes dropped (see the
    module's docstring); returns the new model and how many nodes it removed."""
    out, values, _, producer, readers, outputs, _, nodes = working_copy(model)
    graph = out.graph
    initializers = {i.name for i in graph.initializer}
    computed = {n.output[0] for n in nodes if n.op_type in _CHAIN and n.output and n.output[0] in values}

    def root(name: str) -> str | None:
        """The initializer a computed value's data comes from (through each node's first input)."""
        while name in computed:
            name = producer[name].input[0]
        return name if name in initializers else None

    def read_outside(name: str) -> bool:
        return name in outputs or any(r.op_type not in _CHAIN or r.output[0] not in computed
                                      for r in readers.get(name, ()))

    stored: dict[str, list[str]] = {}  # initializer -> the chain results to store from it
    for name in computed:
        if name in outputs:  # a graph output stays the output of a node
            continue
        if read_outside(name) and (source := root(name)) is not None:
            stored.setdefault(source, []).append(name)
    before = len(graph.node)
    removed = set()
    for source, results in stored.items():
        chain = _chain_values(source, readers, computed)
        if len(results) != 1 or read_outside(source) or any(v not in results and read_outside(v) for v in chain):
            continue
        (result,) = results
        graph.initializer.append(numpy_helper.from_array(values[result], result))
        removed.add(id(producer[result]))
    dropped = {}
    for node in nodes:
        perm = perm_of(node) if node.op_type == "Transpose" else None
        if perm is not None and perm == list(range(len(perm))) and node.output[0] not in outputs:
            dropped[node.output[0]] = node.input[0]
            removed.add(id(node))
    if not removed:
        return model, 0
    remaining = [n for n in nodes if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(remaining)
    rename(graph, dropped)
    out, _ = prune(out)
    return out, before - len(out.graph.node)


def _chain_values(source: str, readers, computed: set[str]) -> set[str]:
    """Every computed value whose data comes from ``source`` (its chain), found forward from it."""
    seen, frontier = set(), [source]
    while frontier:
        name = frontier.pop()
        for reader in readers.get(name, ()):
            if reader.input and reader.input[0] == name and reader.output and reader.output[0] in computed \
                    and reader.output[0] not in seen:
                seen.add(reader.output[0])
                frontier.append(reader.output[0])
    return seen
