"""Policy feedback and bad input: unmatched patterns, the structure key, functional-only models."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import einfx
from einfx import Policy, Rule, Structure
from einfx.errors import PolicyError, SavedModelError, TraceError, UnmatchedPatternWarning
from einfx.rewriter.captured import CapturedGraphModule

from _models import gpt2, ids


def test_unmatched_rule_and_exclude_are_reported_with_the_closest_names():
    policy = Policy(default=Structure.btt(rank=2), rules=[Rule("transformer.h.*.attn.c_atn", "low_rank:rank=4"),
                                                         Rule(module_type="NoSuchType", structure="dense")],
                    exclude=["lm_haed"])
    with pytest.warns(UnmatchedPatternWarning) as caught:
        out = einfx.optimize(gpt2(), policy, (ids(),))
    text = str(caught[0].message)
    assert "policy rule 'transformer.h.*.attn.c_atn' matches no layer of the model; closest layer names: " \
           "'transformer.h.1.attn.c_attn'" in text
    assert "policy exclude 'lm_haed' matches no layer of the model; closest layer names: 'lm_head'" in text
    assert "NoSuchType" not in text  # a type rule shared across model families is not a typo
    unmatched = out.einfx_report.unmatched
    assert set(unmatched) == {"rule 'transformer.h.*.attn.c_atn'", "exclude 'lm_haed'"}
    assert unmatched["exclude 'lm_haed'"][0] == "lm_head"
    assert "policy exclude 'lm_haed' matches no layer (closest: lm_head" in str(out.einfx_report)
    assert out.einfx_report.to_dict()["unmatched"]["exclude 'lm_haed'"][0] == "lm_head"


def test_matched_patterns_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedPatternWarning)
        einfx.explain(gpt2(), Policy(default="btt", exclude=["lm_head"], rules=[Rule("*.c_fc", "dense")]), (ids(),))


def test_structure_key_is_a_synonym_of_kind(tmp_path):
    assert Policy.from_dict({"default": {"structure": "btt", "rank": 1}}).default == Structure.btt(rank=1)
    (tmp_path / "p.yaml").write_text("default: {structure: btt, rank: 1}\n")
    assert Policy.from_file(tmp_path / "p.yaml").default == Structure.btt(rank=1)
    with pytest.raises(PolicyError, match=r"policy default: structure \{'rank': 1\} names no kind: a mapping needs "
                                          r"the key 'kind' \(or 'structure'\)"):
        Policy.from_dict({"default": {"rank": 1}})
    with pytest.raises(PolicyError, match="give 'kind' or its synonym 'structure', not both"):
        Policy.from_dict({"default": {"kind": "btt", "structure": "low_rank"}})


class OnlyFunctional(nn.Module):
    """Its only linear computations read raw parameters in forward code: F.linear and x @ W."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(128, 64) / 8)
        self.w2 = nn.Parameter(torch.randn(128, 64) / 8)

    def forward(self, x):
        return F.gelu(F.linear(x, self.w1)) @ self.w2


class UntraceableFunctional(OnlyFunctional):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither torch.fx nor torch.export captures it
            return F.linear(x, self.w1)
        return -F.linear(x, self.w1)


def test_a_model_whose_only_linears_are_functional_becomes_a_graph_module(tmp_path):
    torch.manual_seed(0)
    model, x = OnlyFunctional(), torch.randn(3, 64)
    out = einfx.optimize(model, Policy(default=Structure.dense()), (x,), verify=True)
    assert isinstance(out, CapturedGraphModule) and isinstance(out, fx.GraphModule)
    assert [r.name for r in out.einfx_report.structured] == ["w1", "w2"] and out.einfx_report.verify_error < 1e-6
    assert out.eval() is out and not out.training and out.train().training
    with pytest.raises(SavedModelError, match="is a graph module .* functional linear sites"):
        einfx.save(out, tmp_path / "saved")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder


def test_functional_linears_no_graph_can_show_are_kept_with_the_reason():
    model, x = UntraceableFunctional(), torch.randn(3, 64)
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), (x,))
    assert type(out) is UntraceableFunctional and not out.einfx_report.structured
    (row,) = out.einfx_report.rows
    assert row.name == "w1" and row.decision == "kept"
    assert row.reason.startswith("functional use (the weight is read by forward code, not called as a module) "
                                 "that no graph front end can rewrite (fx: TraceError: symbolically traced")
    assert "export: " in row.reason


class ShapeBranch(nn.Module):
    """fx cannot trace the shape test; torch.export can: a graph module from export."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64) / 8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(64, 64)

    def forward(self, x, scale: float = 1.0):
        if x.shape[-1] > 0:
            x = F.linear(self.drop(x), self.w)
        return self.fc(x) * scale


def test_an_exported_graph_trains_evaluates_and_keeps_the_signature():
    import copy

    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(4, 64)
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=8)), (x,), verify=True)
    assert out.einfx_report.frontend == "record+export" and out.einfx_report.verify_error < 1e-5
    for m in (out, copy.deepcopy(out)):
        m.train()
        assert m.training and not torch.equal(m(x), m(x))  # dropout is live
        m.eval()
        assert torch.equal(m(x), m(x)) and torch.allclose(m(x), model(x), atol=1e-5)
        assert torch.allclose(m(x=x[:3]), model(x[:3]), atol=1e-5)  # by keyword, another batch size
    with pytest.raises(TraceError, match=r"ShapeBranch: argument 'scale' was not part of the example inputs the "
                                         r"graph was captured with \(x\)"):
        out(x, scale=2.0)
    with pytest.raises(TraceError, match="ShapeBranch: missing a required argument: 'x'"):
        out()
