"""`optimize` and `explain`: trace a model, find every linear computation, structure it by policy, report.

    model -> capture (fx | hf_fx | export | module fallback) -> detect -> decide (policy, budget)
          -> run_passes([structure_linears]) -> GraphModule + Report

The input model is never modified: the pipeline works on a deep copy (weight ties are kept in the copy).
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from einfx.errors import PolicyError
from einfx.passes.base import run_passes
from einfx.rewriter.budget import option_cost
from einfx.rewriter.decide import Decision, decide
from einfx.rewriter.detect import detect, detect_modules
from einfx.rewriter.policy import Policy
from einfx.rewriter.report import Report, Row
from einfx.rewriter.substitute import structure_linears, structure_modules, weight_of
from einfx.rewriter.trace import FRONTENDS, capture
from einfx.structures.sizes import Sizes

__all__ = ["optimize", "explain", "optimize_with_report", "as_policy", "output_error", "DEPLOY_TOKENS"]

# Tokens per call that the inference columns of the report (predicted plan/dense time) are computed for.
DEPLOY_TOKENS = 512


def as_policy(policy: Any) -> Policy:
    """A `Policy` from a Policy, a mapping, or a path to a YAML/TOML/JSON file."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_dict(policy)
    if isinstance(policy, (str, os.PathLike)):
        return Policy.from_file(policy)
    raise PolicyError(f"a policy is an einfx.Policy, a dict or a file path; got {type(policy).__name__}")


def _inputs(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    leaves = pytree.tree_leaves(value)
    if len(leaves) == 1 and leaves[0] is value:
        return []
    return [t for v in leaves for t in _tensors(v)]


@torch.no_grad()
def output_error(reference: nn.Module, candidate: nn.Module, example_inputs, example_kwargs=None) -> float:
    """Largest relative Frobenius error ‖y − ŷ‖/‖y‖ over the floating-point output tensors."""
    args, kwargs = _inputs(example_inputs) or (), dict(example_kwargs or {})
    ref, got = _tensors(reference(*args, **kwargs)), _tensors(candidate(*args, **kwargs))
    if len(ref) != len(got):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, got):
        if not a.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        a, b = a.double(), b.double()
        denom = float(a.norm()) or 1.0
        worst = max(worst, float((a - b).norm()) / denom)
    return worst


def _row(d: Decision, layer, fold_allowed: bool = True) -> Row:
    c = d.candidate
    dense = Sizes.for_dense(c.d_in, c.d_out)
    p0, f0 = int(option_cost(dense, "params")), int(option_cost(dense, "flops"))
    if not d.accepted or layer is None:
        return Row(c.name, c.kind, c.shape, c.d_in, c.d_out, "kept", d.reason, None, None, p0, p0, f0, f0)
    z = layer.sizes
    row = Row(c.name, c.kind, c.shape, c.d_in, c.d_out, "structured", d.reason, d.structure.name, z.describe(), p0,
              int(option_cost(z, "params")), f0, int(option_cost(z, "flops")), layer.projection_error)
    return row.with_extra(**_inference_columns(layer, fold_allowed))


def _inference_columns(layer, fold_allowed: bool, tokens: int = DEPLOY_TOKENS) -> dict:
    """Predicted times of the best structured plan and of dense at ``tokens`` and the inference choice."""
    from einfx.passes.fold import fold_decision
    from einfx.passes.lower import lowerable

    if not lowerable(layer):
        return {}
    decision = fold_decision(layer, tokens, forbidden=not fold_allowed)
    return {
        "plan ms": round(decision.structured_time * 1e3, 4),
        "dense ms": round(decision.dense_time * 1e3, 4),
        "inference": "fold to dense" if decision.fold else "structured",
    }


def optimize_with_report(model: nn.Module, policy, example_inputs=None, verify: bool = False, *,
                         example_kwargs: Mapping | None = None, frontends=FRONTENDS) -> tuple[nn.Module, Report]:
    """`optimize`, also returning the `Report` (the same rows `explain` gives)."""
    policy = as_policy(policy)
    args = _inputs(example_inputs)
    if verify and args is None and not example_kwargs:
        raise PolicyError("verify=True needs example_inputs to compare the outputs with the original")
    work = copy.deepcopy(model)
    cap = capture(work, args, example_kwargs, frontends=frontends, allow_module_fallback=policy.fallback == "module")
    candidates = detect(cap.module, work) if cap.is_graph else detect_modules(work)
    decisions, outcome = decide(candidates, policy, weight_of=functools.partial(weight_of, cap.module))
    if cap.is_graph:
        step = functools.partial(structure_linears, decisions=decisions, init=policy.init)
        functools.update_wrapper(step, structure_linears)
        result = run_passes(cap.module, [step])
        module = result.graph_module
        built = result.stats[structure_linears.__name__]["layers"]
        names = result.stats[structure_linears.__name__]["names"]
        layers = {name: built.get(names.get(name, name)) for name in (d.candidate.name for d in decisions)}
    else:
        module = work
        layers = structure_modules(work, decisions, policy.init)
    try:
        module.train(model.training)
    except NotImplementedError:  # torch.export graph modules keep the mode they were exported in
        pass
    rows = tuple(_row(d, layers.get(d.candidate.name), policy.fold_to_dense) for d in decisions)
    module.einfx_fold_to_dense = policy.fold_to_dense
    error = output_error(model, module, args, example_kwargs) if verify else None
    report = Report(rows, cap.frontend, dict(cap.reasons), type(model).__name__,
                    outcome.to_dict() if outcome is not None else None, error)
    return module, report


def optimize(model: nn.Module, policy, example_inputs=None, verify: bool = False, *,
             example_kwargs: Mapping | None = None) -> nn.Module:
    """Structure every linear layer of ``model`` that ``policy`` selects.

    Args:
        model: any nn.Module (not modified).
        policy: an `einfx.Policy`, a dict, or a path to a YAML/TOML policy file.
        example_inputs: positional example inputs (a tuple, or one tensor); needed by the torch.export front
            end and by ``verify``.
        verify: compare the outputs with the original model's on ``example_inputs``; the error is in
            ``module.einfx_report.verify_error``.
        example_kwargs: keyword example inputs.

    Returns:
        A `torch.fx.GraphModule` where a tracer captured the model (same call signature and output
        structure), or the model's copy with modules replaced in place (policy ``fallback="module"``). Every
        structured layer is an `einfx.EinsumLinear` submodule; ``module.einfx_report`` holds the `Report`.

    Raises:
        TraceError: no front end captured the model and the policy does not allow the module fallback.
        PolicyError: invalid policy, or a budget that cannot be met.
    """
    module, report = optimize_with_report(model, policy, example_inputs, verify, example_kwargs=example_kwargs)
    module.einfx_report = report
    return module


def explain(model: nn.Module, policy, example_inputs=None, verify: bool = False, *,
            example_kwargs: Mapping | None = None) -> Report:
    """The dry run of `optimize`: one row per candidate with its decision, reason, sizes, costs and projection
    error; ``print(report)`` shows a table, ``report.to_json()`` the same as JSON. ``model`` is unchanged."""
    return optimize_with_report(model, policy, example_inputs, verify, example_kwargs=example_kwargs)[1]
