"""einfx.fidelity on constructed outputs, and optimize/explain with data= (fitted layers, fidelity in the report)."""

import math

import pytest
import torch
from torch import nn

import einfx
from einfx import EinsumLinear, Policy, Structure
from einfx.errors import PolicyError
from einfx.rewriter.report import NOT_MEASURED

from _models import TinyTransformer, bert, ids


class Fixed(nn.Module):
    """Returns a fixed ModelOutput-like dict: {'logits': ...} (the batch only picks rows)."""

    def __init__(self, values: torch.Tensor, key: str = "logits"):
        super().__init__()
        self.register_buffer("values", values)
        self.key = key

    def forward(self, index, attention_mask=None):
        return {self.key: self.values[index]}


def test_exact_values_on_constructed_outputs():
    y = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]]])     # (examples, positions, classes)
    z = torch.tensor([[[1.0, 1.0], [0.0, 2.0]], [[3.0, 4.0], [2.0, 1.0]]])
    data = [{"index": torch.tensor([0, 1])}]
    f = einfx.fidelity(Fixed(y), Fixed(z), data)
    assert f.examples == 2 and f.output == "logits"
    assert f.rel_error == pytest.approx(math.sqrt(2 / float((y ** 2).sum())))
    c0 = 5 / (math.sqrt(5) * math.sqrt(6))           # (1,0,0,2)·(1,1,0,2)
    c1 = 28 / (math.sqrt(27) * math.sqrt(30))        # (3,4,1,1)·(3,4,2,1)
    assert f.cosine == pytest.approx((c0 + c1) / 2)
    # argmax per position (ties: the first): y -> [0, 1], [1, 0]; z -> [0, 1], [1, 0]
    assert f.top1_agreement == pytest.approx(4 / 4)
    masked = einfx.fidelity(Fixed(y), Fixed(z), [{"index": torch.tensor([0, 1]),
                                                  "attention_mask": torch.tensor([[1, 1], [1, 0]])}])
    assert masked.rel_error == pytest.approx(math.sqrt(1 / (5 + 25)))  # only the unmasked positions count
    assert masked.cosine == pytest.approx((c0 + 1.0) / 2)
    hidden = einfx.fidelity(Fixed(y, "last_hidden_state"), Fixed(z, "last_hidden_state"), data)
    assert hidden.top1_agreement is None and hidden.output == "last_hidden_state"


def test_bad_data_and_mismatched_outputs():
    y = torch.zeros(3, 2)
    with pytest.raises(PolicyError, match="needs at least one data batch"):
        einfx.fidelity(Fixed(y), Fixed(y), [])
    with pytest.raises(PolicyError, match=r"the candidate returns shape \(2, 3\), the reference \(2, 2\)"):
        einfx.fidelity(Fixed(y), Fixed(torch.zeros(3, 3)), [(torch.tensor([0, 1]),)])
    with pytest.raises(PolicyError, match="a data batch is a dict of keyword inputs, a tuple"):
        einfx.fidelity(Fixed(y), Fixed(y), ["not a batch"])


def _data(batches=3):
    out = []
    for s in range(batches):
        x = ids(batch=4, length=10, seed=s)
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        out.append({"input_ids": x, "attention_mask": mask})
    return out


def test_optimize_with_data_fits_layers_and_reports_fidelity():
    torch.manual_seed(0)
    model, data = bert(), _data()
    policy = Policy(default=Structure.btt(rank=1))
    plain = einfx.optimize(model, policy, example_kwargs=data[0])
    fitted = einfx.optimize(model, policy, data=data)
    assert type(fitted) is type(model)
    rep = fitted.einfx_report
    assert rep.fidelity is not None and rep.fidelity["examples"] == 12
    assert all("fitted to" in r.reason and "calibration inputs" in r.reason for r in rep.structured)
    assert rep.to_dict()["fidelity"]["cosine"] == rep.fidelity["cosine"]
    assert "fidelity to the original on 12 calibration examples (last_hidden_state)" in rep.summary()
    before, after = einfx.fidelity(model, plain, data), einfx.fidelity(model, fitted, data)
    assert after.rel_error < before.rel_error
    assert set(after.per_layer) == {r.name for r in rep.structured}
    # without data every report says that fidelity was not measured
    assert plain.einfx_report.fidelity is None and NOT_MEASURED in plain.einfx_report.summary()
    assert plain.einfx_report.to_dict()["fidelity"] == NOT_MEASURED


def test_siblings_share_one_pass_and_the_first_batch_is_the_example():
    torch.manual_seed(0)
    model = TinyTransformer()
    data = [(ids(vocab=50, seed=s),) for s in range(2)]
    out = einfx.optimize(model, Policy(default=Structure.low_rank(rank=8)), data=data)
    reasons = {r.name: r.reason for r in out.einfx_report.rows}
    sums = {"blocks.0.attn.o": "blocks.0.ln2", "blocks.0.mlp.down": "blocks.1.ln1",
            "blocks.1.attn.o": "blocks.1.ln2", "blocks.1.mlp.down": "out"}
    for name, reason in reasons.items():
        if name in sums:
            assert (f"fitted to the original's sum at {sums[name]} as the model's output sees it on 32 "
                    "calibration inputs (output-whitened, bias re-centred, residual sum)") in reason, (name, reason)
        else:
            assert ("fitted to the original's outputs as the model's output sees them on 32 calibration inputs "
                    "(output-whitened, bias re-centred)") in reason, (name, reason)
    layer = einfx.optimize(model, Policy(default=Structure.low_rank(rank=8), fit_objective="layer"), data=data)
    reasons = {r.name: r.reason for r in layer.einfx_report.rows}
    assert all("fitted to the original's outputs on 32 calibration inputs (whitened, bias re-centred)" in reasons[n]
               for n in reasons)
    assert sum(isinstance(m, EinsumLinear) for m in out.modules()) == 13
    with pytest.raises(PolicyError, match="data= holds no batches"):
        einfx.optimize(model, Policy(default=Structure.low_rank(rank=8)), data=[])
