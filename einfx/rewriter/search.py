"""Search over θ under a budget with data (SPEC §6): per layer, keep it dense or pick one structure at one rank
so that the model's output moves as little as possible while the layers fit a global FLOP or parameter budget.

    covariances C of every layer's inputs on the original model (one streaming pass)
      -> per layer, the options: dense + each candidate family at several ranks, each cheaper than dense,
         each with its measured data-aware error e = sqrt(tr(G ΔW C ΔWᵀ) / tr(G W C Wᵀ)), G the layer's output
         metric (`einfx.rewriter.sensitivity`; the identity when the policy fits each layer's own output)
         (low-rank: every rank at once from one whitened SVD, exact; the others: `project_on_data`)
      -> per layer, its sensitivity s: the model's relative squared output error when only this layer carries
         the error of one probe option, divided by that option's e² (a forward pass per layer)
      -> the predicted loss of an option, s·e², is additive over layers to first order; the greedy knapsack of
         `einfx.rewriter.budget.plan_budget` picks one option per layer under the budget

The chosen layers are then fitted sequentially (`einfx.rewriter.fit`) like any data-aware conversion. A
structure that costs more than the dense layer is never an option: dense is always there and cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from einfx.errors import EinfxError, PolicyError
from einfx.rewriter.budget import LayerOptions, Option, option_cost, plan_budget
from einfx.rewriter.decide import BudgetOutcome, Decision
from einfx.rewriter.fidelity import batch_mask, call
from einfx.rewriter.fit import DAMPENING, _statistics, data_aware
from einfx.rewriter.substitute import weight_of
from einfx.structures.calibrated import _fold as fold_cores, low_rank_on_data, metric_root, project_on_data
from einfx.structures.sizes import Sizes
from einfx.structures.structure import Structure

__all__ = ["DEFAULT_CANDIDATES", "SearchChoice", "LayerSearch", "search", "describe", "candidate_structures",
           "probe_batches", "PROBE_BATCHES", "SEARCH_SWEEPS"]

# Families searched when the policy names none: dense is always an option besides these.
DEFAULT_CANDIDATES = ("low_rank", "btt", "monarch", "tensor_train", "kronecker")
# Ranks tried for the block families (those below the dense cost); low-rank tries every rank (closed form).
BLOCK_RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Batches of the calibration data used to measure each layer's sensitivity.
PROBE_BATCHES = 4
# Refinement sweeps of `project_on_data` when measuring an option's error (the final fit does more).
SEARCH_SWEEPS = 1


@dataclass(frozen=True)
class SearchChoice:
    """One option of one layer: a structure (``dense`` to keep the layer), its cost, its measured data-aware
    error and the predicted model-output loss s·e²."""

    structure: Structure
    sizes: Sizes
    cost: float
    error: float
    loss: float


@dataclass(frozen=True)
class LayerSearch:
    """What the search weighed for one layer and what it chose."""

    name: str
    sensitivity: float
    dense_cost: float
    options: tuple[SearchChoice, ...]
    chosen: SearchChoice


@dataclass(frozen=True)
class _Family:
    structure: Structure
    sweep: bool  # try several ranks (a family name) or exactly this structure


def candidate_structures(specs: Sequence[Any] | None) -> tuple[_Family, ...]:
    """Normalize the policy's ``candidates``: a family name ("btt", or a mapping without a rank) is tried at
    several ranks; a `Structure`, or a name or mapping with a rank, is tried exactly as given."""
    out = []
    for spec in specs or DEFAULT_CANDIDATES:
        structure = Structure.from_dict(spec)
        if structure.kind in ("dense", "btt_moe"):
            raise PolicyError(f"search candidate {structure.name!r}: dense is always a candidate and btt_moe is not "
                              "fitted to pretrained weights; valid: low_rank, btt, monarch, tensor_train, "
                              "kronecker, theta")
        if isinstance(spec, Structure):
            pinned = True
        elif isinstance(spec, str):
            pinned = "rank" in spec.partition(":")[2]
        else:
            pinned = "rank" in spec or "rank_frac" in spec
        out.append(_Family(structure, sweep=structure.kind in ("low_rank", "btt", "tensor_train") and not pinned))
    return tuple(out)


def _structures(families: Sequence[_Family], start: Structure | None, d_in: int, d_out: int, layer: str,
                metric: str, groups: tuple[int, int] = (1, 1)) -> list[tuple[Structure, Sizes]]:
    """Every distinct (structure, sizes) cheaper than dense at this layer in the budget's metric and no more
    expensive in FLOPs."""
    dense = option_cost(Sizes.for_dense(d_in, d_out), metric)
    dense_flops = option_cost(Sizes.for_dense(d_in, d_out), "flops")
    wanted: list[Structure] = [start] if start is not None and start.kind not in ("dense", "btt_moe") else []
    for fam in families:
        if not fam.sweep:
            wanted.append(fam.structure)
        elif fam.structure.kind == "low_rank":
            wanted += [replace(fam.structure, rank=r, rank_frac=None) for r in range(1, min(d_in, d_out) + 1)]
        else:
            wanted += [replace(fam.structure, rank=r) for r in BLOCK_RANKS]
    seen: set = set()
    out = []
    for s in (w.grouped(groups) for w in wanted):
        try:
            z = s.resolve(d_in, d_out, layer=layer)
        except EinfxError:
            continue
        key = (z.alpha, z.beta, z.gamma, z.delta, z.epsilon, z.phi, z.rho)
        # never above dense: neither in the budget's metric nor in FLOPs
        if key in seen or option_cost(z, metric) >= dense or option_cost(z, "flops") > dense_flops:
            continue
        seen.add(key)
        out.append((s, z))
    return out


def _low_rank_errors(w: torch.Tensor, cov: torch.Tensor, out_metric: torch.Tensor | None = None) -> torch.Tensor:
    """Relative data-aware error of the best rank-r approximation for r = 0..min(d_in, d_out): from the
    singular values of Rᵀ W L (C = L Lᵀ, G = R Rᵀ), exact because the whitened truncation is optimal."""
    L = torch.linalg.cholesky(cov)
    white = w.double() @ L
    if out_metric is not None:
        white = metric_root(out_metric).T @ white
    s2 = torch.linalg.svdvals(white).square()
    total = float(s2.sum())
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[r] = Σ_{i>=r} σ_i²
    tail = torch.cat([tail, tail.new_zeros(1)])
    return (tail / total).clamp_min(0).sqrt() if total > 0 else torch.zeros_like(tail)


def _option_errors(w: torch.Tensor, cov: torch.Tensor, choices, costs: list[float], target: float, name: str,
                   out_metric: torch.Tensor | None = None) -> list[tuple[float, torch.Tensor | None] | None]:
    """Per (structure, sizes): its data-aware error and, for the block families, the fitted Ŵ (low-rank: None,
    rebuilt on demand); ``None`` for an option left out because its family is dominated at this layer.

    Low-rank errors come for every rank from one SVD. A block family (BTT, Tensor-Train, ...) is first measured
    at one probe rank, the one whose cost is nearest ``target``; when low-rank is a candidate too and reaches a
    lower error at no more cost, the family is dominated here and its other ranks are not fitted.
    """
    low = _low_rank_errors(w, cov, out_metric) if any(s.kind == "low_rank" for s, _ in choices) else None
    out: list = [None] * len(choices)
    families: dict[tuple, list[int]] = {}
    for j, (s, z) in enumerate(choices):
        if s.kind == "low_rank":
            out[j] = (float(low[z.rho]), None)
        else:
            families.setdefault((s.kind, s.tolerance, s.theta), []).append(j)
    lows = [(costs[j], out[j][0]) for j in range(len(choices)) if out[j] is not None]

    def measure(j):
        s, z = choices[j]
        p = project_on_data(w, cov, s, z, name=name, sweeps=SEARCH_SWEEPS, out_metric=out_metric)
        out[j] = (float(p.rel_error), _fold(p, z))

    for members in families.values():
        probe = min(members, key=lambda j: abs(costs[j] - target))
        measure(probe)
        beaten = any(c <= costs[probe] and e <= out[probe][0] for c, e in lows)
        if not beaten:
            for j in members:
                if out[j] is None:
                    measure(j)
    return out


def _fold(projection, z: Sizes) -> torch.Tensor:
    return fold_cores(projection.cores["A"].double(), projection.cores["B"].double(), z)[: z.d_out, : z.d_in]


def _low_rank_approx(w: torch.Tensor, cov: torch.Tensor, rank: int, out_metric: torch.Tensor | None = None
                     ) -> torch.Tensor:
    left, right = low_rank_on_data(w, cov, rank, out_metric)
    return left @ right


class _Perturb:
    """A forward hook adding x·ΔWᵀ to one module's output: the model as if only this layer were structured."""

    def __init__(self, module: nn.Module, delta: torch.Tensor):
        self.delta = delta
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x = args[0]
        return output + torch.nn.functional.linear(x, self.delta.to(x.dtype))

    def close(self):
        self.handle.remove()


