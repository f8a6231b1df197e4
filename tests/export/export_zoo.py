"""Small zoo models for the export tests, and a way to structure them.

``structured(model, structure, example_inputs)`` returns the model with BTT (or another structure) on
every projection, through ``einfx.optimize``; `replace_projections` (in place, no graph) is kept for the tests
(in place: nn.Linear and GPT-2 Conv1D -> EinsumLinear, nn.MultiheadAttention -> `StructuredSelfAttention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import einfx
from einfx.errors import ShapeError

__all__ = ["structured", "replace_projections", "StructuredSelfAttention", "tiny_gpt2", "vit_b_16"]


class StructuredSelfAttention(nn.Module):
    """Self-attention with its q, k, v and output projections as separate `EinsumLinear` layers.

    Stands in for ``nn.MultiheadAttention`` (batch_first, self-attention only) whose fused input
    projection is not an nn.Linear.
    """

    def __init__(self, mha: nn.MultiheadAttention, structure):
        super().__init__()
        d, h = mha.embed_dim, mha.num_heads
        self.heads = h
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        bias = [None] * 3 if b is None else list(b.detach().chunk(3))
        self.q, self.k, self.v = (
            einfx.EinsumLinear.from_weight(wi, bi, structure, init="random") for wi, bi in zip(w.chunk(3), bias)
        )
        self.out = einfx.EinsumLinear.from_linear(mha.out_proj, structure, init="random")

    def forward(self, query, key, value, need_weights=False, **kwargs):
        n, t, d = query.shape
        q, k, v = (p(query).reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        return self.out(y), None


def _swap(parent: nn.Module, name: str, child: nn.Module, structure) -> None:
    try:
        if isinstance(child, nn.MultiheadAttention):
            setattr(parent, name, StructuredSelfAttention(child, structure))
        elif isinstance(child, nn.Linear):
            setattr(parent, name, einfx.EinsumLinear.from_linear(child, structure, init="random", name=name))
        elif type(child).__name__ == "Conv1D":  # transformers GPT-2: weight is (d_in, d_out)
            layer = einfx.EinsumLinear.from_weight(child.weight.detach().t(), child.bias, structure, init="random")
            setattr(parent, name, layer)
    except ShapeError:
        pass  # a size the structure cannot take stays dense, as a policy would leave it


def replace_projections(model: nn.Module, structure, exclude=("lm_head", "head")) -> nn.Module:
    """Replace every projection of ``model`` in place (names in ``exclude`` stay dense); return it."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in exclude:
                _swap(parent, name, child, structure)
    return model


def structured(model: nn.Module, structure, example_inputs) -> nn.Module:
    """``einfx.optimize`` with ``structure`` as the default for every projection (heads stay dense)."""
    policy = einfx.Policy(default=structure, exclude=["lm_head", "heads.head"], min_features=16, init="project")
    return einfx.optimize(model, policy, example_inputs=example_inputs)


def tiny_gpt2(n_layer: int = 2, n_embd: int = 128, n_head: int = 4, vocab: int = 512, positions: int = 128):
    """A GPT-2 LM with random weights (transformers config, no download), eval mode, no KV cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=positions,
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def vit_b_16(image_size: int = 224):
    """torchvision's vit_b_16 with random weights (classifier included), eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=image_size).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits it: the output would be all 0
    return model
