"""Small models built from code or configs with random weights (no downloads), shared by the rewriter tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FormsMLP(nn.Module):
    """Every linear form einfx detects, plus a tied head: 6 candidates (5 rewritable, 1 tied)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)                               # call_module Linear
        self.w2 = nn.Parameter(torch.randn(2 * d, d) / d ** 0.5)     # x @ P        (stored (in, out))
        self.w3 = nn.Parameter(torch.randn(d, d) / d ** 0.5)         # x @ P.t()    (stored (out, in))
        self.w4 = nn.Parameter(torch.randn(d, d) / d ** 0.5)         # F.linear(x, P, b)
        self.b4 = nn.Parameter(torch.randn(d) * 0.1)
        self.emb = nn.Embedding(10, d)
        self.head = nn.Linear(d, 10, bias=False)
        self.head.weight = self.emb.weight                          # tied

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = h @ self.w2
        h = torch.matmul(h, self.w3.t())
        h = F.linear(h, self.w4, self.b4)
        return self.head(h)


class TinyTransformer(nn.Module):
    """A pre-norm transformer block stack written by hand: q/k/v/o and MLP as nn.Linear (6 per block)."""

    def __init__(self, d: int = 64, heads: int = 4, blocks: int = 2, vocab: int = 50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            blk = nn.Module()
            blk.ln1, blk.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            blk.attn = nn.Module()
            blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o = (nn.Linear(d, d) for _ in range(4))
            blk.mlp = nn.Module()
            blk.mlp.up, blk.mlp.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.blocks.append(blk)
        self.heads = heads
        self.out = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            h = blk.ln1(x)
            q, k, v = (m(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                       for m in (blk.attn.q, blk.attn.k, blk.attn.v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
            x = x + blk.attn.o(a)
            x = x + blk.mlp.down(F.gelu(blk.mlp.up(blk.ln2(x))))
        return self.out(x)


class MHANet(nn.Module):
    """nn.MultiheadAttention self-attention (like torchvision's ViT) followed by an MLP."""

    def __init__(self, d: int = 64, heads: int = 4, batch_first: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(x + y)


def gpt2(n_layer: int = 2, d: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=d, n_head=4, vocab_size=128, n_positions=32, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def bert(d: int = 64):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * d,
                     vocab_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def llama(d: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * d, vocab_size=128, max_position_embeddings=32, use_cache=False,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def ids(batch: int = 2, length: int = 8, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
