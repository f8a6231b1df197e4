"""`optimize` and `explain`: see every linear computation of a model, structure it by policy, report.

    model -> record (example inputs) | fx (none) -> candidates -> decide (policy, budget)
          -> every accepted site a module: structure_modules -> the user's class + Report
          -> functional sites: capture (fx | export) -> detect -> structure_linears -> CapturedGraphModule

The input model is never modified: the pipeline works on a deep copy (weight ties are kept in the copy).
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from einfx.errors import PolicyError, TraceError, UnmatchedPatternWarning
from einfx.passes.base import run_passes
from einfx.passes.fold import fold_decision
from einfx.passes.lower import lowerable
from einfx.rewriter.budget import option_cost
from einfx.rewriter.decide import Decision, decide
from einfx.rewriter.detect import detect, detect_modules
from einfx.rewriter.policy import Policy
from einfx.rewriter.report import Report, Row
from einfx.rewriter.substitute import structure_linears, structure_modules, weight_of
from einfx.rewriter.captured import behave_like
from einfx.rewriter.fidelity import fidelity
from einfx.rewriter.fit import data_aware, fit_on_data
from einfx.rewriter.policy import format_unmatched
from einfx.rewriter.record import record, record_candidates
from einfx.rewriter.search import describe as describe_search, search
from einfx.rewriter.sensitivity import output_metrics
from einfx.rewriter.saved import is_hf_model, manifest
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


def _row(d: Decision, layer, fold_allowed: bool = True, note: str | None = None) -> Row:
    c = d.candidate
    dense = Sizes.for_dense(c.d_in, c.d_out)
    p0, f0 = int(option_cost(dense, "params")), int(option_cost(dense, "flops"))
    if not d.accepted or layer is None:
        return Row(c.name, c.kind, c.shape, c.d_in, c.d_out, "kept", d.reason, None, None, p0, p0, f0, f0)
    z = layer.sizes
    reason = f"{d.reason}; {note}" if note else d.reason
    f1 = int(option_cost(z, "flops"))
    if f1 > f0:
        reason += (f"; costs {f1 / f0:.2f}x the dense layer's FLOPs per token: this structure is more expensive "
                   "than the layer it replaces (a budget with data= searches for cheaper ones)")
    row = Row(c.name, c.kind, c.shape, c.d_in, c.d_out, "structured", reason, d.structure.name, z.describe(), p0,
              int(option_cost(z, "params")), f0, int(option_cost(z, "flops")), layer.projection_error)
    return row.with_extra(**_inference_columns(layer, fold_allowed))


def _inference_columns(layer, fold_allowed: bool, tokens: int = DEPLOY_TOKENS) -> dict:
    """Predicted times of the best structured plan and of dense at ``tokens`` and the inference choice."""
    if not lowerable(layer):
        return {}
    decision = fold_decision(layer, tokens, forbidden=not fold_allowed)
    return {
        "plan ms": round(decision.structured_time * 1e3, 4),
        "dense ms": round(decision.dense_time * 1e3, 4),
        "inference": "fold to dense" if decision.fold else "structured",
    }


@dataclass(frozen=True)
class _Analysis:
    """What the first look at the model found: every linear computation, who looked, what failed, the fx
    capture when fx did the looking, and the module names in the order they ran (recording only)."""

    candidates: list
    frontend: str
    failures: dict
    fx_capture: Any = None
    order: tuple[str, ...] = ()


def _analyse(work: nn.Module, args, kwargs, policy: Policy) -> _Analysis:
    """Every linear computation of ``work``.

    With example inputs the model runs once under the recorder (`einfx.rewriter.record`), which needs no
    tracer; without them torch.fx is the only way to look, and a model it cannot trace falls back to the
    module tree when the policy allows it.
    """
    if args is not None or kwargs:
        try:
            rec = record(work, args or (), kwargs)
        except Exception as exc:  # the model's own error on the example inputs
            raise TraceError(f"{type(work).__name__} raised on the example inputs, so einfx cannot see which "
                             f"linear layers run: {type(exc).__name__}: {exc}", {"record": str(exc)}) from exc
        return _Analysis(record_candidates(work, rec), "record", {}, order=tuple(rec.calls))
    try:
        cap = capture(work, None, None, frontends=("fx",), allow_module_fallback=policy.fallback == "module")
    except TraceError as exc:
        raise TraceError(
            f"could not trace {type(work).__name__} without example inputs: torch.fx failed "
            f"({exc.reasons.get('fx', exc)}). Pass example_inputs or example_kwargs (one batch the model "
            "accepts) so that einfx runs the model once and records its linear layers, or set the policy's "
            "fallback='module' to replace its nn.Linear/Conv1D modules by name.", exc.reasons) from exc
    if cap.is_graph:
        return _Analysis(detect(cap.module, work), "fx", dict(cap.reasons), cap)
    return _Analysis(detect_modules(work), "module", dict(cap.reasons))


def _graph_for(work, args, kwargs, wanted: set[str], frontends, previous=None):
    """The first graph front end whose detection shows every name in ``wanted`` as a rewritable function
    site: (capture, candidates by name) or (None, failures by front end)."""
    failures: dict[str, str] = {}
    for name in [f for f in frontends if f != "hf_fx"]:
        if name == "fx" and previous is not None:
            cap = previous
        else:
            try:
                cap = capture(work, args, kwargs, frontends=(name,))
            except TraceError as exc:
                failures[name] = exc.reasons.get(name, str(exc))
                continue
        found = {c.name: c for c in detect(cap.module, work)}
        missing = sorted(n for n in wanted if n not in found or found[n].site != "function" or found[n].objection)
        if not missing:
            return cap, found
        failures[name] = f"the graph does not show {', '.join(map(repr, missing))} as x·W"
    return None, failures


def _keep(decisions, names: set[str], why: str):
    return [Decision(d.candidate, False, why) if d.candidate.name in names else d for d in decisions]


def _output_metrics(work: nn.Module, decisions, policy: Policy, data) -> dict | None:
    """The output metric G of every layer fitted to data, on the still-dense model; ``None`` when the policy
    fits each layer's own output."""
    if policy.fit_objective != "output":
        return None
    names = [d.candidate.name for d in decisions if data_aware(d)]
    return output_metrics(work, names, data) if names else None


def _example(data: list):
    """(args, kwargs) of the first data batch, as an example input."""
    first = data[0]
    if isinstance(first, Mapping):
        return None, dict(first)
    return _inputs(first), {}


def optimize_with_report(model: nn.Module, policy, example_inputs=None, verify: bool = False, *,
                         example_kwargs: Mapping | None = None, frontends=FRONTENDS,
                         data: Iterable | None = None) -> tuple[nn.Module, Report]:
    """`optimize`, also returning the `Report` (the same rows `explain` gives)."""
    policy = as_policy(policy)
    if isinstance(example_inputs, Mapping):  # keyword inputs (a tokenizer's output), as to_onnx takes them
        if example_kwargs:
            raise PolicyError("example_inputs is a mapping of keyword inputs and example_kwargs is given too; "
                              "give the keyword inputs once")
        example_inputs, example_kwargs = None, example_inputs
    args = _inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    data = list(data) if data is not None else None
    if data is not None and not data:
        raise PolicyError("data= holds no batches; give at least one batch (a dict, a tuple or a tensor)")
    if data is not None and args is None and not kwargs:
        args, kwargs = _example(data)
    if verify and args is None and not kwargs:
        raise PolicyError("verify=True needs example_inputs to compare the outputs with the original")
    work = copy.deepcopy(model)
    seen = _analyse(work, args, kwargs, policy)
    candidates, frontend, failures, fx_cap = seen.candidates, seen.frontend, seen.failures, seen.fx_capture
    order = seen.order or tuple(c.name for c in candidates)
    unmatched = policy.unmatched([c.name for c in candidates])
    # with data, a budget is met by the search over θ (module sites); otherwise by the rank planner of decide
    searching = data is not None and policy.budget is not None and policy.init == "project"
    decisions, outcome = decide(candidates, replace(policy, budget=None) if searching else policy,
                                weight_of=functools.partial(weight_of, work))
    functional = {d.candidate.name for d in decisions if d.accepted and d.candidate.site == "function"}
    searched: dict = {}
    metrics = None
    skipped_search = None
    if searching and functional:
        # the search fits module sites; a model with functional sites keeps the rank planner (graph path below)
        decisions, outcome = decide(candidates, policy, weight_of=functools.partial(weight_of, work))
        skipped_search = (f"not run: {len(functional)} functional site(s) are rewritten in a captured graph, where "
                          "the rank planner meets the budget on weight-space errors")
    elif searching:
        metrics = _output_metrics(work, decisions, policy, data)
        decisions, outcome, searched = search(work, decisions, policy, data, out_metrics=metrics)
    cap = None
    notes: dict[str, str] = {}
    if functional:
        cap, found = _graph_for(work, args, kwargs, functional, frontends, fx_cap)
        if cap is None:
            listing = "; ".join(f"{k}: {v}" for k, v in found.items())
            failures.update(found)
            decisions = _keep(decisions, functional, "functional use (the weight is read by forward code, not "
                              f"called as a module) that no graph front end can rewrite ({listing})")
    if cap is not None:
        # rewrite in the graph: the decisions are made again on the graph's own candidates (same names)
        graph_decisions = {d.candidate.name: d for d in decide(list(found.values()), policy,
                                                              weight_of=functools.partial(weight_of, cap.module))[0]}
        step = functools.partial(structure_linears, decisions=list(graph_decisions.values()), init=policy.init)
        functools.update_wrapper(step, structure_linears)
        result = run_passes(cap.module, [step])
        module = result.graph_module
        built = result.stats[structure_linears.__name__]["layers"]
        names = result.stats[structure_linears.__name__]["names"]
        graph_names = set(graph_decisions)
        decisions = list(graph_decisions.values()) + [_not_in_graph(d, cap.frontend) for d in decisions
                                                      if d.candidate.name not in graph_names]
        layers = {d.candidate.name: built.get(names.get(d.candidate.name, d.candidate.name)) for d in decisions}
        frontend = f"{frontend}+{cap.frontend}" if frontend != cap.frontend else frontend
        exported = cap.frontend == "export"
        module = behave_like(module, model, (args or ()) if exported else None, kwargs, model.training)
    else:
        module = work
        if data is not None and policy.init == "project":
            if metrics is None:
                metrics = _output_metrics(work, decisions, policy, data)
            layers, notes = fit_on_data(work, decisions, policy.init, data, order, reference=model,
                                        out_metrics=metrics, residual=policy.fit_objective == "output")
        else:
            layers = structure_modules(work, decisions, policy.init)
        module.train(model.training)
        if is_hf_model(module):
            # the manifest rides in the config, so the model's own save_pretrained writes a loadable folder
            module.config.einfx = manifest(module)
    rows = tuple(_search_columns(_row(d, layers.get(d.candidate.name), policy.fold_to_dense,
                                      notes.get(d.candidate.name)), searched.get(d.candidate.name), outcome)
                 for d in decisions)
    module.einfx_fold_to_dense = policy.fold_to_dense
    error = output_error(model, module, args, kwargs) if verify else None
    fid = fidelity(model, module, data).to_dict() if data is not None else None
    budget = outcome.to_dict() if outcome is not None else None
    if searched:
        budget["search"] = describe_search(searched)
    elif skipped_search and budget is not None:
        budget["search"] = skipped_search
    report = Report(rows, frontend, failures, type(model).__name__, budget, error, unmatched, fid)
    if unmatched:
        warnings.warn(UnmatchedPatternWarning(format_unmatched(unmatched)), stacklevel=3)
    return module, report


def _search_columns(row: Row, searched, outcome) -> Row:
    """The search's columns of a searched layer: the chosen option's measured error and budget share."""
    if searched is None:
        return row
    c = searched.chosen
    return row.with_extra(**{"search err": round(c.error, 4),
                             "budget share": round(c.cost / (outcome.target * outcome.dense_cost), 4)})


def _not_in_graph(d: Decision, frontend: str) -> Decision:
    if not d.accepted:
        return d
    return Decision(d.candidate, False, f"not visible in the {frontend} graph (inside a module that tracer keeps "
                                        "opaque); kept as it is")


def optimize(model: nn.Module, policy, example_inputs=None, verify: bool = False, *,
             example_kwargs: Mapping | None = None, data: Iterable | None = None) -> nn.Module:
    """Structure every linear layer of ``model`` that ``policy`` selects.

    Args:
        model: any nn.Module (not modified).
        policy: an `einfx.Policy`, a dict, or a path to a YAML/TOML policy file.
        example_inputs: positional example inputs (a tuple, or one tensor), or a mapping of keyword inputs
            (a tokenizer's output); needed by the torch.export front end and by ``verify``.
        verify: compare the outputs with the original model's on ``example_inputs``; the error is in
            ``module.einfx_report.verify_error``.
        example_kwargs: keyword example inputs.
        data: calibration batches (dicts of keyword inputs such as a tokenizer's output, tuples of positional
            inputs, or tensors). With ``init="project"`` every projected layer is fitted to its real inputs
            (`einfx.rewriter.fit`: in execution order, on what the already-structured model feeds it), and the
            report carries `einfx.fidelity` of the result against the original on these batches. The first
            batch is the example when no example inputs are given.

    Returns:
        A `torch.fx.GraphModule` where a tracer captured the model (same call signature and output
        structure), or the model's copy with modules replaced in place (policy ``fallback="module"``). Every
        structured layer is an `einfx.EinsumLinear` submodule; ``module.einfx_report`` holds the `Report`.

    Raises:
        TraceError: no front end captured the model and the policy does not allow the module fallback.
        PolicyError: invalid policy, or a budget that cannot be met.
    """
    module, report = optimize_with_report(model, policy, example_inputs, verify, example_kwargs=example_kwargs,
                                          data=data)
    module.einfx_report = report
    return module


def explain(model: nn.Module, policy, example_inputs=None, verify: bool = False, *,
            example_kwargs: Mapping | None = None, data: Iterable | None = None) -> Report:
    """The dry run of `optimize`: one row per candidate with its decision, reason, sizes, costs and projection
    error; ``print(report)`` shows a table, ``report.to_json()`` the same as JSON. ``model`` is unchanged."""
    return optimize_with_report(model, policy, example_inputs, verify, example_kwargs=example_kwargs, data=data)[1]
