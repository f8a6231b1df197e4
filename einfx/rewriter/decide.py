"""Match detected candidates against a `Policy`: one `Decision` per candidate, each with its reason.

Order of checks (the first that fails gives the reason): detection objection (tied / shared / used
elsewhere / non-2-D / unsupported form) -> policy selection (exclude, rules, default) -> ``min_features``
-> the structure's sizes at this shape. With a ``budget``, the accepted layers' ranks are then chosen
by `einfx.rewriter.budget.plan_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from einfx.errors import EinfxError
from einfx.rewriter.budget import LayerOptions, Option, option_cost, plan_budget, rank_options
from einfx.rewriter.detect import Candidate
from einfx.rewriter.policy import Policy
from einfx.rewriter.spectrum import rank_errors
from einfx.structures.sizes import Sizes
from einfx.structures.structure import Structure
from einfx.structures.taxonomy import taxonomy

__all__ = ["Decision", "decide", "BudgetOutcome"]


@dataclass(frozen=True)
class Decision:
    """The verdict on one candidate: structured (``accepted``) or kept as it is, and why."""

    candidate: Candidate
    accepted: bool
    reason: str
    structure: Structure | None = None
    sizes: Sizes | None = None


@dataclass(frozen=True)
class BudgetOutcome:
    """What the budget planner achieved over the accepted layers."""

    metric: str
    target: float
    achieved: float
    dense_cost: float
    cost: float

    def to_dict(self) -> dict:
        return {"metric": self.metric, "target": self.target, "achieved": self.achieved,
                "dense_cost": self.dense_cost, "cost": self.cost}


def _first_pass(cand: Candidate, policy: Policy) -> Decision:
    if cand.objection is not None:
        return Decision(cand, False, cand.objection)
    sel = policy.select(cand.name, cand.module_types)
    if sel.structure is None:
        return Decision(cand, False, sel.reason)
    small = min(cand.d_in, cand.d_out)
    if small < policy.min_features:
        return Decision(cand, False, f"below min_features: min(d_in, d_out) = {small} < {policy.min_features}")
    structure = sel.structure.grouped(cand.groups)
    try:
        sizes = structure.resolve(cand.d_in, cand.d_out, layer=cand.name)
    except EinfxError as exc:
        return Decision(cand, False, f"shape impossible for {structure.name} ({sel.reason}): {exc}")
    return Decision(cand, True, sel.reason, structure, sizes)


def _options(d: Decision, policy: Policy, weight_of) -> LayerOptions:
    cand, metric = d.candidate, policy.budget.metric
    dense_cost = option_cost(Sizes.for_dense(cand.d_in, cand.d_out), metric)
    choices = rank_options(d.structure, cand.d_in, cand.d_out, layer=cand.name)
    errors = None
    if policy.init == "project" and weight_of is not None:
        w = weight_of(cand)
        errors = rank_errors(w, choices[0][1])
        norm2 = float((w.detach().double() ** 2).sum())
    opts = []
    for s, z in choices:
        if errors is not None:
            loss = float(errors[min(z.rho, len(errors) - 1)]) ** 2 * norm2
        else:
            # random init (or no SVD shortcut): more rank (ψ) first, then more parameters
            loss = -(1000.0 * taxonomy(s, cand.d_in, cand.d_out).psi + z.params / (cand.d_in * cand.d_out))
        opts.append(Option(z.rho, option_cost(z, metric), loss))
    opts.sort(key=lambda o: o.cost)
    return LayerOptions(cand.name, dense_cost, tuple(opts))


def decide(candidates: Sequence[Candidate], policy: Policy,
           weight_of: Callable[[Candidate], torch.Tensor] | None = None) -> tuple[list[Decision], BudgetOutcome | None]:
    """Decide every candidate; with a budget, choose the ranks of the accepted layers.

    Args:
        candidates: from `einfx.rewriter.detect`.
        policy: the policy.
        weight_of: returns a candidate's dense (d_out, d_in) weight, for projection errors in the budget.

    Raises:
        PolicyError: the budget cannot be met even with the cheapest options.
    """
    decisions = [_first_pass(c, policy) for c in candidates]
    if policy.budget is None:
        return decisions, None
    accepted = [d for d in decisions if d.accepted]
    if not accepted:
        return decisions, None
    layers = [_options(d, policy, weight_of) for d in accepted]
    plan = plan_budget(layers, policy.budget.fraction)
    out = []
    for d in decisions:
        if d.accepted and d.structure.kind in ("low_rank", "btt", "tensor_train"):
            rank = plan.ranks[d.candidate.name]
            s = replace(d.structure, rank=rank, rank_frac=None)
            d = replace(d, structure=s, sizes=s.resolve(d.candidate.d_in, d.candidate.d_out, layer=d.candidate.name),
                        reason=f"{d.reason}; rank {rank} chosen by the {policy.budget.metric} budget planner")
        out.append(d)
    outcome = BudgetOutcome(policy.budget.metric, policy.budget.fraction, plan.fraction, plan.dense_cost, plan.cost)
    return out, outcome
