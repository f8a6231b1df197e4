"""`ExportView`: the call an exported graph makes, as a module of tensors in and tensors out.

    view(*tensors) -> model(**{name: tensor}) or model(*tensors), with use_cache=False and return_dict=True
                      where the forward takes them -> the main output (ModelOutput / dict: its first tensor,
                      ``logits`` or ``last_hidden_state``), or the outputs named in ``outputs``

This is what Optimum exports for a Hugging Face model: its own input names, its main output, no past key
values (a cache is state, not an output a graph can return). Non-mapping outputs pass through unchanged.
"""

from __future__ import annotations

import inspect
from typing import Mapping, Sequence

import torch
from torch import nn

from einfx.errors import ExportError

__all__ = ["ExportView", "call_defaults"]


def call_defaults(model: nn.Module) -> dict:
    """``use_cache=False`` and ``return_dict=True`` for the forward arguments of those names."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in params}


class ExportView(nn.Module):
    """Tensors in, the selected output tensors out.

    Args:
        model: the model to call.
        names: the input names, in the order of the tensors.
        keyword: pass the tensors by name (a tokenizer's output) instead of by position.
        outputs: keys of a mapping output to return (default: its first tensor); ignored otherwise.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], keyword: bool, outputs: Sequence[str] | None = None):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.keyword = keyword
        self.outputs = tuple(outputs) if outputs is not None else None
        self.fixed = call_defaults(model)
        self.output_names: tuple[str, ...] | None = None

    def forward(self, *tensors):
        if self.keyword:
            out = self.model(**dict(zip(self.names, tensors)), **self.fixed)
        else:
            out = self.model(*tensors, **self.fixed)
        if not isinstance(out, Mapping):
            return out
        keys = self.outputs or tuple(k for k, v in out.items() if isinstance(v, torch.Tensor))[:1]
        missing = [k for k in keys if not isinstance(out.get(k), torch.Tensor)]
        if missing or not keys:
            have = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
            raise ExportError(f"{type(self.model).__name__}: outputs {missing or list(keys)} are not tensors of its "
                              f"{type(out).__name__}; tensor outputs: {have}")
        self.output_names = keys
        values = tuple(out[k] for k in keys)
        return values[0] if len(values) == 1 else values
