"""Lowering: replace each structured layer's call by its plan's primitive nodes.

    call_module[EinsumLinear](x) -> reshape / permute / expand / pad / getitem / matmul (+ add bias)

The cores are read with ``get_attr`` from the layer, which stays in the module tree, so the parameters
are the same ``nn.Parameter`` objects and ``state_dict`` keys do not change (``layer.A``, ``layer.B``,
``layer.bias``); the lowered graph trains with autograd. No einsum node is emitted, so an exported ONNX
graph holds MatMul / Transpose / Reshape only. BTT-MoE layers are left alone (they have their own forward).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from einfx.passes.base import PassResult
from einfx.planning.plan import Plan
from einfx.planning.planner import plan_for
from einfx.planning.profile import DeviceProfile, default_profile
from einfx.layers.linear import EinsumLinear

__all__ = ["lower", "emit_plan", "lowerable"]


def lowerable(module) -> bool:
    """True for an `EinsumLinear` whose forward is the plain structured contraction (not BTT-MoE)."""
    return isinstance(module, EinsumLinear) and module.structure.kind != "btt_moe"


def emit_plan(graph: fx.Graph, plan: Plan, x: fx.Node, cores: dict[str, fx.Node]) -> fx.Node:
    """Insert ``plan``'s steps into ``graph`` at the current insertion point; return y's node (no bias)."""
    env: dict[str, fx.Node] = {"x": x, **cores}
    for step in plan.steps:
        vals = [env[name] for name in step.inputs]
        a, v = step.args, vals[0]
        if step.op == "pad":
            node = graph.call_function(F.pad, (v, (0, a[0])))
        elif step.op in ("reshape", "permute", "expand"):
            node = graph.call_method(step.op, (v, tuple(a)))
        elif step.op == "contiguous":
            node = graph.call_method("contiguous", (v,))
        elif step.op == "crop":
            node = graph.call_function(operator.getitem, (v, (slice(None, a[0]), slice(None, a[1]))))
        elif step.op == "slice":
            node = graph.call_function(operator.getitem, (v, (Ellipsis, slice(None, a[0]))))
        elif step.op == "matmul":
            node = graph.call_function(torch.matmul, (v, vals[1]))
        else:  # restore: y.reshape(x.shape[:-1] + (d_out,))
            size = graph.call_method("size", (vals[1],))
            lead = graph.call_function(operator.getitem, (size, slice(None, -1)))
            shape = graph.call_function(operator.add, (lead, (a[0],)))
            node = graph.call_method("reshape", (v, shape))
        env[step.out] = node
    return env[plan.output]


def lower(gm: fx.GraphModule, tokens: int = 512, profile: DeviceProfile | None = None, dtype=None) -> PassResult:
    """Replace every `EinsumLinear` call in ``gm`` by the primitive nodes of its plan.

    Args:
        gm: a GraphModule whose structured layers are ``call_module`` nodes (trace with a tracer that keeps
            `EinsumLinear` as a leaf).
        tokens: the token count the plans are made for (plans run at any token count).
        profile: the device profile to plan with (default: the built-in profile of the layer's device);
            use ``profile.with_backend("onnxruntime")`` for graphs that will run in onnxruntime. A layer
            with an ``export_plan`` (measured in its runtime by `einfx.export.tune`) runs that plan instead.
        dtype: plan for this dtype instead of the parameters' dtype.

    Returns:
        `PassResult` with stats ``{"lowered": n, "plans": {layer name: plan.describe()}}``.
    """
    lowered, plans = 0, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not lowerable(module):
            continue
        param = next(iter(module.cores().values()))
        prof = profile or default_profile(param.device.type)
        plan = getattr(module, "export_plan", None) or plan_for(module, tokens, dtype=dtype, profile=prof)
        with gm.graph.inserting_before(node):
            cores = {key: gm.graph.get_attr(f"{node.target}.{key}") for key in module.cores()}
            y = emit_plan(gm.graph, plan, node.args[0], cores)
            if module.bias is not None:
                y = gm.graph.call_function(operator.add, (y, gm.graph.get_attr(f"{node.target}.bias")))
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        lowered += 1
        plans[node.target] = plan.describe()
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, lowered > 0, {"lowered": lowered, "plans": plans})
