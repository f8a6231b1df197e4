"""Output metrics (SPEC §6): how much each direction of a layer's output matters to the model's main output.

A change Δy of one layer's output at one position moves the model's main output by J Δy (J the Jacobian of
the main output with respect to that position's layer output). Summed over the data, the squared change is
Σ Δyᵀ JᵀJ Δy; K-FAC's approximation (independence of the layer's inputs and of its output gradients) turns a
weight error ΔW into tr(G ΔW C ΔWᵀ) with C the layer's input covariance and

    G = E[JᵀJ] = E_v[g gᵀ],  g = ∂(vᵀ f(x)) / ∂y,  v ~ N(0, I) on the main output (padding positions zeroed),

which one backward pass per batch estimates without forming J. The fit (`einfx.rewriter.fit`) and the search
(`einfx.rewriter.search`) weigh each layer's output error by its G, so that a query projection is fitted to
what the attention logits see and an FFN's first layer to what survives its GELU and second layer.

G is d_out × d_out per layer; a layer wider than ``MAX_FULL`` keeps only its diagonal (memory: at most
MAX_FULL² doubles per layer).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from einfx.rewriter.fidelity import batch_mask, call, main_output

__all__ = ["output_metrics", "MAX_FULL", "SAMPLES"]

# Layers with more outputs than this keep a diagonal metric.
MAX_FULL = 4096
# Random cotangents drawn per batch.
SAMPLES = 1


def output_metrics(model: nn.Module, names: Sequence[str], data, *, samples: int = SAMPLES, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """E[JᵀJ] of each named module's output (float64, (d_out, d_out), or (d_out,) for a diagonal one).

    The model runs in eval mode with gradients enabled; its parameters' ``.grad`` are left as they were.
    Each batch's cotangent is scaled by the inverse norm of its main output, so batches weigh alike.
    """
    modules = {name: model.get_submodule(name) for name in names}
    sums: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    seen: list[tuple[str, torch.Tensor]] = []

    def keep(name):
        def forward_hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                seen.append((name, out))
        return forward_hook

    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    params = list(model.parameters())
    was_grad = [p.requires_grad for p in params]
    mode = model.training
    model.eval()
    try:
        for p in params:  # the layer outputs need a graph; no parameter gradient is computed
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            for batch in data:
                for _ in range(samples):
                    seen.clear()
                    _, out = main_output(call(model, batch))
                    if not seen or not out.requires_grad:
                        continue
                    mask = batch_mask(batch, out.shape)
                    v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
                    kept = out.detach()
                    if mask is not None:
                        v = v * mask.reshape(*mask.shape, *([1] * (out.dim() - 2))).to(v.dtype)
                        kept = kept[mask]
                    v = v / (float(kept.norm()) or 1.0)
                    grads = torch.autograd.grad(out, [t for _, t in seen], v, allow_unused=True)
                    for (name, _), grad in zip(seen, grads):
                        if grad is None:
                            continue
                        rows = grad.reshape(-1, grad.shape[-1]).double()
                        part = rows.T @ rows if rows.shape[-1] <= MAX_FULL else rows.square().sum(0)
                        sums[name] = sums[name] + part if name in sums else part
                    seen.clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, was_grad):
            p.requires_grad_(flag)
        model.train(mode)
    count = max(len(data) * samples, 1)
    return {name: value / count for name, value in sums.items()}
