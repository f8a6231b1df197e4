import json

import torch

import einfx
from einfx import Policy, Rule, Structure
from einfx.rewriter.report import Report, Row

from _models import FormsMLP


def test_explain_table_and_json_have_one_row_per_candidate():
    torch.manual_seed(0)
    model = FormsMLP()
    rep = einfx.explain(model, Policy(default=Structure.btt(rank=2), rules=[Rule("w2", Structure.low_rank(rank=8))]),
                        (torch.randn(2, 64),))
    assert [r.name for r in rep.rows] == ["fc1", "w2", "w3", "w4", "head"]
    fc1, w2 = rep.rows[0], rep.rows[1]
    assert (fc1.kind, fc1.shape, fc1.decision, fc1.structure) == ("Linear", (128, 64), "structured", "btt(rank=2)")
    assert fc1.params_before == 64 * 128 and fc1.flops_before == 2 * 64 * 128
    sizes = Structure.btt(rank=2).resolve(64, 128)
    assert fc1.sizes == sizes.describe() and fc1.params_after == sizes.params
    assert fc1.flops_after == 2 * sizes.macs_per_token(sizes.best_token_order())
    assert 0 < fc1.projection_error < 1
    assert (w2.structure, w2.params_after) == ("low_rank(rank=8)", 8 * (64 + 128))
    assert w2.reason == "exact-name rule pattern 'w2'"
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["name", "kind", "d_in->d_out", "decision"]
    assert any(line.startswith("head ") and "tied or shared weight" in line for line in lines)
    assert "4 of 5 candidate layers structured" in text and "(traced with record+fx)" in text
    data = json.loads(rep.to_json())
    assert data["frontend"] == "record+fx" and len(data["rows"]) == 5
    assert data["rows"][0]["name"] == "fc1" and data["rows"][0]["shape"] == [128, 64]
    totals = rep.totals()
    assert data["totals"] == totals and totals["params_before"] == sum(r.params_before for r in rep.rows)


def test_optional_columns_render_when_present():
    row = Row("a", "Linear", (4, 4), 4, 4, "structured", "policy default", "btt(rank=1)", "α2 γ2 | ε2 φ2 | -",
              16, 8, 32, 16, 0.5)
    plain = Report((row,), "fx")
    assert "predicted_ms" not in plain.table()
    rich = Report((row.with_extra(predicted_ms=0.25),), "fx")
    head, _, body = rich.table().splitlines()
    assert "predicted_ms" in head and "0.25" in body
    assert json.loads(rich.to_json())["rows"][0]["predicted_ms"] == 0.25