def _outputs(model: nn.Module, batches) -> list[list[torch.Tensor]]:
    """Per batch, every floating-point output tensor (padding positions dropped where a mask fits)."""
    out = []
    for batch in batches:
        tensors = [t for t in pytree.tree_leaves(call(model, batch)) if isinstance(t, torch.Tensor)
                   and t.is_floating_point()]
        kept = []
        for t in tensors:
            mask = batch_mask(batch, t.shape)
            kept.append((t[mask] if mask is not None else t).double())
        out.append(kept)
    return out


def _sensitivity(model, name: str, delta: torch.Tensor, error: float, batches, reference) -> float:
    """The model's relative squared output error (averaged over its floating-point outputs) with ``delta``
    added to layer ``name``, per unit of the layer's e²."""
    if error <= 0:
        return 0.0
    hook = _Perturb(model.get_submodule(name), delta)
    try:
        got = _outputs(model, batches)
    finally:
        hook.close()
    count = len(reference[0]) if reference else 0
    total = 0.0
    for i in range(count):
        num = sum(float((r[i] - g[i]).square().sum()) for r, g in zip(reference, got))
        den = sum(float(r[i].square().sum()) for r in reference)
        total += num / den if den > 0 else 0.0
    return total / max(count, 1) / error ** 2


def probe_batches(data: Sequence, count: int = PROBE_BATCHES) -> list:
    """``count`` batches spread evenly over ``data`` (first and last included): data sorted by length, as
    length-bucketed batches are, is probed at every length, not at its shortest."""
    n = len(data)
    if n <= count:
        return list(data)
    if count == 1:
        return [data[0]]
    return [data[round(i * (n - 1) / (count - 1))] for i in range(count)]


