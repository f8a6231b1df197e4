"""Residual sums (SPEC §6): where a layer's output is added to a stream that bypasses it.

In a transformer block, s = r + dense(h) feeds a LayerNorm (post-norm, BERT) or the next block (pre-norm,
GPT-2, LLaMA); the residual r carries every upstream layer's error past this layer unchanged. Fitting the
layer to its own original output leaves that error alone; fitting it to the original *sum*,

    min Σ ‖Ŵ x̃ + b' + r̃ − s‖²   (s the original model's sum, r̃ the structured model's residual),

lets the layer cancel whatever of the accumulated error its own inputs can predict. `sum_points` finds, by
probing rather than by pattern, the module that reads such a sum: run one batch, add a random δ to the layer's
output, and take the first module (after the layer, not merely a copy of its output such as a dropout in eval
mode) whose input moved by exactly δ. A module called more than once per forward pass is never a sum point
(its first call might be another sum).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from einfx.rewriter.fidelity import call

from torch.utils import _pytree as pytree

__all__ = ["sum_points", "TOLERANCE"]

# Examples of the batch the probe runs on.
EXAMPLES = 2
# How exactly the probed input must move with the layer's output: ‖Δs − δ‖ ≤ TOLERANCE ‖δ‖.
TOLERANCE = 1e-3


def _first(batch, count: int):
    """The batch's first ``count`` examples: every tensor sharing the first tensor's leading size is cut."""
    leaves = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves or leaves[0].shape[0] <= count:
        return batch
    size = leaves[0].shape[0]
    return pytree.tree_map(lambda t: t[:count] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size
                           else t, batch)


class _Recorder:
    """Forward pre-hooks on every leaf module keeping its first input tensor and the order of the calls."""

    def __init__(self, model: nn.Module, skip: set[str]):
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in model.named_modules()
                        if name and name not in skip and not any(True for _ in m.children())]

    def _hook(self, name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                self.calls.append((name, args[0].detach().clone()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def sum_points(model: nn.Module, names: Sequence[str], batch, seed: int = 0) -> dict[str, str]:
    """For each named layer whose output enters an additive sum that a module reads, that module's name.

    ``model`` is run (in its current mode) once, then once per layer with a random perturbation of that layer's
    output; it is not changed. Layers without such a sum (q, k, v, an FFN's first layer) are left out.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = _first(batch, EXAMPLES)
    recorder = _Recorder(model, set())
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                outputs.setdefault(name, out.detach().clone())
                recorder.calls.append((f"\0{name}", out.detach()))  # where in the call order the layer ran
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        call(model, batch)
    finally:
        for h in handles:
            h.remove()
    base = recorder.calls
    counts: dict[str, int] = {}
    for n, _ in base:
        counts[n] = counts.get(n, 0) + 1
    out: dict[str, str] = {}
    try:
        for name in names:
            y = outputs.get(name)
            marker = f"\0{name}"
            if y is None or counts.get(marker) != 1:
                continue
            start = next(i for i, (n, _) in enumerate(base) if n == marker)
            delta = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device, y.dtype)
            delta = delta * (float(y.float().std()) or 1.0)
            handle = model.get_submodule(name).register_forward_hook(lambda m, a, o, d=delta: o + d)
            recorder.calls = []
            try:
                call(model, batch)
            finally:
                handle.remove()
            moved = {n: t for n, t in recorder.calls}
            for n, before in base[start + 1:]:
                if n.startswith("\0") or counts[n] != 1 or before.shape != y.shape or n not in moved:
                    continue
                if torch.allclose(before, y, rtol=1e-5, atol=1e-6 * float(y.abs().max() or 1.0)):
                    continue  # a copy of the layer's output (dropout in eval mode), not a sum
                change = (moved[n] - before).float() - delta.float()
                if float(change.norm()) <= TOLERANCE * float(delta.float().norm()):
                    out[name] = n
                    break
    finally:
        recorder.close()
    return out
