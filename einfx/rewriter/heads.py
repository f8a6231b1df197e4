"""Feature groups of a linear layer's input and output, read from the graph: attention's heads.

A query projection's output is split into heads, ``y.view(b, t, -1, 32)`` (12 heads of 32 at d = 384); the
attention output projection reads the heads merged back, ``o.transpose(1, 2).reshape(b, t, -1)``. A
factorization whose outermost size is the head count (12 x 32 rather than 16 x 24) keeps each head whole in the
layer's layout, so the exported graph relays it and splits the heads with one Transpose
(`einfx.structures.factorize.factor_side`, `einfx.export.relayouts`). This module only reads the graph:

- output: a reader of the layer's output is a view/reshape whose target ends in (-1 or H, D), H·D = d_out;
- input: the layer reads a view/reshape of a transpose/permute whose recorded shape (``val`` from
  torch.export, ``tensor_meta`` from shape propagation) ends in (H, D), H·D = d_in.

`feature_groups` reads a graph; `HeadWatch` sees the same two patterns in an eager run (the recording front
end, `einfx.rewriter.record`): a module's output viewed as (..., H, D), and a module's input that is a
transposed (..., H, D) tensor reshaped to (..., H·D).
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["feature_groups", "HeadWatch"]

_aten = torch.ops.aten
_RESHAPES = {torch.reshape, _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default}
_RESHAPE_METHODS = {"view", "reshape"}
_PERMUTES = {torch.transpose, torch.permute, _aten.transpose.int, _aten.permute.default}
_PERMUTE_METHODS = {"transpose", "permute"}
_COPIES = {_aten.clone.default, torch.clone}
_COPY_METHODS = {"contiguous", "clone"}


def _is(node, functions, methods) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in functions)
                                          or (node.op == "call_method" and node.target in methods))


def _skip_copies(node):
    while _is(node, _COPIES, _COPY_METHODS) and node.args:
        node = node.args[0]
    return node


def _target(node: fx.Node) -> tuple | None:
    """The target shape of a view/reshape node as a tuple (entries may be nodes), or None."""
    if len(node.args) < 2:
        shape = node.kwargs.get("shape") or node.kwargs.get("size")
        return tuple(shape) if isinstance(shape, (tuple, list)) else None
    if isinstance(node.args[1], (tuple, list, torch.Size)):
        return tuple(node.args[1])
    return tuple(node.args[1:])


def _output_groups(node: fx.Node, d_out: int) -> int:
    for user in node.users:
        if not _is(user, _RESHAPES, _RESHAPE_METHODS) or user.args[0] is not node:
            continue
        shape = _target(user)
        if not shape or len(shape) < 2:
            continue
        width, count = shape[-1], shape[-2]
        if isinstance(width, int) and 1 < width < d_out and d_out % width == 0 \
                and (count == -1 or count == d_out // width):
            return d_out // width
    return 1


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        shape = value.shape
    elif node.meta.get("tensor_meta") is not None and hasattr(node.meta["tensor_meta"], "shape"):
        shape = node.meta["tensor_meta"].shape
    else:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # an unbacked symbolic size
        return None


def _input_groups(x, d_in: int) -> int:
    x = _skip_copies(x)
    if not _is(x, _RESHAPES, _RESHAPE_METHODS):
        return 1
    source = _skip_copies(x.args[0])
    if not _is(source, _PERMUTES, _PERMUTE_METHODS):
        return 1
    shape = _shape(source)
    if shape is None or len(shape) < 3 or shape[-1] * shape[-2] != d_in or shape[-2] < 2 or shape[-1] < 2:
        return 1
    return shape[-2]


def feature_groups(node: fx.Node, x, d_in: int, d_out: int) -> tuple[int, int]:
    """(input groups, output groups) of the linear computed by ``node`` on input ``x``; 1 where none is seen."""
    return _input_groups(x, d_in), _output_groups(node, d_out)


_EAGER_RESHAPES = {torch.reshape, torch.Tensor.reshape, torch.Tensor.view}
_EAGER_PERMUTES = {torch.transpose, torch.Tensor.transpose, torch.permute, torch.Tensor.permute}
_EAGER_COPIES = {torch.Tensor.contiguous, torch.clone, torch.Tensor.clone}


class HeadWatch:
    """Feature groups of modules, seen in one eager call.

    ``output(path, tensor)`` marks a module's output, ``input(path, tensor)`` looks at a module's input, and
    ``observe(func, args, out)`` is given every torch function call of the run. Tensors are kept alive while
    watched, so their ids stay theirs.
    """

    def __init__(self):
        self._outputs: dict[int, tuple[str, torch.Tensor]] = {}
        self._permuted: dict[int, torch.Tensor] = {}
        self._merged: dict[int, tuple[int, torch.Tensor]] = {}
        self._in: dict[str, int] = {}
        self._out: dict[str, int] = {}

    def output(self, path: str, tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            self._outputs[id(tensor)] = (path, tensor)

    def input(self, path: str, tensor) -> None:
        if isinstance(tensor, torch.Tensor) and id(tensor) in self._merged:
            self._in.setdefault(path, self._merged[id(tensor)][0])

    def observe(self, func, args, out) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        x = args[0]
        if func in _EAGER_PERMUTES:
            self._permuted[id(out)] = out
        elif func in _EAGER_COPIES and id(x) in self._permuted:
            self._permuted[id(out)] = out
        elif func in _EAGER_RESHAPES and x.dim() >= 1 and out.dim() >= 2:
            width = x.shape[-1]
            owner = self._outputs.get(id(x))
            if owner is not None and out.dim() > x.dim() and out.shape[-1] * out.shape[-2] == width \
                    and out.shape[-1] > 1 and out.shape[-2] > 1:
                self._out.setdefault(owner[0], int(out.shape[-2]))
            if id(x) in self._permuted and x.dim() >= 3 and out.dim() < x.dim() \
                    and out.shape[-1] == x.shape[-1] * x.shape[-2] and x.shape[-1] > 1 and x.shape[-2] > 1:
                self._merged[id(out)] = (int(x.shape[-2]), out)

    def groups(self) -> dict[str, tuple[int, int]]:
        """Module path -> (input groups, output groups), for the modules where some were seen."""
        return {p: (self._in.get(p, 1), self._out.get(p, 1)) for p in set(self._in) | set(self._out)}
