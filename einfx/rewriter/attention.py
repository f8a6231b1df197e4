"""`FusedSelfAttention`: nn.MultiheadAttention self-attention written with traceable ops and named
projection submodules, so that its fused input projection (``in_proj_weight``, (3d, d)) and its
``out_proj`` become ordinary ``call_module`` layers that einfx can structure.

    MultiheadAttention(x, x, x) -> out_proj(softmax(q kᵀ / sqrt(h)) v),  [q; k; v] = in_proj(x)

Design decision: the fused (3d, d) map stays one layer (one structured layer for q, k and v together), the
cheapest form for self-attention and the same map ``torch.export`` shows. Cross-attention, separate
q/k/v weights, bias_k/bias_v, add_zero_attn and masks are rejected at detection with their reason.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FusedSelfAttention", "mha_objection"]


def mha_objection(module: nn.MultiheadAttention, self_attention: bool, masked: bool) -> str | None:
    """Why a call of ``module`` cannot become a `FusedSelfAttention`, or ``None`` when it can.

    Args:
        module: the attention module.
        self_attention: query, key and value are the same tensor.
        masked: the call passes a key padding mask, an attention mask or ``is_causal``.
    """
    if not module._qkv_same_embed_dim:
        return "separate q/k/v weights (kdim/vdim differ from embed_dim) are not rewritten"
    if module.bias_k is not None or module.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn are not supported by einfx's attention decomposition"
    if not self_attention:
        return ("cross-attention: query, key and value are different tensors, so the fused in_proj_weight "
                "cannot become one structured (3d, d) layer")
    if masked:
        return "attention masks or is_causal are not supported by einfx's attention decomposition"
    return None


class FusedSelfAttention(nn.Module):
    """Self-attention equal to ``nn.MultiheadAttention(x, x, x)`` without masks (batched inputs).

    Args:
        in_proj: a module mapping (..., d) -> (..., 3d): q, k, v stacked like ``in_proj_weight``.
        out_proj: a module mapping (..., d) -> (..., d).
        num_heads: number of heads.
        head_dim: features per head (d / num_heads).
        dropout: attention-weight dropout probability (applied in training mode only).
        batch_first: input layout (N, L, E) when true, (L, N, E) otherwise.
    """

    def __init__(self, in_proj: nn.Module, out_proj: nn.Module, num_heads: int, head_dim: int,
                 dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.in_proj = in_proj
        self.out_proj = out_proj
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.attn_drop = nn.Dropout(dropout)

    # nn.TransformerEncoder(Layer) reads these to choose its fused fast path, which needs the dense
    # nn.MultiheadAttention weights: answering "not the same embed dim" sends it down the module path.
    _qkv_same_embed_dim = False

    @property
    def in_proj_bias(self):
        return getattr(self.in_proj, "bias", None)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, in_proj: nn.Module, out_proj: nn.Module) -> "FusedSelfAttention":
        return cls(in_proj, out_proj, mha.num_heads, mha.head_dim, mha.dropout, mha.batch_first)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # key/value are the query (self-attention is checked at detection); the mask arguments are None.
        x = query if self.batch_first else query.transpose(0, 1)
        h, head_dim = self.num_heads, self.head_dim
        qkv = self.in_proj(x)
        qkv = qkv.unflatten(-1, (3, h, head_dim)).permute(2, 0, 3, 1, 4)  # (3, N, H, L, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.attn_drop(weights), v)  # (N, H, L, hd)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights
