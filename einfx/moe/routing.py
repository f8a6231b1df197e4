"""Top-k routing and the load-balancing loss of BTT-MoE and the standard MoE baseline (SPEC §5).

Everything here is a pure function of tensors with static shapes (k is a Python int), so that traced and
exported graphs hold no data-dependent shapes:

    logits (N, E) -> topk_lowest_index -> (values (N, k), indices (N, k))
    values -> softmax over the k selected -> weights (N, k) -> scatter_weights -> (N, E) routing matrix
    logits, indices -> load_balancing_loss -> switch term + 0.1 · z-loss

Ties are broken towards the lowest expert index, on every device and in onnxruntime. ``torch.topk`` does not
promise that (on CPU it returns e.g. experts [2, 3, 0] for an all-zero row of 4), and a zero-initialized gate
makes every logit tie, so the top-k is computed from explicit ranks instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from einfx.errors import StructureError

__all__ = ["Routing", "topk_lowest_index", "route", "scatter_weights", "load_balancing_loss", "Z_LOSS_WEIGHT"]

# Weight of the router z-loss inside the per-layer load-balancing loss (SPEC §5).
Z_LOSS_WEIGHT = 0.1


@dataclass(frozen=True)
class Routing:
    """The routing of N tokens over E experts.

    Attributes:
        indices: (N, k) int64, the selected experts of each token, best first.
        weights: (N, k), softmax over the k selected logits (rows sum to 1).
        logits: (N, E), the gate logits the routing came from.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor

    @property
    def experts(self) -> int:
        return self.logits.shape[-1]

    def dense_weights(self) -> torch.Tensor:
        """The (N, E) routing matrix: the weights scattered to their experts, zero elsewhere."""
        return scatter_weights(self.indices, self.weights, self.experts)


def _check_k(k: int, experts: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= experts:
        raise StructureError(f"top-k routing: k must be an integer in 1..experts = 1..{experts}, got {k!r}")


def topk_lowest_index(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row, ties broken towards the lowest index.

    Args:
        logits: (N, E) scores.
        k: how many to keep, 1 <= k <= E.

    Returns:
        (values, indices), both (N, k), sorted by decreasing value and then increasing index.

    The rank of expert e in a row is the number of experts j with logit_j > logit_e, plus those with
    logit_j == logit_e and j < e; ranks are distinct, and the expert of rank r fills slot r. This costs
    O(E²) comparisons per token (E is small) and only elementwise ops, argmax and gather.
    """
    experts = logits.shape[-1]
    _check_k(k, experts)
    col = logits.unsqueeze(-1)  # logit_e, varies along dim 1
    row = logits.unsqueeze(-2)  # logit_j, varies along dim 2
    ar = torch.arange(experts, device=logits.device)
    earlier = ar.unsqueeze(1) > ar.unsqueeze(0)  # [e, j] = j < e
    ahead = (row > col) | ((row == col) & earlier)
    rank = ahead.sum(dim=-1)  # (N, E), a permutation of 0..E-1 per row
    slots = torch.arange(k, device=logits.device)
    onehot = rank.unsqueeze(-1) == slots  # (N, E, k)
    indices = onehot.to(torch.int32).argmax(dim=-2)  # (N, k)
    return torch.gather(logits, -1, indices), indices


def route(logits: torch.Tensor, k: int) -> Routing:
    """Top-k of the gate logits, then softmax over the k selected only (SPEC §5)."""
    values, indices = topk_lowest_index(logits, k)
    return Routing(indices=indices, weights=torch.softmax(values, dim=-1), logits=logits)


def scatter_weights(indices: torch.Tensor, weights: torch.Tensor, experts: int) -> torch.Tensor:
    """Scatter (N, k) weights at (N, k) expert indices into an (N, E) matrix that is zero elsewhere."""
    out = torch.zeros(weights.shape[0], experts, dtype=weights.dtype, device=weights.device)
    return out.scatter(-1, indices, weights)


def load_balancing_loss(logits: torch.Tensor, indices: torch.Tensor, z_weight: float = Z_LOSS_WEIGHT) -> torch.Tensor:
    """Per-layer load-balancing loss: E · Σ_e p̄_e f̄_e + z_weight · mean_tokens(logsumexp(logits)²).

    Args:
        logits: (N, E) gate logits.
        indices: (N, k) selected experts.
        z_weight: weight of the router z-loss (0.1 in SPEC §5).

    p̄ is the sum over tokens of the full softmax, L1-normalized; f̄ is the number of (token, slot)
    assignments per expert, L1-normalized. f̄ carries no gradient (counts), so the switch term trains the
    gate through p̄; the z-loss keeps the logits small. With perfectly balanced routing the switch term is 1.
    """
    experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    p_bar = probs.sum(dim=0)
    p_bar = p_bar / p_bar.sum()
    counts = scatter_weights(indices, torch.ones(indices.shape, dtype=probs.dtype, device=probs.device), experts)
    f_bar = counts.sum(dim=0)
    f_bar = f_bar / f_bar.sum()
    switch = experts * (p_bar * f_bar).sum()
    z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    return switch + z_weight * z
