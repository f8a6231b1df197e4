"""Output metrics (einfx.rewriter.sensitivity): E[JᵀJ] of each layer's output, padding left out, the model
left as it was; the output-aware fit beats the layer's own objective where the model ignores directions."""

import pytest
import torch
from torch import nn

import einfx
from einfx import Policy, Structure
from einfx.errors import PolicyError
from einfx.rewriter.sensitivity import output_metrics


class Two(nn.Module):
    def __init__(self, d: int = 12, h: int = 16, o: int = 6, act: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.side = nn.Linear(d, h), nn.Linear(h, o), nn.Linear(d, 3)
        self.act = act

    def forward(self, x, attention_mask=None):
        y = self.fc1(x)
        y = self.fc2(torch.nn.functional.gelu(y) if self.act else y)
        return {"last": y, "other": self.side(x)}  # "side" does not reach the main output


def _normalized(m: torch.Tensor) -> torch.Tensor:
    return m / torch.diagonal(m).sum()


def test_metric_of_a_linear_chain_is_the_next_layers_gram():
    torch.manual_seed(0)
    model = Two()
    data = [{"x": torch.randn(8, 500, 12)}]
    g = output_metrics(model, ["fc1", "fc2", "side"], data, samples=2)
    assert set(g) == {"fc1", "fc2"}  # side's output never reaches the main output
    w2 = model.fc2.weight.detach().double()
    expect = _normalized(w2.T @ w2)
    assert float((_normalized(g["fc1"]) - expect).norm() / expect.norm()) < 0.05
    eye = _normalized(torch.eye(6, dtype=torch.float64))
    assert float((_normalized(g["fc2"]) - eye).norm() / eye.norm()) < 0.05


def test_padding_does_not_enter_and_the_model_is_left_as_it_was():
    torch.manual_seed(1)
    model = Two(act=True).train()
    model.fc2.weight.requires_grad_(False)
    x = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    first = output_metrics(model, ["fc1"], [{"x": x, "attention_mask": mask}], seed=3)["fc1"]
    y = x.clone()
    y[mask == 0] = 100 * torch.randn(int((mask == 0).sum()), 12)  # what padding holds changes nothing
    second = output_metrics(model, ["fc1"], [{"x": y, "attention_mask": mask}], seed=3)["fc1"]
    assert torch.equal(first, second)
    assert model.training and not model.fc2.weight.requires_grad and model.fc1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_output_objective_fits_what_the_next_layer_reads():
    torch.manual_seed(2)
    model = Two(d=24, h=24, o=4).eval()
    with torch.no_grad():  # fc2 reads 4 directions of fc1's 24 outputs, the weakest ones
        u = torch.linalg.qr(torch.randn(24, 24))[0]
        model.fc1.weight.copy_(u @ torch.diag(torch.logspace(0, -1, 24)) @ torch.linalg.qr(torch.randn(24, 24))[0])
        model.fc2.weight.copy_(torch.randn(4, 4) @ u[:, -4:].T)
    data = [{"x": torch.randn(256, 24)} for _ in range(3)]
    test = torch.randn(512, 24)
    errors = {}
    for objective in ("output", "layer"):
        policy = Policy(default=Structure.low_rank(rank=4), exclude=["fc2", "side"], fit_objective=objective)
        out = einfx.optimize(model, policy, data=data)
        with torch.no_grad():
            ref, got = model(test)["last"], out(test)["last"]
        errors[objective] = float((got - ref).norm() / ref.norm())
    assert errors["output"] < 0.1 * errors["layer"], errors
    assert errors["layer"] > 0.5, errors


def test_unknown_fit_objective_is_refused():
    with pytest.raises(PolicyError, match="fit_objective 'model' is unknown; valid: output, layer"):
        Policy(default=Structure.low_rank(), fit_objective="model")
    assert Policy.from_dict({"fit_objective": "layer"}).to_dict()["fit_objective"] == "layer"
