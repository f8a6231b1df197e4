"""Optimizer parameter groups with the structure-aware learning rates of SPEC §2."""

from __future__ import annotations

from torch import nn

from einfx.errors import StructureError
from einfx.layers.linear import EinsumLinear
from einfx.structures.init import lr_multipliers

__all__ = ["param_groups", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "sgd")


def _structured_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, EinsumLinear)]


def param_groups(model: nn.Module, lr: float, optimizer: str = "adam") -> list[dict]:
    """Parameter groups for ``torch.optim`` with per-core learning rates.

    Cores of every `EinsumLinear` get ``lr × multiplier`` (Adam: (d_in / fan_in) / n_cores; SGD:
    (fan_out / fan_in) / (d_out / d_in) / n_cores); biases, gates and every other parameter keep ``lr``.
    Parameters with the same learning rate share a group; each group has a ``"name"`` for logging and
    ``"param_names"`` listing its parameters.

    Example:
        >>> opt = torch.optim.AdamW(einfx.param_groups(model, lr=3e-3))
    """
    if optimizer not in OPTIMIZERS:
        raise StructureError(f"unknown optimizer kind {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    mult_of: dict[int, float] = {}
    for _, module in _structured_modules(model):
        mults = lr_multipliers(module.sizes, optimizer)
        for core_name, param in module.cores().items():
            mult_of[id(param)] = mults[core_name]
        for extra in getattr(module, "extra_lr_multipliers", lambda _optimizer: {})(optimizer).items():
            mult_of[id(extra[0])] = extra[1]
    groups: dict[float, dict] = {}
    seen: set[int] = set()
    for pname, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        mult = mult_of.get(id(param), 1.0)
        key = round(mult, 12)
        group = groups.setdefault(key, {"params": [], "param_names": [], "lr": lr * mult, "lr_mult": mult,
                                        "name": f"lr_mult={mult:.4g}"})
        group["params"].append(param)
        group["param_names"].append(pname)
    return sorted(groups.values(), key=lambda g: g["lr_mult"])
