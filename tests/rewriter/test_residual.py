"""Residual sums (einfx.rewriter.residual) and fitting a layer to the original model's sum (einfx.rewriter.fit)."""

import torch
from torch import nn

import einfx
from einfx import Policy, Structure
from einfx.rewriter.fit import DAMPENING
from einfx.rewriter.residual import sum_points


class Block(nn.Module):
    """Post-norm residual block: LayerNorm(x + dropout(out(relu(fc(x))))), and a scaled residual beside it."""

    def __init__(self, d=8, scale=1.0):
        super().__init__()
        self.fc, self.out, self.drop, self.norm = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Dropout(0.1), nn.LayerNorm(d)
        self.scale = scale

    def forward(self, x):
        return self.norm(x + self.scale * self.drop(self.out(torch.relu(self.fc(x)))))


def test_the_sum_a_layer_writes_into_is_found_and_copies_nonlinear_paths_and_scaled_sums_are_not():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(scale=0.5)).eval()
    x = torch.randn(4, 5, 8)
    points = sum_points(model, ["0.fc", "0.out", "1.fc", "1.out"], (x,))
    # 0.out's output is copied by the dropout (skipped) and added to x in front of 0.norm; fc goes through relu;
    # 1.out enters its sum scaled by 0.5, so the sum moves by δ/2, not δ
    assert points == {"0.out": "0.norm"}


def test_a_module_called_twice_is_never_a_sum_point():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x):
            h = self.norm(x + self.a(x))
            return self.norm(h + self.b(h))

    torch.manual_seed(0)
    assert sum_points(Shared().eval(), ["a", "b"], (torch.randn(3, 8),)) == {}


def _two_layers(d=8):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.out, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)

        def forward(self, x):
            u = self.up(x)
            return self.norm(u + self.out(u))
    return Net().double().eval()


def test_a_layer_writing_into_a_residual_sum_is_fitted_to_the_original_sum():
    torch.manual_seed(0)
    d = 8
    model = _two_layers(d)
    data = [(torch.randn(64, d, dtype=torch.float64) @ torch.diag(torch.linspace(2, 0.2, d).double()),) for _ in range(4)]
    policy = Policy(rules=[{"pattern": "up", "structure": Structure.low_rank(rank=2)},
                           {"pattern": "out", "structure": Structure.low_rank(rank=d)}])
    ours = einfx.optimize(model, policy, data=data)
    # the closed form: W' = W + E (C̃ + λI)⁻¹ on centred statistics, D = s − s̃ with s̃ from the fitted `up`
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        u, u_ = model.up(x), ours.up(x)
        gap = (u + model.out(u)) - (u_ + model.out(u_))
    mu, g = u_.mean(0), gap.mean(0)
    cov = u_.T @ u_ / len(x)
    ridge = DAMPENING * float(torch.diagonal(cov).mean())
    cov = cov - torch.outer(mu, mu) + ridge * torch.eye(d, dtype=torch.float64)
    e = gap.T @ u_ / len(x) - torch.outer(g, mu)
    w = model.out.weight.detach()
    want = w + torch.linalg.solve(cov, e.T).T
    fitted = ours.out.to_dense().double()
    torch.testing.assert_close(fitted, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.out.bias.detach().double(), model.out.bias.detach() + w @ mu + g - fitted @ mu,
                               rtol=1e-4, atol=1e-5)
    assert "residual sum" in ours.out.einfx_fit


def test_a_writer_cancels_the_error_the_residual_carries_past_it_where_its_inputs_predict_it():
    class Net(nn.Module):  # the residual a(x) is structured with an error (A − Â)x that out's input x predicts
        def __init__(self, d=8):
            super().__init__()
            self.a, self.out, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)

        def forward(self, x):
            return self.norm(self.a(x) + self.out(x.clone()))

    torch.manual_seed(0)
    model = Net().double().eval()
    data = [(torch.randn(64, 8, dtype=torch.float64),) for _ in range(4)]
    rules = [{"pattern": "a", "structure": Structure.low_rank(rank=2)},
             {"pattern": "out", "structure": Structure.low_rank(rank=8)}]
    ours = einfx.optimize(model, Policy(rules=rules), data=data)
    plain = einfx.optimize(model, Policy(rules=rules, fit_objective="layer"), data=data)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        s = model.a(x) + model.out(x)
        err = float((ours.a(x) + ours.out(x) - s).norm() / s.norm())
        err_plain = float((plain.a(x) + plain.out(x) - s).norm() / s.norm())
    assert "residual sum" in ours.out.einfx_fit and "residual sum" not in plain.out.einfx_fit
    assert err_plain > 0.1 and err < 0.02 * err_plain  # only the ridge keeps it from zero