def _covariances(model: nn.Module, names: list[str], data) -> dict[str, torch.Tensor]:
    """Each layer's dampened input covariance on ``model`` (the same statistics and ridge as the fit)."""
    out = {}
    for n, (gram, _, rows, *_) in _statistics(model, None, names, data).items():
        c = gram / max(rows, 1)
        out[n] = c + DAMPENING * float(torch.diagonal(c).mean() or 1.0) * torch.eye(c.shape[0], dtype=c.dtype)
    return out


@torch.no_grad()
def search(model: nn.Module, decisions: Sequence[Decision], policy, data: Sequence, progress=None,
           out_metrics: dict[str, torch.Tensor] | None = None) -> tuple[list[Decision], BudgetOutcome, dict[str, LayerSearch]]:
    """Choose per layer among dense and the policy's candidate structures under ``policy.budget``.

    Args:
        model: the original model (or an identical copy); it is run, never changed.
        decisions: from `einfx.rewriter.decide.decide` without a budget; the accepted module sites are searched,
            other accepted layers keep their structure and count against the budget as they are.
        policy: its ``budget`` (metric, fraction) and ``candidates``; each layer's own policy structure is a
            candidate too (the starting point).
        data: calibration batches.
        progress: an optional callable ``progress(done, total, what)``.
        out_metrics: per layer name, its output metric G (`einfx.rewriter.sensitivity.output_metrics`): the
            options' errors are measured under it; a layer without one is measured on its own output.

    Returns:
        (decisions with the chosen structures, kept-dense layers as not accepted with the search's reason;
        the budget outcome; per searched layer, the `LayerSearch`).

    Raises:
        PolicyError: the budget is out of reach even with the cheapest option of every layer.
    """
    metric, fraction = policy.budget.metric, policy.budget.fraction
    families = candidate_structures(policy.candidates)
    searched = [d for d in decisions if data_aware(d)]
    fixed = [d for d in decisions if d.accepted and not data_aware(d)]
    names = [d.candidate.name for d in searched]
    mode = model.training
    model.eval()
    try:
        covs = _covariances(model, names, data) if names else {}
        probe = probe_batches(data)
        reference = _outputs(model, probe)
        per_layer: dict[str, LayerSearch] = {}
        layers: list[LayerOptions] = []
        for i, d in enumerate(searched):
            if progress is not None:
                progress(i, len(searched), d.candidate.name)
            per_layer[d.candidate.name] = _weigh(model, d, covs.pop(d.candidate.name), families, metric, fraction,
                                                 probe, reference, (out_metrics or {}).get(d.candidate.name))
            ls = per_layer[d.candidate.name]
            layers.append(LayerOptions(ls.name, ls.dense_cost, tuple(
                Option(j, o.cost, o.loss) for j, o in enumerate(ls.options))))
    finally:
        model.train(mode)
    for d in fixed:
        z = d.sizes
        dense = option_cost(Sizes.for_dense(d.candidate.d_in, d.candidate.d_out), metric)
        layers.append(LayerOptions(d.candidate.name, dense, (Option(0, option_cost(z, metric), 0.0),)))
    if not layers:
        return list(decisions), BudgetOutcome(metric, fraction, 0.0, 0.0, 0.0), {}
    plan = plan_budget(layers, fraction)
    budget_total = plan.target * plan.dense_cost
    out = []
    for d in decisions:
        ls = per_layer.get(d.candidate.name)
        if ls is None:
            out.append(d)
            continue
        chosen = ls.options[plan.ranks[ls.name]]
        ls = replace(ls, chosen=chosen)
        per_layer[ls.name] = ls
        why = (f"search ({len(ls.options)} options, {metric} budget {fraction:g}): {chosen.structure.name} "
               f"{'kept dense' if chosen.structure.kind == 'dense' else 'chosen'}, data-aware error "
               f"{chosen.error:.3g}, predicted output error {math.sqrt(max(chosen.loss, 0.0)):.3g}, "
               f"{chosen.cost / budget_total:.1%} of the budget")
        if chosen.structure.kind == "dense":
            out.append(Decision(d.candidate, False, why))
        else:
            out.append(replace(d, structure=chosen.structure, sizes=chosen.sizes, reason=f"{d.reason}; {why}"))
    outcome = BudgetOutcome(metric, fraction, plan.fraction, plan.dense_cost, plan.cost)
    return out, outcome, per_layer


