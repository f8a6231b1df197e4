"""Search over θ under a budget with data (einfx.rewriter.search): budget met, dense cost never exceeded, the
choice follows the measured error and the layer's effect on the output, explain shows it all."""

import pytest
import torch
from torch import nn

import einfx
from einfx import Policy, Structure
from einfx.errors import PolicyError
from einfx.rewriter.search import _low_rank_errors, candidate_structures, probe_batches
from einfx.structures.calibrated import calibration_error


class Stack(nn.Module):
    """x -> a -> gelu -> b -> gelu -> c, plus a branch ``unused`` whose output the model multiplies by 0."""

    def __init__(self, d: int = 64, h: int = 128):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, d)
        self.unused = nn.Linear(d, d)

    def forward(self, x):
        y = self.c(torch.nn.functional.gelu(self.b(torch.nn.functional.gelu(self.a(x)))))
        return y + 0.0 * self.unused(x)


def _data(d: int = 64, batches: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # correlated inputs
    return [(torch.randn(32, d, generator=g) @ mix,) for _ in range(batches)]


def _model(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().eval()


def _flops(report):
    t = report.totals()
    return t["flops_after"] / t["flops_before"]


@pytest.mark.parametrize("metric, fraction", [("flops", 0.5), ("flops", 0.3), ("params", 0.4)])
def test_budget_met_within_two_percent_and_never_above_dense(metric, fraction):
    model, data = _model(), _data()
    out = einfx.optimize(model, Policy(default=Structure.low_rank(), budget={metric: fraction}), data=data)
    report = out.einfx_report
    budget = report.budget
    assert budget["metric"] == metric and budget["search"]["searched_layers"] == 4
    assert fraction * 0.98 <= budget["achieved"] <= fraction * (1 + 1e-9)
    t = report.totals()
    key = "flops" if metric == "flops" else "params"
    assert t[f"{key}_after"] / t[f"{key}_before"] == pytest.approx(budget["achieved"], rel=1e-6)
    for row in report.rows:
        assert row.flops_after <= row.flops_before and row.params_after <= row.params_before
        if row.structured:
            assert row.flops_after < row.flops_before  # a structured choice is strictly cheaper than dense
        assert "budget share" in row.extra and "search err" in row.extra
    shares = sum(r.extra["budget share"] for r in report.rows)
    assert shares == pytest.approx(budget["achieved"] / fraction, abs=1e-3)


def test_a_layer_that_does_not_reach_the_output_gets_the_cheapest_option():
    model, data = _model(), _data()
    report = einfx.explain(model, Policy(default=Structure.low_rank(), budget=0.5), data=data)
    rows = {r.name: r for r in report.rows}
    cheapest = min(r.flops_after for r in report.rows if r.structured)
    assert rows["unused"].structured and rows["unused"].flops_after == cheapest
    assert "predicted output error 0" in rows["unused"].reason


def test_planted_low_rank_layer_is_found_and_fitted_exactly():
    model, data = _model(), _data()
    with torch.no_grad():  # b is exactly rank 3: low_rank(rank=3) reproduces it at a fraction of its cost
        u, v = torch.randn(128, 3), torch.randn(3, 128)
        model.b.weight.copy_(u @ v / 10)
    # a stays dense, so b sees the original inputs and its fit has nothing upstream to correct
    out = einfx.optimize(model, Policy(default=Structure.btt(), budget=0.4, exclude=["a"]), data=data)
    row = {r.name: r for r in out.einfx_report.rows}["b"]
    assert row.structured and row.structure.startswith("low_rank") and row.extra["search err"] < 1e-6
    x = data[0][0]
    h = torch.nn.functional.gelu(model.a(x))
    # b's own output from the same input: the structured b equals the planted one
    assert torch.allclose(out.b(h), model.b(h), atol=1e-4, rtol=1e-4)


def test_candidates_narrow_the_search_and_default_is_a_starting_point():
    model, data = _model(), _data()
    report = einfx.explain(model, Policy(default=Structure.tensor_train(rank=2), candidates=["btt"], budget=0.5),
                           data=data)
    kinds = {r.structure.split("(")[0] for r in report.structured}
    assert kinds <= {"btt", "tensor_train"} and "btt" in kinds
    assert set(report.budget["search"]["families"]) <= {"btt", "tensor_train", "dense"}


def test_search_beats_the_weight_space_rank_planner():
    model, data = _model(), _data()
    policy = Policy(default=Structure.low_rank(), budget=0.4)
    searched = einfx.optimize(model, policy, data=data)
    plain = einfx.optimize(model, policy, example_inputs=data[0])  # no data: ranks from weight-space errors
    assert "search" not in plain.einfx_report.budget
    assert plain.einfx_report.budget["achieved"] == pytest.approx(0.4, rel=0.02)
    assert einfx.fidelity(model, searched, data).rel_error < einfx.fidelity(model, plain, data).rel_error


def test_low_rank_errors_are_exact_for_every_rank():
    torch.manual_seed(1)
    w = torch.randn(12, 10, dtype=torch.float64)
    x = torch.randn(200, 10, dtype=torch.float64) @ torch.randn(10, 10, dtype=torch.float64)
    c = x.T @ x / 200
    errors = _low_rank_errors(w, c)
    assert errors[0] == pytest.approx(1.0) and errors[10] == pytest.approx(0.0, abs=1e-12)
    from einfx.rewriter.search import _low_rank_approx

    for r in (1, 4, 7):
        assert calibration_error(w, _low_rank_approx(w, c, r), c) == pytest.approx(float(errors[r]), rel=1e-9)
    m = torch.randn(12, 12, dtype=torch.float64)
    g = m @ m.T / 12  # an output metric: the errors and the approximations are those under G
    errors = _low_rank_errors(w, c, g)
    assert errors[0] == pytest.approx(1.0) and errors[10] == pytest.approx(0.0, abs=1e-6)
    for r in (1, 4, 7):
        approx = _low_rank_approx(w, c, r, g)
        assert calibration_error(w, approx, c, g) == pytest.approx(float(errors[r]), rel=1e-5)
        assert calibration_error(w, approx, c, g) < calibration_error(w, _low_rank_approx(w, c, r), c, g)


def test_structure_above_dense_cost_is_reported_when_asked_for():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    report = einfx.explain(model, Policy(default=Structure.btt(rank=4)), (torch.randn(2, 16),))
    row = report.rows[0]
    assert row.structured and row.flops_after > row.flops_before
    assert "the dense layer's FLOPs per token: this structure is more expensive than the layer it replaces" in row.reason


def test_candidates_in_policies():
    p = Policy.from_dict({"default": "btt", "budget": 0.5, "candidates": ["low_rank", "btt:rank=2",
                                                                          {"kind": "tensor_train"}]})
    fams = candidate_structures(p.candidates)
    assert [(f.structure.name, f.sweep) for f in fams] == [
        ("low_rank(rank_frac=0.25)", True), ("btt(rank=2)", False), ("tensor_train(rank=2)", True)]
    assert Policy.from_dict(p.to_dict()).candidates == p.candidates
    with pytest.raises(PolicyError, match="candidate #0 'dense': dense is always a search candidate"):
        Policy(candidates=["dense"])
    with pytest.raises(PolicyError, match="unknown structure 'lowrank'"):
        Policy(candidates=["lowrank"])


def test_unreachable_budget_names_the_smallest_fraction():
    model, data = _model(), _data()
    with pytest.raises(PolicyError, match="out of reach: the cheapest options already cost"):
        einfx.optimize(model, Policy(default=Structure.low_rank(), candidates=["low_rank"], budget=0.001), data=data)


class Functional(nn.Module):
    """One nn.Linear and one weight applied with F.linear in forward code (a functional site)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(self.a(x)), self.w)


def test_functional_sites_keep_the_rank_planner_and_say_so():
    torch.manual_seed(0)
    model, data = Functional().eval(), _data()
    report = einfx.explain(model, Policy(default=Structure.low_rank(), budget=0.5), data=data)
    assert report.budget["search"].startswith("not run: 1 functional site(s)")
    assert report.budget["achieved"] <= 0.5 and len(report.structured) == 2
    assert "search over θ: not run" in report.summary()


def test_probe_batches_spread_over_the_data():
    # length-bucketed data is sorted by length: the sensitivity probe takes every length, not the shortest
    assert probe_batches(list(range(10))) == [0, 3, 6, 9]
    assert probe_batches(list(range(10)), count=1) == [0]
    assert probe_batches(list(range(3))) == [0, 1, 2]
    assert probe_batches(list(range(4))) == [0, 1, 2, 3]
