"""The structure variants of the scaling study and the two model families that use them.

Every variant swaps the same linear layers (the hidden ones, whose cost grows with width²):

    MLP (task a):  x -> in (dense) -> [h + FFN(LN(h))] × depth -> out (dense, zero init)
                   FFN = lin(d, d) -> GELU -> lin(d, d)
    GPT (task b):  bytes -> token + position embedding -> [attention, FFN] × layers -> LN -> head (dense)
                   attention: q, k, v, o = lin(d, d); FFN = lin(d, 4d) -> GELU -> lin(4d, d)

``lin`` is an `einfx.EinsumLinear` of the variant's structure (μP spectral init; the token contraction
order is pinned, so training runs, and `cost()` counts, the structure's own contraction rather than a
fold back to a dense matrix). The standard-MoE variant keeps dense linears and replaces every FFN with an
`einfx.moe.MoEFeedForward` of E = 8 experts, top-2, each expert of hidden width (FFN hidden) / k: the
same active FLOPs per token as the dense FFN, E/k times its parameters.

``extra_flops(tokens)`` gives the matmuls outside the linear layers that the FLOP accounting
(`scaling_lib.train.forward_flops`) adds to the layers' ``cost(tokens)``: for the GPT the attention
matmuls QKᵀ and AV over the full T×T (the causal mask is applied after, so all are computed): 4·T·d per
token and layer. Embedding lookups, norms, activations, softmax and the loss are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import einfx
from einfx.moe import MoEFeedForward

__all__ = ["Variant", "VARIANTS", "variant", "make_linear", "MLP", "GPT", "MOE_EXPERTS", "MOE_K"]

MOE_EXPERTS, MOE_K = 8, 2


@dataclass(frozen=True)
class Variant:
    """One curve of the study.

    Attributes:
        name: short key used in tables and files.
        structure: the structure of the swapped linears (dense for the standard MoE).
        moe_ffn: replace every FFN by a standard MoE block.
    """

    name: str
    structure: einfx.Structure
    moe_ffn: bool = False


VARIANTS = (
    Variant("dense", einfx.Structure.dense()),
    Variant("low_rank", einfx.Structure.low_rank(rank_frac=0.25)),
    Variant("kronecker", einfx.Structure.kronecker()),
    Variant("tensor_train", einfx.Structure.tensor_train(rank=2)),
    Variant("monarch", einfx.Structure.monarch()),
    Variant("btt", einfx.Structure.btt(rank=2)),
    Variant("btt_moe", einfx.Structure.btt_moe(experts=MOE_EXPERTS, k=MOE_K)),
    Variant("moe", einfx.Structure.dense(), moe_ffn=True),
)


def variant(name: str) -> Variant:
    """The variant called ``name``; raises ValueError listing the valid names."""
    for v in VARIANTS:
        if v.name == name:
            return v
    raise ValueError(f"unknown structure variant {name!r}; valid: {', '.join(v.name for v in VARIANTS)}")


def make_linear(d_in: int, d_out: int, structure: einfx.Structure, name: str, zero_init_last: bool = False,
                bias: bool = True) -> einfx.EinsumLinear:
    """An `EinsumLinear` with the token contraction order pinned (BTT-MoE: the masked path)."""
    layer = einfx.EinsumLinear(d_in, d_out, structure, bias=bias, name=name, zero_init_last=zero_init_last)
    if structure.kind == "btt_moe":
        # Same outputs as the sparse path and several times faster on CPU at these sizes; FLOPs are still
        # counted for the k active experts (see train.forward_flops).
        layer.set_path("masked")
    elif not layer.sizes.dense:
        layer.set_order(layer.sizes.best_token_order())
    return layer


def _ffn(d: int, hidden: int, v: Variant, name: str) -> nn.Module:
    if v.moe_ffn:
        return MoEFeedForward(d, max(1, hidden // MOE_K), experts=MOE_EXPERTS, k=MOE_K, path="grouped")
    return nn.Sequential(make_linear(d, hidden, v.structure, f"{name}.up"), nn.GELU(),
                         make_linear(hidden, d, v.structure, f"{name}.down", zero_init_last=True))


class MLP(nn.Module):
    """Residual MLP student for the teacher-regression task (see the module docstring)."""

    def __init__(self, d_x: int, d_y: int, width: int, depth: int, v: Variant):
        super().__init__()
        dense = einfx.Structure.dense()
        self.width = width
        self.inp = make_linear(d_x, width, dense, "inp")
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.ffns = nn.ModuleList(_ffn(width, width, v, f"ffn{i}") for i in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = make_linear(width, d_y, dense, "out", zero_init_last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for norm, ffn in zip(self.norms, self.ffns):
            h = h + ffn(norm(h))
        return self.out(self.out_norm(h))

    def extra_flops(self, tokens: int) -> int:
        return 0


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, v: Variant, name: str):
        super().__init__()
        s = einfx.Structure.dense() if v.moe_ffn else v.structure
        self.heads = heads
        self.q, self.k, self.v = (make_linear(d, d, s, f"{name}.{p}") for p in "qkv")
        self.o = make_linear(d, d, s, f"{name}.o", zero_init_last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = (lin(x).reshape(b, t, h, d // h).transpose(1, 2) for lin in (self.q, self.k, self.v))
        # explicit matmuls (not SDPA) so that the counted attention FLOPs are exactly what runs
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


class GPT(nn.Module):
    """Small byte-level GPT (pre-LN, learned positions, causal attention); see the module docstring."""

    def __init__(self, width: int, layers: int, context: int, v: Variant, vocab: int = 256, head_dim: int = 32):
        super().__init__()
        self.width, self.context, self.vocab = width, context, vocab
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        nn.init.normal_(self.tok.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=1.0)
        heads = max(1, width // head_dim)
        self.ln1 = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.attn = nn.ModuleList(_Attention(width, heads, v, f"block{i}.attn") for i in range(layers))
        self.ffn = nn.ModuleList(_ffn(width, 4 * width, v, f"block{i}.ffn") for i in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = make_linear(width, vocab, einfx.Structure.dense(), "head", zero_init_last=True)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for ln1, attn, ln2, ffn in zip(self.ln1, self.attn, self.ln2, self.ffn):
            h = h + attn(ln1(h))
            h = h + ffn(ln2(h))
        return self.head(self.ln_f(h))

    def extra_flops(self, tokens: int) -> int:
        """Attention matmuls for ``tokens`` tokens in full sequences: QKᵀ and AV, 2·T·d each per token."""
        return len(self.attn) * 4 * tokens * self.context * self.width

