"""A policy puts BTT-MoE on every linear layer, the fused attention input projection included."""

import torch
from torch import nn

import einfx


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        return h + self.fc2(torch.relu(self.fc1(h)))


def test_policy_structures_every_linear_layer_with_btt_moe_and_it_trains():
    torch.manual_seed(0)
    model = _Block().train()
    x = torch.randn(4, 6, 64)
    policy = einfx.Policy(default=einfx.Structure.btt_moe(experts=4, k=2), min_features=16, init="project")
    gm = einfx.optimize(model, policy, example_inputs=(x,))
    moe = {n: m for n, m in gm.named_modules() if isinstance(m, einfx.moe.BTTMoELinear)}
    assert set(moe) == {"attn.in_proj", "attn.out_proj", "fc1", "fc2"}
    for layer in moe.values():
        assert torch.count_nonzero(layer.gate) == 0 and 0.0 < layer.projection_error < 1.0
    target = torch.randn(4, 6, 64)
    opt = torch.optim.Adam(einfx.param_groups(gm, lr=3e-3))
    losses = []
    for _ in range(15):
        loss = nn.functional.mse_loss(gm(x), target)
        aux = einfx.aux_loss(gm, reduction="mean")
        assert aux.item() > 0.0
        opt.zero_grad()
        (loss + 0.01 * aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
