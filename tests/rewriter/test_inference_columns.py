"""explain() shows the predicted structured and dense times and the inference choice (fold-to-dense), and
a policy can forbid folding."""

import pytest
import torch
from torch import nn

import einfx
from einfx.errors import PolicyError
from einfx.export.onnx_export import apply_deploy_passes
from einfx.passes.fold import fold_decision


def _model():
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))


def _policy(**kw):
    # layer 0: BTT rank 1 (16x fewer FLOPs, wins); layer 2: BTT rank 32 (as many FLOPs as dense, loses)
    return einfx.Policy(default=einfx.Structure.btt(rank=1),
                        rules=[einfx.Rule("2", einfx.Structure.btt(rank=32))], **kw)


def test_explain_rows_carry_predicted_times_and_choice():
    rep = einfx.explain(_model(), _policy(), example_inputs=(torch.randn(2, 1024),))
    rows = {r.name: r for r in rep.rows}
    win, lose = rows["0"].extra, rows["2"].extra
    assert win["inference"] == "structured" and win["plan ms"] < win["dense ms"]
    assert lose["inference"] == "fold to dense" and lose["plan ms"] > lose["dense ms"]
    table = str(rep)
    assert "fold to dense" in table and "plan ms" in table
    assert '"inference": "fold to dense"' in rep.to_json()


def test_policy_can_forbid_folding():
    x = torch.randn(2, 1024)
    gm = einfx.optimize(_model(), _policy(fold_to_dense=False), example_inputs=(x,))
    lose = {r.name: r for r in gm.einfx_report.rows}["2"].extra
    assert lose["inference"] == "structured"
    deployed, _ = apply_deploy_passes(gm)
    assert not any(isinstance(m, nn.Linear) for m in deployed.modules())
    folded, _ = apply_deploy_passes(einfx.optimize(_model(), _policy(), example_inputs=(x,)))
    linears = [m for m in folded.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (1024, 1024)
    layer = einfx.optimize(_model(), _policy(), example_inputs=(x,)).get_submodule("2")
    assert fold_decision(layer, 512).fold


def test_fold_flag_must_be_boolean():
    with pytest.raises(PolicyError, match="fold_to_dense must be true or false, got 'yes'"):
        einfx.Policy.from_dict({"default": "btt", "fold_to_dense": "yes"})
