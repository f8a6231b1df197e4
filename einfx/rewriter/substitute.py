"""The substitution pass: every accepted decision becomes an `EinsumLinear` submodule called through a
``call_module`` node, under the layer's original name where possible.

    call_module Linear/Conv1D(x)              -> call_module EinsumLinear(x)        (same target)
    linear(x, P, b) / x @ P / addmm(b, x, P)  -> call_module EinsumLinear(x)        (P, b removed)
    call_module MultiheadAttention(x, x, x)   -> FusedSelfAttention, re-traced:
                                                 call_module in_proj / out_proj (EinsumLinear)

`structure_modules` is the module-level fallback used when no graph could be captured.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from einfx.passes.base import PassResult
from einfx.rewriter.attention import FusedSelfAttention
from einfx.rewriter.decide import Decision
from einfx.rewriter.detect import Candidate, _linear_args
from einfx.rewriter.trace import fx_trace
from einfx.layers.linear import EinsumLinear

__all__ = ["weight_of", "build_layer", "structure_linears", "structure_modules"]


def weight_of(root: nn.Module, cand: Candidate) -> torch.Tensor:
    """The dense weight (d_out, d_in) of a candidate, read from ``root``."""
    w = root.get_parameter(cand.weight)
    return w.t() if cand.transposed else w


def build_layer(root: nn.Module, decision: Decision, init: str) -> EinsumLinear:
    """An `EinsumLinear` for an accepted decision, initialized from the candidate's weight and bias."""
    cand = decision.candidate
    w = weight_of(root, cand).detach()
    b = root.get_parameter(cand.bias).detach() if cand.bias else None
    if decision.structure.kind == "dense":
        # dense needs no projection: copy the weight exactly
        layer = EinsumLinear.from_weight(w, b, decision.structure, init="random", name=cand.name)
        with torch.no_grad():
            layer.weight.copy_(w)
        layer.projection_error = 0.0
        return layer
    return EinsumLinear.from_weight(w, b, decision.structure, init=init, name=cand.name)


def _split(path: str) -> tuple[str, str]:
    owner, _, leaf = path.rpartition(".")
    return owner, leaf


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, leaf = _split(path)
    parent = root.get_submodule(owner) if owner else root
    if leaf in parent._parameters:
        del parent._parameters[leaf]
    setattr(parent, leaf, module)


def _free_attr(root: nn.Module, path: str) -> None:
    owner, leaf = _split(path)
    parent = root.get_submodule(owner) if owner else root
    parent._parameters.pop(leaf, None)


def _target_path(gm: fx.GraphModule, cand: Candidate) -> str:
    """The name for the new layer: the candidate's name unless something still in use lives there."""
    path = cand.name
    freed = {cand.weight, cand.bias}
    in_use = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")} - freed
    if any(t == path or t.startswith(path + ".") for t in in_use):
        path = f"{path}_structured"
    return path


_VIEW_TARGETS = ("t", "transpose", "permute", getattr, torch.t, torch.ops.aten.t.default,
                 torch.ops.aten.transpose.int, torch.ops.aten.permute.default)


def _erase_if_dead(graph: fx.Graph, node) -> None:
    """Erase a weight/bias node left without users, and the parameter read or transpose that fed it."""
    if not isinstance(node, fx.Node) or node.users:
        return
    if node.op != "get_attr" and node.target not in _VIEW_TARGETS:
        return
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    for inp in inputs:
        _erase_if_dead(graph, inp)


def _rewrite_function(gm: fx.GraphModule, node: fx.Node, layer: EinsumLinear, cand: Candidate) -> str:
    x, w, b, _ = _linear_args(node)
    path = _target_path(gm, cand)
    for attr in (cand.weight, cand.bias):
        if attr:
            _free_attr(gm, attr)
    _set(gm, path, layer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    _erase_if_dead(gm.graph, w)
    _erase_if_dead(gm.graph, b)
    return path


def _rewrite_mha(gm: fx.GraphModule, node: fx.Node, layers: dict[str, EinsumLinear]) -> None:
    mha: nn.MultiheadAttention = gm.get_submodule(node.target)
    fused = _fused_attention(mha, layers.get(f"{node.target}.in_proj"), layers.get(f"{node.target}.out_proj"))
    _set(gm, node.target, fused)


def structure_linears(gm: fx.GraphModule, decisions: Sequence[Decision], init: str) -> PassResult:
    """The pass: replace every accepted candidate of ``decisions`` in ``gm`` (modified in place, then
    re-traced when an attention module was decomposed)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    built = {d.candidate.name: build_layer(gm, d, init) for d in decisions if d.accepted}
    mha_nodes: dict[str, fx.Node] = {}
    names: dict[str, str] = {}
    for d in decisions:
        if not d.accepted:
            continue
        cand, layer = d.candidate, built[d.candidate.name]
        if cand.site == "module":
            _set(gm, cand.name, layer)
            names[cand.name] = cand.name
        elif cand.site == "function":
            names[cand.name] = _rewrite_function(gm, nodes[cand.node], layer, cand)
        elif cand.site == "mha":
            mha_nodes[cand.node] = nodes[cand.node]
            names[cand.name] = cand.name
        else:
            raise ValueError(f"candidate {cand.name!r}: site {cand.site!r} cannot be rewritten in a graph")
    for node in mha_nodes.values():
        _rewrite_mha(gm, node, built)
    gm.graph.lint()
    gm.recompile()
    if mha_nodes:
        gm = fx_trace(gm)
    stats = {"structured": len(built), "names": names,
             "layers": {names[k]: v for k, v in built.items()}}
    return PassResult(gm, bool(built), stats)


def structure_modules(model: nn.Module, decisions: Sequence[Decision], init: str) -> dict[str, EinsumLinear]:
    """Write the accepted decisions into ``model``'s own module tree (in place), keeping its class.

    nn.Linear / Conv1D submodules become `EinsumLinear`; an nn.MultiheadAttention with an accepted in_proj
    or out_proj becomes a `FusedSelfAttention` whose projections are the structured layers (the other one
    stays an exact dense nn.Linear). Candidates of other sites are refused: they need a graph.
    """
    built = {}
    attention: dict[str, None] = {}
    for d in decisions:
        if not d.accepted:
            continue
        cand = d.candidate
        if cand.site not in ("module", "fallback", "mha"):
            raise ValueError(f"candidate {cand.name!r}: site {cand.site!r} needs a graph rewrite")
        built[cand.name] = build_layer(model, d, init)
        if cand.site == "mha":
            attention[cand.name.rpartition(".")[0]] = None
        else:
            _set(model, cand.name, built[cand.name])
    for path in attention:
        mha = model.get_submodule(path) if path else model
        prefix = f"{path}." if path else ""
        _set(model, path, _fused_attention(mha, built.get(f"{prefix}in_proj"), built.get(f"{prefix}out_proj")))
    return built


def _fused_attention(mha: nn.MultiheadAttention, in_proj, out_proj) -> FusedSelfAttention:
    if in_proj is None:
        e = mha.embed_dim
        in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device=mha.in_proj_weight.device,
                            dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            in_proj.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                in_proj.bias.copy_(mha.in_proj_bias)
    return FusedSelfAttention.from_mha(mha, in_proj, out_proj if out_proj is not None else mha.out_proj)
