"""store_layouts: weights stored in the layout their readers use.

The exporter writes a parameter as it is held in torch and the plan's reshapes and permutes of it as nodes:

    B (1, 384, 96, 1, 1)  ->  Reshape (384, 96)  ->  Transpose (1, 0)  ->  Reshape (1, 96, 384)  ->  MatMul

Runtimes fold such chains when they load the file, but the file still says "transpose this weight" and a
reader (or a tool that counts a graph's Transposes) sees an activation-free Transpose as work. This pass
evaluates each chain (`constant_values`: Reshape, Transpose, Identity, Cast of initializers) and stores its
result as the initializer the reader takes, so every GEMM reads a constant, pre-transposed weight.

A chain is stored only where the initializer it starts from has no reader outside its chain and the chain
has one value read outside it (not a graph output), so the file never holds a weight twice; shape operands
(a Reshape's second input) are shared small constants and stay. The stored values are the ones the chain
computed, so the pass is exact.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from einfx.export.onnx_graph import prune, working_copy

__all__ = ["store_layouts"]

_CHAIN = {"Reshape", "Transpose", "Identity", "Cast"}  # the ops `constant_values` evaluates


def store_layouts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Chains of constant relayouts replaced by stored initializers (see the module's docstring); returns the
    new model and how many nodes it removed."""
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

    reads: dict[str, list[str]] = {}  # initializer -> the values of its chains read outside them
    for name in computed:
        if read_outside(name) and (source := root(name)) is not None:
            reads.setdefault(source, []).append(name)
    removed = set()
    for source, results in reads.items():
        if len(results) == 1 and results[0] not in outputs and not read_outside(source):
            graph.initializer.append(numpy_helper.from_array(values[results[0]], results[0]))
            removed.add(id(producer[results[0]]))
    if not removed:
        return model, 0
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in removed)
    out, _ = prune(out)
    return out, len(nodes) - len(out.graph.node)
