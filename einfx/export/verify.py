"""Parity of an exported model against torch: reference outputs, input variants, relative errors.

The error of one check is ``max |y_onnx - y_torch| / max |y_torch|`` over every output element (float64),
taken against the torch module in float32, so that a float16 export is judged on what the user deploys
rather than on torch's own float16 kernels. Tolerances (``TOLERANCES``) are stated per export dtype.

Inputs of other sizes come from `input_variants`: every named dynamic axis of the example inputs takes two
other sizes (the same size for the same name across inputs), with values drawn like the example's
(floats: normal with the example's mean and std; integers: uniform over the example's range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from einfx.errors import ExportError

__all__ = ["TOLERANCES", "ParityCheck", "rel_error", "reference_outputs", "input_variants", "alternate_sizes"]

TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}


@dataclass(frozen=True)
class ParityCheck:
    """One verification run: the input shapes, the relative error against torch, and the verdict."""

    input_shapes: tuple[tuple[int, ...], ...]
    rel_error: float
    tolerance: float
    where: str = "onnxruntime"

    @property
    def passed(self) -> bool:
        return self.rel_error <= self.tolerance

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        where = "" if self.where == "onnxruntime" else f"{self.where} "
        return f"{where}inputs [{shapes}]: rel error {self.rel_error:.3g} (tolerance {self.tolerance:g}) {'ok' if self.passed else 'FAIL'}"


def rel_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """Max absolute difference over the largest reference magnitude, over all outputs (0.0 when equal)."""
    if len(actual) != len(expected):
        raise ExportError(f"the ONNX graph returned {len(actual)} output(s), torch returned {len(expected)}")
    num, den = 0.0, 0.0
    for i, (a, e) in enumerate(zip(actual, expected)):
        if tuple(a.shape) != tuple(e.shape):
            raise ExportError(f"output {i}: ONNX shape {tuple(a.shape)} differs from torch shape {tuple(e.shape)}")
        a64, e64 = a.detach().cpu().to(torch.float64), e.detach().cpu().to(torch.float64)
        if not torch.isfinite(a64).equal(torch.isfinite(e64)) or torch.isnan(a64).any():
            return float("inf")  # NaN or Inf where torch has none (or the reverse)
        finite = torch.isfinite(e64)
        if finite.any():
            num = max(num, (a64 - e64)[finite].abs().max().item())
            den = max(den, e64[finite].abs().max().item())
    return num / den if den > 0 else num


def reference_outputs(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The module's outputs as the flat list of tensors the ONNX graph returns (pytree leaf order)."""
    with torch.no_grad():
        out = module(*inputs)
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def alternate_sizes(size: int, is_batch: bool) -> tuple[int, int]:
    """Two sizes other than ``size`` for one dynamic axis.

    A batch axis also grows (batch is unbounded); other axes (sequence, tokens) only shrink, since models
    often bound them (position embeddings), unless the example size is 1.
    """
    if is_batch:
        return (1 if size > 1 else 2), size + 2
    if size <= 2:
        return (1 if size == 2 else 2), size + 1
    return max(1, size // 2), size - 1


def _like(example: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if example.is_floating_point():
        ex = example.detach().float()
        mean, std = ex.mean().item(), (ex.std().item() if ex.numel() > 1 else 1.0)
        out = torch.randn(shape, generator=gen) * (std if std > 0 else 1.0) + mean
        return out.to(example.dtype)
    if example.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool) if bool(example.all()) else torch.rand(shape, generator=gen) < 0.5
    lo, hi = int(example.min()), int(example.max())
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=example.dtype)


def input_variants(example_inputs: Sequence[torch.Tensor], axes: Mapping[int, Mapping[int, str]],
                   batch_name: str = "batch", seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Two extra input tuples in which each named dynamic axis takes another size.

    Args:
        example_inputs: the export's example inputs (tensors).
        axes: input index -> {dim: axis name}; axes of the same name get the same size.
        batch_name: the name of the batch axis (it may grow; other axes only shrink).
        seed: seed of the generator drawing the values.
    """
    sizes: dict[str, int] = {}
    for i, dims in axes.items():
        for dim, name in dims.items():
            sizes.setdefault(name, int(example_inputs[i].shape[dim]))
    if not sizes:
        return []
    gen = torch.Generator().manual_seed(seed)
    variants = []
    for k in range(2):
        chosen = {name: alternate_sizes(n, name == batch_name)[k] for name, n in sizes.items()}
        new = []
        for i, x in enumerate(example_inputs):
            shape = list(x.shape)
            for dim, name in axes.get(i, {}).items():
                shape[dim] = chosen[name]
            new.append(x if tuple(shape) == tuple(x.shape) else _like(x, tuple(shape), gen))
        variants.append(tuple(new))
    return variants
