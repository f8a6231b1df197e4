"""Make a torch.export graph module behave like the model it came from.

``ExportedProgram.module()`` refuses ``train()``/``eval()`` and takes exactly the argument layout of the
example it was exported with. `behave_like` fixes both on the graph module itself (parameter names and
``state_dict`` keys stay as they are):

    gm.train(mode) / gm.eval()   -> flags set on every submodule, and the mode arguments baked into the
                                    graph (aten.dropout's ``train``, aten.batch_norm's ``training``) flipped
    gm(*args, **kwargs)          -> bound to the original forward's signature, then passed in the
                                    example's layout; an argument the example did not have must keep its
                                    default, or the call raises `TraceError` naming it
"""

from __future__ import annotations

import inspect
import types
from typing import Mapping

import torch
from torch import fx, nn

from einfx.errors import TraceError

__all__ = ["behave_like", "set_graph_mode", "MODE_ARGS"]

_aten = torch.ops.aten
# op -> index of its bool "training" argument
MODE_ARGS = {
    _aten.dropout.default: 2,
    _aten.feature_dropout.default: 2,
    _aten.alpha_dropout.default: 2,
    _aten.batch_norm.default: 5,
}


def set_graph_mode(gm: fx.GraphModule, training: bool) -> int:
    """Set the training flag of every mode-dependent op in ``gm``; returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        index = MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if index is None or len(node.args) <= index or node.args[index] == training:
            continue
        args = list(node.args)
        args[index] = training
        node.args = tuple(args)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _train(self: fx.GraphModule, mode: bool = True):
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    for module in self.modules():
        module.training = mode
    set_graph_mode(self, mode)
    return self


def _eval(self: fx.GraphModule):
    return _train(self, False)


class _Rebind:
    """Forward pre-hook: bind a call to the original signature and pass it in the example's layout."""

    def __init__(self, signature: inspect.Signature, positional: tuple[str, ...], keywords: tuple[str, ...],
                 owner: str):
        self.signature = signature
        self.positional = positional
        self.keywords = keywords
        self.owner = owner

    def __call__(self, module, args, kwargs):
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TraceError(f"{self.owner}: {exc} (signature {self.signature})") from exc
        captured = set(self.positional) | set(self.keywords)
        for name, value in bound.arguments.items():
            param = self.signature.parameters[name]
            if name not in captured and value is not param.default and not (value is None and param.default is None):
                raise TraceError(
                    f"{self.owner}: argument {name!r} was not part of the example inputs the graph was captured "
                    f"with ({', '.join(sorted(captured))}); pass it in example_inputs/example_kwargs to optimize")
        missing = [n for n in (*self.positional, *self.keywords) if n not in bound.arguments]
        if missing:
            raise TraceError(f"{self.owner}: the captured graph needs the argument(s) {missing}")
        return (tuple(bound.arguments[n] for n in self.positional),
                {n: bound.arguments[n] for n in self.keywords})


def behave_like(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: Mapping, training: bool) -> fx.GraphModule:
    """Give ``gm`` (from ``torch.export``) working ``train``/``eval`` and ``model.forward``'s signature."""
    gm.train = types.MethodType(_train, gm)
    gm.eval = types.MethodType(_eval, gm)
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and not any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        names = [n for n, p in signature.parameters.items() if p.kind != p.VAR_KEYWORD]
        positional = tuple(names[: len(args)])
        keywords = tuple(kwargs)
        if len(positional) == len(args) and all(k in signature.parameters for k in keywords):
            gm.register_forward_pre_hook(_Rebind(signature, positional, keywords, type(model).__name__),
                                         with_kwargs=True, prepend=True)
    _train(gm, training)
    return gm
