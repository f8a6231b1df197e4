"""`fidelity`: how close a converted model's outputs stay to the original's on real data.

    fidelity(reference, candidate, data) -> Fidelity(rel_error, cosine, top1_agreement, per_layer)

- main output: the first tensor the model returns (a ModelOutput's first field: ``logits``,
  ``last_hidden_state``; a tuple's first item; a tensor);
- positions: where a batch has an ``attention_mask`` matching the output's leading (batch, sequence) axes,
  only the unmasked positions count;
- ``rel_error``: sqrt(Σ‖ŷ − y‖² / Σ‖y‖²) over every counted entry;
- ``cosine``: the mean over examples of the cosine between the example's flattened outputs;
- ``top1_agreement``: for logits (the output is named ``logits``, or ``logits=True``), the fraction of counted
  positions where both models rank the same class first;
- ``per_layer``: for each structured layer of the candidate (an `EinsumLinear` by name) and the module of
  the same name in the reference, the relative error of its output inside the running models.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from einfx.errors import PolicyError
from einfx.layers.linear import EinsumLinear

__all__ = ["Fidelity", "fidelity", "call", "main_output", "batch_mask"]


@dataclass(frozen=True)
class Fidelity:
    """Outputs of a candidate model against a reference on the same data (see the module docstring)."""

    rel_error: float
    cosine: float
    top1_agreement: float | None
    per_layer: Mapping[str, float] = field(default_factory=dict)
    examples: int = 0
    output: str = ""

    def to_dict(self) -> dict:
        return {"rel_error": self.rel_error, "cosine": self.cosine, "top1_agreement": self.top1_agreement,
                "examples": self.examples, "output": self.output, "per_layer": dict(self.per_layer)}

    def __str__(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.4f}" if self.top1_agreement is not None else ""
        return (f"fidelity on {self.examples} examples ({self.output}): cosine {self.cosine:.4f}, relative error "
                f"{self.rel_error:.4f}{top1}")


def call(model: nn.Module, batch: Any):
    """Run ``model`` on one batch: a mapping of keyword inputs, a tuple of positional inputs, or a tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise PolicyError(f"a data batch is a dict of keyword inputs, a tuple of positional inputs or a tensor; got "
                      f"{type(batch).__name__}")


def main_output(out) -> tuple[str, torch.Tensor]:
    """(name, tensor) of a model's main output."""
    if isinstance(out, torch.Tensor):
        return "output", out
    if isinstance(out, Mapping):
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                return str(key), value
    if isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            if isinstance(value, torch.Tensor):
                return f"output[{i}]", value
    raise PolicyError(f"the model returned {type(out).__name__} with no tensor to compare")


def batch_mask(batch: Any, shape: torch.Size) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as a bool (batch, sequence) mask when it matches ``shape``'s lead axes."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or len(shape) < 2 or tuple(shape[:2]) != tuple(mask.shape):
        return None
    return mask.bool()


class _Taps:
    """Forward hooks that keep the outputs of named modules for the current batch."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._keep(name)))

    def _keep(self, name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.out[name] = output.detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def fidelity(reference: nn.Module, candidate: nn.Module, data: Iterable, *, logits: bool | None = None) -> Fidelity:
    """Compare ``candidate`` with ``reference`` on every batch of ``data`` (both run in their current mode).

    Args:
        reference: the original model.
        candidate: the converted model (its `EinsumLinear` layers get per-layer errors).
        data: an iterable of batches (dicts of keyword inputs, tuples of positional inputs, or tensors).
        logits: whether the main output is logits (top-1 agreement); default: when it is named ``logits``.

    Raises:
        PolicyError: no batches, a batch of an unknown kind, or outputs of different shapes.
    """
    names = [n for n, m in candidate.named_modules() if isinstance(m, EinsumLinear)]
    ref_modules = dict(reference.named_modules())
    names = [n for n in names if n in ref_modules]
    ref_taps, cand_taps = _Taps(reference, names), _Taps(candidate, names)
    num = den = 0.0
    agree = total = 0
    cosines: list[float] = []
    layer_num: dict[str, float] = defaultdict(float)
    layer_den: dict[str, float] = defaultdict(float)
    label = ""
    try:
        for batch in data:
            key, y = main_output(call(reference, batch))
            _, z = main_output(call(candidate, batch))
            label = key
            if y.shape != z.shape:
                raise PolicyError(f"main output {key!r}: the candidate returns shape {tuple(z.shape)}, the reference "
                                  f"{tuple(y.shape)}")
            y, z = y.double(), z.double()
            mask = batch_mask(batch, y.shape)
            for i in range(y.shape[0] if y.dim() else 1):
                a, b = (y[i], z[i]) if y.dim() else (y, z)
                if mask is not None:
                    a, b = a[mask[i]], b[mask[i]]
                a, b = a.reshape(-1), b.reshape(-1)
                num += float((a - b).square().sum())
                den += float(a.square().sum())
                norm = float(a.norm() * b.norm())
                cosines.append(float(a @ b) / norm if norm > 0 else float(torch.equal(a, b)))
            if logits if logits is not None else key == "logits":
                top_y, top_z = y.argmax(-1), z.argmax(-1)
                same = top_y == top_z
                if mask is not None and same.dim() >= 2:
                    same = same[mask]
                agree += int(same.sum())
                total += same.numel()
            for name in names:
                r, c = ref_taps.out.get(name), cand_taps.out.get(name)
                if r is not None and c is not None and r.shape == c.shape:
                    layer_num[name] += float((r.double() - c.double()).square().sum())
                    layer_den[name] += float(r.double().square().sum())
    finally:
        ref_taps.close()
        cand_taps.close()
    if not cosines:
        raise PolicyError("fidelity needs at least one data batch")
    per_layer = {n: (layer_num[n] / layer_den[n]) ** 0.5 if layer_den[n] > 0 else 0.0 for n in names if n in layer_den}
    return Fidelity((num / den) ** 0.5 if den > 0 else 0.0, sum(cosines) / len(cosines),
                    agree / total if total else None, per_layer, len(cosines), label)
