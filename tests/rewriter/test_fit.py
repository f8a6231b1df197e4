"""Sequential fitting (einfx.rewriter.fit): a layer with a bias is the affine least-squares optimum, fitted on
the centred inputs, its bias absorbing the mean error."""

import pytest
import torch
from torch import nn

import einfx
from einfx import Policy, Structure
from einfx.rewriter.fit import DAMPENING
from einfx.structures.calibrated import low_rank_on_data


@pytest.mark.parametrize("bias", [True, False])
def test_a_biased_layer_is_fitted_on_centred_inputs_and_its_bias_absorbs_the_mean(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, bias=bias)).double()
    layer = model[0]
    mean = 5 * torch.randn(16, dtype=torch.float64)  # inputs far from zero, as after GELU or LayerNorm
    data = [(mean + torch.randn(64, 16, dtype=torch.float64) @ torch.diag(torch.linspace(2, 0.1, 16)
                                                                          .double()),) for _ in range(4)]
    out = einfx.optimize(model, Policy(default=Structure.low_rank(rank=3), fit_objective="layer"), data=data)[0]
    fitted = out.to_dense().double()
    x = torch.cat([b[0] for b in data])
    second = x.T @ x / len(x)
    ridge = DAMPENING * float(torch.diagonal(second).mean())
    mu = x.mean(0)
    moment = second - torch.outer(mu, mu) if bias else second
    w = layer.weight.detach()
    left, right = low_rank_on_data(w, moment + ridge * torch.eye(16, dtype=torch.float64), 3)
    torch.testing.assert_close(fitted, left @ right, rtol=1e-4, atol=1e-5)  # project_on_data adds a 1e-6 ridge
    if bias:
        torch.testing.assert_close(out.bias.detach().double(), layer.bias.detach() + (w - fitted) @ mu, rtol=1e-4,
                                   atol=1e-5)
        with torch.no_grad():  # the affine optimum reproduces the mean output on the calibration data exactly
            torch.testing.assert_close(out(x).mean(0), layer(x).mean(0), rtol=1e-6, atol=1e-6)
