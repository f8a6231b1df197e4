"""`MoEFeedForward`: the standard mixture-of-experts feed-forward block, the baseline for BTT-MoE (SPEC §5).

    logits = x · gateᵀ (gate: (E, d_model), no bias, zero at init); top-k, softmax over the k selected
    expert_e(x) = W2_e · act(W1_e · x + b1_e) + b2_e           E dense FFN experts
    y = Σ_{e ∈ top-k} weight_e · expert_e(x)

Routing and the load-balancing loss are those of `einfx.moe.routing`, the same as `BTTMoELinear`, so the
two compare at matched parameters or FLOPs. Paths: ``masked`` runs all E experts and weights them (static
shapes, exportable); ``grouped`` gathers the tokens of each expert and runs only those (FLOPs grow with
k, shapes depend on the routing, eager only); ``auto`` takes grouped in eager mode and masked while
tracing, compiling or exporting.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from einfx.errors import PlanError, ShapeError, StructureError
from einfx.moe.aux import AuxLossState
from einfx.moe.routing import load_balancing_loss, route
from einfx.structures.init import spectral_std
from einfx.layers.linear import Cost

__all__ = ["MoEFeedForward", "FFN_PATHS", "ACTIVATIONS"]

FFN_PATHS = ("auto", "masked", "grouped")
ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": nn.functional.relu, "silu": nn.functional.silu}


def _tracing() -> bool:
    from torch.fx import _symbolic_trace as fx_trace

    # older torch has only is_fx_tracing (which also means symbolic tracing there)
    symbolic = getattr(fx_trace, "is_fx_symbolic_tracing", None) or fx_trace.is_fx_tracing
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or symbolic()


class MoEFeedForward(AuxLossState, nn.Module):
    """Standard MoE feed-forward block: E dense two-layer FFN experts, top-k routing per token.

    Args:
        d_model: input features (and output features unless ``d_out`` is given).
        d_hidden: hidden width of every expert.
        experts: number of experts E >= 1.
        k: experts per token, 1 <= k <= E.
        activation: one of ``ACTIVATIONS``.
        bias: biases in the experts.
        d_out: output features (default d_model).
        path: one of ``FFN_PATHS``.

    Attributes:
        last_aux_loss: load-balancing loss of the last training-mode forward (see `einfx.aux_loss`).
    """

    def __init__(self, d_model: int, d_hidden: int, experts: int = 8, k: int = 2, activation: str = "gelu",
                 bias: bool = True, d_out: int | None = None, path: str = "auto", *, device=None, dtype=None):
        super().__init__()
        d_out = d_model if d_out is None else d_out
        for label, v in (("d_model", d_model), ("d_hidden", d_hidden), ("d_out", d_out)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ShapeError(f"MoEFeedForward: {label} must be a positive integer, got {v!r}")
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
            raise StructureError(f"MoEFeedForward: experts must be an integer >= 1, got {experts!r}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= experts:
            raise StructureError(f"MoEFeedForward: k must be an integer in 1..experts = 1..{experts}, got {k!r}")
        if activation not in ACTIVATIONS:
            raise StructureError(f"MoEFeedForward: unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        self.d_model, self.d_hidden, self.d_out, self.experts, self.k = d_model, d_hidden, d_out, experts, k
        self.activation = activation
        self.set_path(path)
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Parameter(torch.zeros(experts, d_model, **factory))
        self.w1 = nn.Parameter(torch.randn(experts, d_hidden, d_model, **factory) * spectral_std(d_model, d_hidden))
        self.w2 = nn.Parameter(torch.randn(experts, d_out, d_hidden, **factory) * spectral_std(d_hidden, d_out))
        self.b1 = nn.Parameter(torch.zeros(experts, d_hidden, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(experts, d_out, **factory)) if bias else None
        self.last_aux_loss: torch.Tensor | None = None

    def set_path(self, path: str) -> None:
        """Choose "masked", "grouped" or "auto" (see the module docstring)."""
        if path not in FFN_PATHS:
            raise PlanError(f"MoEFeedForward: unknown path {path!r}; valid: {', '.join(FFN_PATHS)}")
        self.path = path

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        h = torch.matmul(x, self.w1[e].t())
        if self.b1 is not None:
            h = h + self.b1[e]
        out = torch.matmul(ACTIVATIONS[self.activation](h), self.w2[e].t())
        return out + self.b2[e] if self.b2 is not None else out

    def _masked(self, x2: torch.Tensor, dense_w: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(x2.unsqueeze(0), self.w1.transpose(1, 2))  # (E, N, d_hidden)
        if self.b1 is not None:
            h = h + self.b1.unsqueeze(1)
        out = torch.matmul(ACTIVATIONS[self.activation](h), self.w2.transpose(1, 2))  # (E, N, d_out)
        if self.b2 is not None:
            out = out + self.b2.unsqueeze(1)
        return (out * dense_w.t().unsqueeze(-1)).sum(dim=0)

    def _grouped(self, x2: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(x2.shape[0], self.d_out, dtype=x2.dtype, device=x2.device)
        for e in range(self.experts):
            tok, slot = torch.nonzero(indices == e, as_tuple=True)
            if tok.numel():
                y.index_add_(0, tok, self._expert(x2[tok], e) * weights[tok, slot].unsqueeze(-1))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ShapeError(f"MoEFeedForward: input has {x.shape[-1]} features in its last dimension "
                             f"(shape {tuple(x.shape)}), expected d_model = {self.d_model}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        r = route(torch.matmul(x2, self.gate.t()), self.k)
        if self.training:
            self.last_aux_loss = load_balancing_loss(r.logits, r.indices)
        path = self.path if self.path != "auto" else ("masked" if _tracing() else "grouped")
        if path == "grouped":
            y = self._grouped(x2, r.indices, r.weights.to(x2.dtype))
        else:
            y = self._masked(x2, r.dense_weights().to(x2.dtype))
        return y.reshape(*lead, self.d_out)

    def cost(self, tokens: int = 1) -> Cost:
        """Exact params and FLOPs (2 × multiply-adds of gate and expert matmuls) over ``tokens`` tokens."""
        params = sum(p.numel() for p in self.parameters())
        active = self.experts if self.path == "masked" else self.k
        per_expert = self.d_model * self.d_hidden + self.d_hidden * self.d_out
        return Cost(params=params, flops=2 * tokens * (self.d_model * self.experts + active * per_expert))

    @staticmethod
    def hidden_for_params(d_model: int, params: int, experts: int, bias: bool = True, d_out: int | None = None) -> int:
        """The largest d_hidden whose block has at most ``params`` parameters (for matched comparisons)."""
        d_out = d_model if d_out is None else d_out
        fixed = experts * d_model + (experts * d_out if bias else 0)
        per_hidden = experts * (d_model + d_out + (1 if bias else 0))
        return max(1, math.floor((params - fixed) / per_hidden))

    def extra_repr(self) -> str:
        return (f"{self.d_model} -> {self.d_hidden} -> {self.d_out}, experts={self.experts}, k={self.k}, "
                f"activation={self.activation}, path={self.path}")
