"""Model-level onnxruntime latency, dense vs BTT-optimized: GPT-2-small shape (512 tokens) and vit_b_16.

Runs on CPU onnxruntime here, on the CUDA provider when onnxruntime-gpu and a GPU are present. Both models
are built with random weights (no download), exported with einfx.export.to_onnx (float32, verified against
torch) and timed with io-binding, interleaving dense and optimized runs. Usage:

    python bench/onnx_models.py [--models gpt2,vit] [--rounds 5] [--repeats 3] [--out out/bench_onnx]
        [--frontend optimize|replace]

The optimized models put BTT (rank 1) on every projection (lm_head / the classifier stay dense). With
``--frontend optimize`` (the default) they come from einfx.optimize (graph capture with dynamic batch and
sequence axes, then the fold-to-dense and lowering deploy passes); ``replace`` swaps the modules in place.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import einfx
from einfx.errors import ShapeError
from einfx.export import compare_latency, latency_table, session, to_onnx


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention (self-attention, batch_first) with four separate structured projections."""

    def __init__(self, mha: nn.MultiheadAttention, structure):
        super().__init__()
        self.heads = mha.num_heads
        bias = mha.in_proj_bias.detach().chunk(3)
        self.q, self.k, self.v = (einfx.EinsumLinear.from_weight(w, b, structure, init="project")
                                  for w, b in zip(mha.in_proj_weight.detach().chunk(3), bias))
        self.out = einfx.EinsumLinear.from_linear(mha.out_proj, structure, init="project")

    def forward(self, query, key, value, need_weights=False, **kwargs):
        n, t, d = query.shape
        q, k, v = (p(query).reshape(n, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)), None


def replace_projections(model: nn.Module, structure, exclude=("lm_head", "head")) -> nn.Module:
    """In place: nn.Linear, GPT-2 Conv1D and nn.MultiheadAttention -> structured layers."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in exclude:
                continue
            try:
                if isinstance(child, nn.MultiheadAttention):
                    setattr(parent, name, _SelfAttention(child, structure))
                elif isinstance(child, nn.Linear):
                    setattr(parent, name, einfx.EinsumLinear.from_linear(child, structure, name=name))
                elif type(child).__name__ == "Conv1D":  # GPT-2 stores (d_in, d_out)
                    setattr(parent, name, einfx.EinsumLinear.from_weight(child.weight.detach().t(), child.bias,
                                                                         structure, name=name))
            except ShapeError:
                pass
    return model


def gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, use_cache=False)
    return GPT2LMHeadModel(cfg).eval(), (torch.randint(0, cfg.vocab_size, (1, 512)),)


def vit():
    import torchvision

    model = torchvision.models.vit_b_16(weights=None).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialized by torchvision: parity would be vacuous
    return model, (torch.randn(1, 3, 224, 224),)


MODELS = {"gpt2": gpt2_small, "vit": vit}


def optimized(model, inputs, frontend):
    structure = einfx.Structure.btt(rank=1)
    if frontend == "optimize":
        policy = einfx.Policy(default=structure, exclude=["lm_head", "heads.head"])
        return einfx.optimize(model, policy, example_inputs=inputs)
    return replace_projections(copy.deepcopy(model), structure)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,vit")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="out/bench_onnx")
    ap.add_argument("--frontend", choices=("optimize", "replace"), default="optimize")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for key in args.models.split(","):
        torch.manual_seed(0)
        model, inputs = MODELS[key]()
        start = time.time()
        opt = optimized(model, inputs, args.frontend)
        static = args.frontend == "optimize"
        reports = {}
        for name, module in (("dense", model), ("optimized", opt)):
            reports[name] = to_onnx(module, inputs, os.path.join(args.out, f"{key}_{name}.onnx"), device=args.device,
                                    dynamic_batch=not static, latency_repeats=0,
                                    verify_inputs=[] if static else None)
        # one shared thread pool: the idle session's spinning threads would slow the timed one (einfx session())
        sessions = {name: session(r.path, args.device, shared_pool=True) for name, r in reports.items()}
        lat = compare_latency(sessions, inputs, rounds=args.rounds, repeats=args.repeats)
        shape = "x".join(map(str, inputs[0].shape))
        print(f"\n## {key} (input {shape}, float32, {args.frontend}; build+export+verify {time.time() - start:.0f} s)")
        print(sessions["dense"].message)
        print(latency_table(reports, lat, baseline="dense"))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