def _weigh(model, d: Decision, cov: torch.Tensor, families, metric: str, fraction: float, probe, reference,
           out_metric: torch.Tensor | None = None) -> LayerSearch:
    cand = d.candidate
    w = weight_of(model, cand).detach().double()
    dense_sizes = Sizes.for_dense(cand.d_in, cand.d_out)
    dense_cost = option_cost(dense_sizes, metric)
    choices = _structures(families, d.structure, cand.d_in, cand.d_out, cand.name, metric, cand.groups)
    costs = [option_cost(z, metric) for _, z in choices]
    errors = _option_errors(w, cov, choices, costs, fraction * dense_cost, cand.name, out_metric)
    sensitivity = 0.0
    if choices:
        # the probe: the measured option whose cost is nearest the budget's share of this layer
        k = min((j for j in range(len(choices)) if errors[j] is not None),
                key=lambda j: abs(costs[j] - fraction * dense_cost))
        error, approx = errors[k]
        if approx is None:
            approx = _low_rank_approx(w, cov, choices[k][1].rho, out_metric)
        delta = (approx - w).to(weight_of(model, cand).dtype)
        sensitivity = _sensitivity(model, cand.name, delta, error, probe, reference)
    options = [SearchChoice(s, z, c, e[0], sensitivity * e[0] ** 2)
               for (s, z), c, e in zip(choices, costs, errors) if e is not None]
    options.append(SearchChoice(Structure.dense(), dense_sizes, dense_cost, 0.0, 0.0))
    options.sort(key=lambda o: (o.cost, o.loss))
    return LayerSearch(cand.name, sensitivity, dense_cost, tuple(options), options[-1])


def describe(per_layer: dict[str, LayerSearch]) -> dict:
    """The search in the report's budget section: families weighed and options per layer."""
    kinds = sorted({o.structure.kind for ls in per_layer.values() for o in ls.options})
    return {"searched_layers": len(per_layer), "families": kinds,
            "options": sum(len(ls.options) for ls in per_layer.values()),
            "predicted_rel_error": math.sqrt(sum(max(ls.chosen.loss, 0.0) for ls in per_layer.values()))}

