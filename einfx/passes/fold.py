"""Fold-to-dense (inference): a structured layer whose best plan is predicted slower than a dense matmul
becomes an exact dense ``nn.Linear`` (W = the folded cores), unless it is kept by name.

    call_module[EinsumLinear](x) -> call_module[nn.Linear](x)      when FOLD_MARGIN · plan.time > plan.dense_time
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import fx, nn

from einfx.passes.base import PassResult
from einfx.passes.lower import lowerable
from einfx.planning.costmodel import copy_cost
from einfx.planning.planner import plan_for
from einfx.planning.profile import DeviceProfile, default_profile

__all__ = ["fold_to_dense", "fold_modules", "FoldDecision", "fold_decision", "dense_linear", "FOLD_MARGIN"]


@dataclass(frozen=True)
class FoldDecision:
    """Predicted times of the best structured plan and of dense, and what was chosen, with the reason."""

    layer: str
    structured_time: float
    dense_time: float
    plan: str
    fold: bool
    reason: str


# A structured layer stays structured for inference only when predicted at least this much faster than
# dense. The fold is exact and never slower than dense; keeping a layer on a thin predicted gain risks the
# cost model's error, which bench/lowering.py's fold sweep measured at up to ~40% on sub-millisecond layers.
FOLD_MARGIN = 1.25


def fold_decision(layer, tokens: int = 512, profile: DeviceProfile | None = None, *, name: str | None = None,
                  forbidden: bool = False, margin: float = FOLD_MARGIN) -> FoldDecision:
    """Decide whether ``layer`` (an `EinsumLinear`) should become dense for inference at ``tokens``.

    The layer folds when its predicted time (best plan plus the bias pass) times ``margin`` exceeds the
    predicted dense time, unless ``forbidden``.
    """
    label = name or layer.name or type(layer).__name__
    prof = profile or default_profile(next(iter(layer.cores().values())).device.type)
    plan = plan_for(layer, tokens, profile=prof, orders=("xab", "xba"))
    structured = plan.time + _bias_time(layer, plan, tokens, prof)
    slower = structured * margin > plan.dense_time
    times = f"structured {structured * 1e3:.3f} ms vs dense {plan.dense_time * 1e3:.3f} ms ({prof.name}"
    times += f", structure kept from {margin:.2f}x)" if margin != 1 else ")"
    if layer.sizes.dense:
        return FoldDecision(label, structured, plan.dense_time, plan.order, False, "already dense")
    if not slower:
        return FoldDecision(label, structured, plan.dense_time, plan.order, False, f"structure wins: {times}")
    if forbidden:
        return FoldDecision(label, structured, plan.dense_time, plan.order, False, f"fold forbidden by policy: {times}")
    return FoldDecision(label, structured, plan.dense_time, plan.order, True, f"dense wins: {times}")


def _bias_time(layer, plan, tokens: int, profile: DeviceProfile) -> float:
    """The bias add a structured layer pays and a dense GEMM fuses: an elementwise pass over y."""
    if getattr(layer, "bias", None) is None or layer.sizes.dense:
        return 0.0
    itemsize = torch.empty((), dtype=getattr(torch, plan.dtype)).element_size()
    return copy_cost(tokens * layer.sizes.d_out, itemsize, layer.sizes.d_out, profile).time


@torch.no_grad()
def dense_linear(layer) -> nn.Linear:
    """An ``nn.Linear`` computing exactly the layer's map (same device and dtype, bias copied)."""
    weight = layer.to_dense()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear


def fold_to_dense(gm: fx.GraphModule, tokens: int = 512, profile: DeviceProfile | None = None,
                  keep: tuple[str, ...] = ()) -> PassResult:
    """Replace structured layers that the cost model says lose to dense by exact dense layers.

    Args:
        gm: a GraphModule with `EinsumLinear` ``call_module`` nodes.
        tokens: tokens per call the decision is made for.
        profile: device profile (default: built-in profile of each layer's device).
        keep: module-name patterns (fnmatch) that must stay structured (a policy that forbids folding).

    Returns:
        `PassResult` with stats ``{"folded": [names], "decisions": {name: FoldDecision}}``.
    """
    decisions, folded = {}, []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not lowerable(module):
            continue
        forbidden = any(fnmatch.fnmatchcase(node.target, pat) for pat in keep)
        decision = fold_decision(module, tokens, profile, name=node.target, forbidden=forbidden)
        decisions[node.target] = decision
        if decision.fold:
            parent, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, dense_linear(module))
            folded.append(node.target)
    if folded:
        gm.recompile()
    return PassResult(gm, bool(folded), {"folded": folded, "decisions": decisions})


def fold_modules(model: nn.Module, tokens: int = 512, profile: DeviceProfile | None = None,
                 keep: tuple[str, ...] = ()) -> dict[str, FoldDecision]:
    """`fold_to_dense` on a module tree (no graph): the same decision per structured layer, in place.

    A layer that stays structured records ``profile`` as its ``export_profile``, so a graph captured from
    the model (torch.export, ONNX) runs the plan made for that profile. Returns the decisions by name.
    """
    decisions = {}
    for name, module in list(model.named_modules()):
        if not name or not lowerable(module):
            continue
        forbidden = any(fnmatch.fnmatchcase(name, pat) for pat in keep)
        decision = fold_decision(module, tokens, profile, name=name, forbidden=forbidden)
        decisions[name] = decision
        if decision.fold:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, dense_linear(module))
        else:
            module.export_profile = profile
    return decisions
