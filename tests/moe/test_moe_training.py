"""A tiny transformer with BTT-MoE in every linear layer (attention projections included) trains."""

import math

import torch
from torch import nn

import einfx

MOE = einfx.Structure.btt_moe(experts=4, k=2)


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (einfx.EinsumLinear(d, d, MOE) for _ in range(4))
        self.up = einfx.EinsumLinear(d, 2 * d, MOE)
        self.down = einfx.EinsumLinear(2 * d, d, MOE, zero_init_last=True)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (m(h).reshape(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.n2(x))))


class _TinyLM(nn.Module):
    def __init__(self, vocab=16, d=32, heads=2, length=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.block = _Block(d, heads)
        self.head = einfx.EinsumLinear(d, vocab, MOE)

    def forward(self, tokens):
        return self.head(self.block(self.emb(tokens) + self.pos[: tokens.shape[1]]))


def test_tiny_model_with_btt_moe_everywhere_trains():
    torch.manual_seed(0)
    model = _TinyLM()
    moe_layers = [m for m in model.modules() if isinstance(m, einfx.moe.BTTMoELinear)]
    assert len(moe_layers) == 7  # q, k, v, o, up, down, head
    data = torch.randint(0, 16, (16, 13))
    inputs, targets = data[:, :-1], data[:, 1:]
    opt = torch.optim.Adam(einfx.param_groups(model, lr=3e-3))
    gates0 = [m.gate.detach().clone() for m in moe_layers]
    losses, auxes = [], []
    for _ in range(25):
        logits = model(inputs)
        task = nn.functional.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1))
        aux = einfx.aux_loss(model, reduction="mean")
        opt.zero_grad()
        (task + 0.01 * aux).backward()
        opt.step()
        losses.append(task.item())
        auxes.append(aux.item())
    assert all(math.isfinite(v) for v in losses + auxes)
    assert min(auxes) > 0.0
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    # routing is learned: every gate moved away from zero
    for g0, m in zip(gates0, moe_layers):
        assert torch.count_nonzero(g0) == 0 and m.gate.detach().abs().sum() > 0
