import math

import pytest
import torch

from einfx import EinsumLinear, Policy, Structure
from einfx.errors import PolicyError
from einfx.rewriter.budget import LayerOptions, Option, option_cost, plan_budget, rank_options
from einfx.rewriter.decide import decide
from einfx.rewriter.detect import Candidate
from einfx.rewriter.spectrum import rank_errors


def _layer(name, d, decay, ranks=range(1, 65)):
    # a layer whose squared error falls geometrically with rank; cost linear in rank
    return LayerOptions(name, float(d * d), tuple(Option(r, float(2 * d * r), d * d * decay ** r) for r in ranks))


def test_plan_meets_the_budget_within_two_percent_and_never_exceeds_it():
    layers = [_layer(f"l{i}", 256, 0.9 + 0.01 * i) for i in range(8)]
    for fraction in (0.1, 0.25, 0.4):
        plan = plan_budget(layers, fraction)
        assert plan.fraction <= fraction + 1e-12
        assert plan.fraction >= 0.98 * fraction


def test_plan_gives_more_rank_to_slowly_decaying_layers():
    plan = plan_budget([_layer("fast", 256, 0.5), _layer("slow", 256, 0.97)], 0.25)
    assert plan.ranks["slow"] > plan.ranks["fast"]
    # the loss is the sum of the chosen options' losses
    want = 256 * 256 * (0.5 ** plan.ranks["fast"] + 0.97 ** plan.ranks["slow"])
    assert plan.loss == pytest.approx(want)


def test_plan_out_of_reach_names_the_smallest_fraction():
    layers = [LayerOptions("a", 100.0, (Option(1, 30.0, 1.0), Option(2, 60.0, 0.5)))]
    with pytest.raises(PolicyError, match=r"budget of 0.2 of the dense cost is out of reach: the cheapest options "
                                          r"already cost 0.3 of dense over 1 layers"):
        plan_budget(layers, 0.2)


def test_rank_options_cover_the_family_and_costs_are_exact():
    opts = rank_options(Structure.btt(rank=3), 64, 64)
    assert [s.rank for s, _ in opts] == list(range(1, 9))  # BTT 8x8 blocks: ranks 1..min(α, ε) = 8
    s, z = opts[1]
    assert option_cost(z, "params") == z.params == 2 * 8 * 8 * 8 * 2
    assert option_cost(z, "flops") == 2 * z.macs_per_token(z.best_token_order())
    lr = rank_options(Structure.low_rank(rank_frac=0.5), 768, 768)
    assert len(lr) <= 129 and lr[0][0].rank == 1 and lr[-1][0].rank == 768
    assert [s for s, _ in rank_options(Structure.monarch(), 64, 64)] == [Structure.monarch()]


@pytest.mark.parametrize("structure", [Structure.low_rank(rank=1), Structure.btt(rank=1),
                                       Structure.tensor_train(rank=1)])
def test_rank_errors_equal_the_projection_error(structure):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    curve = rank_errors(w, structure.resolve(64, 48))
    for rank in (1, 2, 5):
        s = Structure(structure.kind, rank=rank)
        layer = EinsumLinear.from_weight(w, None, s, init="project")
        assert curve[rank].item() == pytest.approx(layer.projection_error, rel=1e-6, abs=1e-9)


def _spectral(d, decay, seed):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    return (u * decay ** torch.arange(d, dtype=torch.float32)) @ v.T


def _cands(weights):
    return [Candidate(n, "Linear", w.shape[1], w.shape[0], ("Linear",), f"{n}.weight", False, None, "module", n)
            for n, w in weights.items()]


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_decide_with_budget_reaches_target_and_prefers_hard_layers(metric):
    weights = {f"layer{i}": _spectral(128, 0.85 + 0.04 * i, i) for i in range(4)}
    policy = Policy(default=Structure.low_rank(), budget={metric: 0.3})
    decisions, outcome = decide(_cands(weights), policy, weight_of=lambda c: weights[c.name])
    assert outcome.metric == metric and outcome.target == 0.3
    assert 0.98 * 0.3 <= outcome.achieved <= 0.3
    ranks = [d.structure.rank for d in decisions]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]  # slower spectral decay gets more rank
    total = sum(option_cost(d.sizes, metric) for d in decisions)
    dense = sum(option_cost(Structure.dense().resolve(128, 128), metric) for _ in decisions)
    assert total / dense == pytest.approx(outcome.achieved)
    assert all("chosen by the " + metric + " budget planner" in d.reason for d in decisions)


def test_random_init_budget_maximizes_psi_then_params():
    weights = {"a": torch.zeros(256, 256), "b": torch.zeros(256, 256)}
    policy = Policy(default=Structure.low_rank(), init="random", budget={"params": 0.5})
    decisions, outcome = decide(_cands(weights), policy)
    ranks = [d.structure.rank for d in decisions]
    # ψ = log r / log d is concave in r: equal ranks maximize the sum at a fixed cost
    assert abs(ranks[0] - ranks[1]) <= math.ceil(256 / 128)
    assert 0.98 * 0.5 <= outcome.achieved <= 0.5
