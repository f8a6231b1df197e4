"""The global budget planner: choose one option (e.g. a rank) per layer so that the layers together cost at
most a fraction of their dense cost, losing as little as possible.

`plan_budget` is a pure function of numbers (no models, no tensors): each layer offers options sorted by
cost, each with a loss (for ``init="project"`` the squared Frobenius projection error; for ``init="random"``
minus ψ, then minus parameters). Greedy marginal allocation: start every layer at its cheapest option,
then repeatedly take the upgrade with the largest loss reduction per unit of added cost that still fits,
until none fits. `rank_options` lists the options of a structure family at a layer size.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Sequence

from einfx.errors import EinfxError, PolicyError
from einfx.structures.sizes import Sizes
from einfx.structures.structure import Structure

__all__ = ["Option", "LayerOptions", "BudgetPlan", "plan_budget", "rank_options", "option_cost", "RANKED_KINDS"]

RANKED_KINDS = ("low_rank", "btt", "tensor_train")
_MAX_OPTIONS = 128


@dataclass(frozen=True)
class Option:
    """One choice for a layer: a label (the rank), its cost and its loss (lower is better)."""

    rank: int
    cost: float
    loss: float


@dataclass(frozen=True)
class LayerOptions:
    """The options of one layer, sorted by increasing cost, and its dense cost."""

    name: str
    dense_cost: float
    options: tuple[Option, ...]


@dataclass(frozen=True)
class BudgetPlan:
    """The planner's answer: the chosen rank per layer, the achieved and the target fraction of dense cost."""

    ranks: dict
    cost: float
    dense_cost: float
    target: float
    loss: float

    @property
    def fraction(self) -> float:
        return self.cost / self.dense_cost if self.dense_cost else 0.0


def plan_budget(layers: Sequence[LayerOptions], fraction: float) -> BudgetPlan:
    """Pick one option per layer with total cost <= ``fraction`` × total dense cost, minimizing total loss.

    Raises:
        PolicyError: even the cheapest options exceed the budget (the message gives the smallest reachable
            fraction).
    """
    if not 0.0 < fraction <= 1.0:
        raise PolicyError(f"budget fraction must be in (0, 1], got {fraction}")
    dense = float(sum(layer.dense_cost for layer in layers))
    limit = fraction * dense
    for layer in layers:
        if not layer.options:
            raise PolicyError(f"layer {layer.name!r} offers no option to the budget planner")
    choice = [0] * len(layers)
    spent = sum(layer.options[0].cost for layer in layers)
    if spent > limit * (1 + 1e-12):
        raise PolicyError(
            f"budget of {fraction:.4g} of the dense cost is out of reach: the cheapest options already "
            f"cost {spent / dense:.4g} of dense over {len(layers)} layers; raise the budget or exclude layers"
        )
    # A heap of each layer's best upgrade (largest loss reduction per added cost). The room only shrinks,
    # so a cached upgrade that still fits is still that layer's best; one that no longer fits is recomputed.
    heap: list = []
    for i in range(len(layers)):
        _push_best(heap, layers, choice, i, limit - spent)
    while heap:
        _, _, i, j = heapq.heappop(heap)
        added = layers[i].options[j].cost - layers[i].options[choice[i]].cost
        if added > (limit - spent) * (1 + 1e-12):
            _push_best(heap, layers, choice, i, limit - spent)
            continue
        spent += added
        choice[i] = j
        _push_best(heap, layers, choice, i, limit - spent)
    chosen = {layer.name: layer.options[c].rank for layer, c in zip(layers, choice)}
    loss = sum(layer.options[c].loss for layer, c in zip(layers, choice))
    return BudgetPlan(chosen, float(spent), dense, fraction, float(loss))


def _push_best(heap: list, layers: Sequence[LayerOptions], choice: list[int], i: int, room: float) -> None:
    layer = layers[i]
    now = layer.options[choice[i]]
    best = None
    for j in range(choice[i] + 1, len(layer.options)):
        opt = layer.options[j]
        added = opt.cost - now.cost
        if added > room * (1 + 1e-12):
            break
        gain = now.loss - opt.loss
        if gain <= 0:
            continue
        key = (-(gain / added) if added > 0 else float("-inf"), added, i, j)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is not None:
        heapq.heappush(heap, best)


def option_cost(sizes: Sizes, metric: str) -> float:
    """Weights (``params``) or FLOPs per token (``flops``, best token order) of one layer, bias excluded."""
    if metric == "params":
        return float(sizes.params)
    if sizes.dense:
        return 2.0 * sizes.d_in * sizes.d_out
    return 2.0 * sizes.macs_per_token(sizes.best_token_order())


def _rank_grid(limit: int) -> list[int]:
    if limit <= _MAX_OPTIONS:
        return list(range(1, limit + 1))
    step = limit / _MAX_OPTIONS
    return sorted({1, limit, *(max(1, round(step * k)) for k in range(1, _MAX_OPTIONS + 1))})


def rank_options(structure: Structure, d_in: int, d_out: int,
                 layer: str | None = None) -> list[tuple[Structure, Sizes]]:
    """The structures the planner may choose from for one layer: the family at every useful rank (at most
    about 128 ranks, evenly spread) for low_rank, btt and tensor_train; the structure itself otherwise."""
    if structure.kind not in RANKED_KINDS:
        return [(structure, structure.resolve(d_in, d_out, layer=layer))]
    if structure.kind == "low_rank":
        limit = min(d_in, d_out)
    else:
        limit = Structure.max_rank(replace(structure, rank=1).resolve(d_in, d_out, layer=layer))
    out = []
    for r in _rank_grid(limit):
        s = replace(structure, rank=r, rank_frac=None)
        try:
            out.append((s, s.resolve(d_in, d_out, layer=layer)))
        except EinfxError:
            continue
    return out
