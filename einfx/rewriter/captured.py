"""Make a torch.export graph module behave like the model it came from.

``ExportedProgram.module()`` refuses ``train()``/``eval()`` and takes exactly the argument layout of the
example it was exported with. `behave_like` returns the graph as a `CapturedGraphModule` that fixes both
(parameter names and ``state_dict`` keys stay as they are):

    gm.train(mode) / gm.eval()   -> flags set on every submodule, and the mode arguments baked into the
                                    graph (aten.dropout's ``train``, aten.batch_norm's ``training``) flipped
    gm(*args, **kwargs)          -> bound to the original forward's signature, then passed in the
                                    example's layout; an argument the example did not have must keep its
                                    default, or the call raises `TraceError` naming it
"""

from __future__ import annotations

import copy
import inspect
from typing import Mapping

import torch
from torch import fx, nn

from einfx.errors import TraceError

__all__ = ["CapturedGraphModule", "behave_like", "set_graph_mode", "MODE_ARGS"]

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


class _Rebind:
    """Bind a call to the original signature and pass it in the example's layout."""

    def __init__(self, signature: inspect.Signature, positional: tuple[str, ...], keywords: tuple[str, ...],
                 owner: str):
        self.signature = signature
        self.positional = positional
        self.keywords = keywords
        self.owner = owner

    def __call__(self, args, kwargs):
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


class CapturedGraphModule(fx.GraphModule):
    """The graph module `einfx.optimize` returns for functional sites: it trains and evaluates like the
    model it came from, takes that model's call signature, and keeps einfx's attributes through
    ``copy.deepcopy`` (which the ONNX export makes)."""

    _PRESERVED = ("einfx_call", "einfx_report", "einfx_fold_to_dense")

    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        for module in self.modules():
            module.training = mode
        set_graph_mode(self, mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, *args, **kwargs):
        rebind = self.__dict__.get("einfx_call")
        if rebind is not None:
            args, kwargs = rebind(args, kwargs)
        return super().__call__(*args, **kwargs)

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        for key in self._PRESERVED:
            if key in self.__dict__:
                res.__dict__[key] = copy.deepcopy(self.__dict__[key], memo)
        return res


def behave_like(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: Mapping, training: bool) -> fx.GraphModule:
    """A `CapturedGraphModule` of ``gm``'s graph with ``model.forward``'s signature, in ``training`` mode.

    The signature is rebound only for graphs that take the example's layout (torch.export); an fx graph
    already has the forward's own signature (pass ``args=None``).
    """
    out = CapturedGraphModule(gm, gm.graph, type(model).__name__)
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    if args is not None and signature is not None and not any(
            p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        names = [n for n, p in signature.parameters.items() if p.kind != p.VAR_KEYWORD]
        positional = tuple(names[: len(args)])
        keywords = tuple(kwargs)
        if len(positional) == len(args) and all(k in signature.parameters for k in keywords):
            out.einfx_call = _Rebind(signature, positional, keywords, type(model).__name__)
    return out.train(training)
