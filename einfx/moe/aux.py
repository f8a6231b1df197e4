"""`aux_loss(model)`: the load-balancing losses of a model's MoE layers from their last forward."""

from __future__ import annotations

import torch
from torch import nn

from einfx.errors import StructureError

__all__ = ["aux_loss", "REDUCTIONS", "AuxLossState"]

REDUCTIONS = ("sum", "mean")


class AuxLossState:
    """Mixin for modules that keep ``last_aux_loss``: copies and pickles drop it.

    The loss of the last forward is a non-leaf tensor tied to that step's autograd graph, which
    ``copy.deepcopy`` refuses to copy (e.g. for an EMA copy of the model after a training step).
    """

    def __getstate__(self):
        state = dict(self.__dict__)
        state["last_aux_loss"] = None
        return state


def aux_loss(model: nn.Module, reduction: str = "sum") -> torch.Tensor:
    """Sum (or mean) over MoE layers of the load-balancing loss of their last training-mode forward.

    Layers are the modules with a ``last_aux_loss`` attribute (`BTTMoELinear`, `MoEFeedForward`); those
    whose last forward ran in eval mode (None) are skipped. Returns a 0-dim tensor, 0.0 when there is none.
    SPEC §5 adds ``0.01 * aux_loss(model, "mean")`` to the training loss.

    Example:
        >>> loss = task_loss + 0.01 * einfx.aux_loss(model, reduction="mean")
    """
    if reduction not in REDUCTIONS:
        raise StructureError(f"aux_loss: unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    losses = [m.last_aux_loss for m in model.modules() if getattr(m, "last_aux_loss", None) is not None]
    if not losses:
        return torch.zeros(())
    total = torch.stack([loss.float() for loss in losses]).sum()
    return total / len(losses) if reduction == "mean" else total
