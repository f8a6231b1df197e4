"""`BTTMoELinear`: a BTT layer whose rank index ρ is an expert index, with top-k routing (SPEC §5).

    logits = x · gateᵀ                          gate: (E, d_in), no bias, zero at init
    (indices, weights) = top-k(logits), softmax over the k selected      (ties: lowest index)
    y = Σ_{e ∈ top-k} weight_e · BTT_e(x) + bias    BTT_e: the ρ = e slices of A and B (rank-1 BTT)

Built by ``EinsumLinear(d_in, d_out, Structure.btt_moe(experts=E, k=k))``. Two compute paths with equal
outputs: ``masked`` (all E experts, the intermediate between the cores scaled by the (N, E) routing
matrix), ``sparse`` (only the k selected experts' core slices, gathered per token) and, in eager mode only,
``grouped`` (tokens sorted by expert, each expert's rank-1 BTT run on its own tokens); ``path="auto"`` lets
`einfx.moe.cost.choose_path` decide per call from the token count. Masked and sparse have static shapes (k
is a Python int), so one exported ONNX graph serves every batch size; traced and exported graphs never
take the grouped path.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from einfx.errors import PlanError, ShapeError
from einfx.moe.aux import AuxLossState
from einfx.moe.cost import PATHS, choose_path
from einfx.moe.projection import project_experts
from einfx.moe.routing import Routing, load_balancing_loss, route
from einfx.planning import execute
from einfx.planning.planner import dtype_name, plan_layer
from einfx.planning.profile import default_profile
from einfx.structures import functional as Fn
from einfx.structures.init import init_cores_, lr_multipliers
from einfx.layers.linear import INITS, Cost, EinsumLinear, check_weight

__all__ = ["BTTMoELinear", "PATH_CHOICES"]

PATH_CHOICES = ("auto",) + PATHS


def _masked(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, w: torch.Tensor, s) -> torch.Tensor:
    """All experts: (x·A) over every ρ, ρ slices scaled by w (N, E), then ·B. Returns (N, out_padded)."""
    n = x2.shape[0]
    f, d, r, g, a, b, e = s.phi, s.delta, s.rho, s.gamma, s.alpha, s.beta, s.epsilon
    xg = x2.reshape(n, g, b, a).permute(1, 0, 2, 3).reshape(g, n * b, a)
    ag = A.permute(3, 4, 0, 1, 2).reshape(g, a, f * d * r)
    t = torch.matmul(xg, ag).reshape(g, n, b, f, d, r)
    t = t * w.reshape(1, n, 1, 1, 1, r)
    t = t.permute(3, 1, 4, 0, 2, 5).reshape(f, n * d, g * b * r)
    bf = B.permute(0, 3, 4, 2, 1).reshape(f, g * b * r, e)
    y = torch.matmul(t, bf).reshape(f, n, d, e)
    return y.permute(1, 0, 3, 2).reshape(n, f * e * d)


def _sparse(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, s
            ) -> torch.Tensor:
    """Only the k selected experts per token: gather their slices of A and B, contract, weight, sum."""
    n, k = idx.shape
    f, d, g, a, b, e = s.phi, s.delta, s.gamma, s.alpha, s.beta, s.epsilon
    flat = idx.reshape(n * k)
    # Gather along ρ in the stored layout and contract by broadcast-multiply + sum: a gathered slice is
    # used by one token only (matrix-vector work), and this avoids permuting all E experts' cores or
    # the gathered copies, which dominated at the small token counts where this path is chosen.
    a_sel = A.index_select(2, flat).reshape(f, d, n * k, g, 1, a)
    xk = x2.reshape(n, 1, g, b, a).expand(n, k, g, b, a).reshape(1, 1, n * k, g, b, a)
    t = (a_sel * xk).sum(dim=-1) * w.reshape(1, 1, n * k, 1, 1)  # (φ, δ, N·k, γ, β)
    t = t.reshape(f, d, n, k * g * b).permute(0, 2, 1, 3).unsqueeze(1)  # (φ, 1, N, δ, k·γ·β)
    b_sel = B.index_select(2, flat).reshape(f, e, n, 1, k * g * b)
    y = (b_sel * t).sum(dim=-1)  # (φ, ε, N, δ): the sum over the k experts is part of this reduction
    return y.permute(2, 0, 1, 3).reshape(n, f * e * d)


def _grouped(x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, s
             ) -> torch.Tensor:
    """Each expert's rank-1 BTT on the tokens routed to it (eager: data-dependent sizes). FLOPs ∝ k."""
    n, k = idx.shape
    flat = idx.reshape(n * k)
    order = torch.argsort(flat, stable=True)
    tokens = torch.arange(n, device=x2.device).repeat_interleave(k)[order]
    weights = w.reshape(n * k)[order]
    counts = torch.bincount(flat, minlength=s.rho).tolist()
    one = dataclasses.replace(s, rho=1, d_in=s.in_padded, d_out=s.out_padded)  # x2 is padded already
    y = x2.new_zeros(n, s.out_padded)
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = tokens[start:start + count]
            # the planner's best plan for a rank-1 BTT (planned for the token count rounded up to a power
            # of two, so that the cache of plans stays small; plans run at any token count)
            plan = plan_layer(one, 1 << (count - 1).bit_length(), dtype_name(x2.dtype),
                              default_profile(x2.device.type), ("xab", "xba"))
            ye = execute(plan, x2.index_select(0, rows), {"A": A[:, :, e:e + 1], "B": B[:, :, e:e + 1]})
            # in place into one output: scattering each expert's (small) result avoids copying all of y
            y.index_add_(0, rows, ye * weights[start:start + count, None])
            start += count
    return y


class BTTMoELinear(AuxLossState, EinsumLinear, kind="btt_moe"):
    """BTT-MoE linear layer (SPEC §5); build it as ``EinsumLinear(d_in, d_out, Structure.btt_moe(E, k))``.

    Attributes:
        gate: (E, d_in) gate weight, zero at init (uniform routing probabilities).
        experts, k: number of experts and experts per token.
        path: "auto", "masked", "sparse" or "grouped" (see `set_path`).
        last_aux_loss: the load-balancing loss of the last forward in training mode (None otherwise);
            `einfx.aux_loss(model)` sums it over layers.

    Each expert's cores are initialized like a rank-1 BTT (spectral init with d_ρ = 1), since a token's
    output is a convex combination of k such experts; `extra_lr_multipliers` gives the cores the per-expert
    learning-rate multipliers for the same reason, and the gate the dense multiplier 1.
    """

    def __init__(self, d_in: int, d_out: int, structure, bias: bool = True, *, zero_init_last: bool = False,
                 name: str | None = None, device=None, dtype=None):
        super().__init__(d_in, d_out, structure, bias, zero_init_last=zero_init_last, name=name, device=device,
                         dtype=dtype)
        self.experts, self.k = self.structure.experts, self.structure.k
        self.order = "xab"
        self.path = "auto"
        self.last_aux_loss: torch.Tensor | None = None
        init_cores_(self.cores(), self._expert_sizes(), zero_last=zero_init_last)
        self.gate = nn.Parameter(torch.zeros(self.experts, d_in, device=device, dtype=dtype))

    def _expert_sizes(self):
        return dataclasses.replace(self.sizes, rho=1)

    # -- configuration ----------------------------------------------------------------------------
    def set_path(self, path: str) -> None:
        """Fix the compute path ("masked", "sparse" or "grouped"), or let the cost model choose per call
        ("auto"). A fixed "grouped" path is for eager use; traced and exported graphs fall back to masked."""
        if path not in PATH_CHOICES:
            raise PlanError(f"layer {self.name or 'BTTMoELinear'}: unknown BTT-MoE path {path!r}; "
                            f"valid: {', '.join(PATH_CHOICES)}")
        self.path = path

    def set_order(self, order: str) -> None:
        if order != "xab":
            raise PlanError(
                f"layer {self.name or 'BTTMoELinear'}: BTT-MoE contracts x·A then ·B (the routing scales the "
                f"intermediate between the cores), so order {order!r} is not available; valid: xab. "
                "Use set_path('masked' | 'sparse' | 'auto') to choose how the experts are computed")

    def path_for(self, tokens: int | None, static: bool = False) -> str:
        """The path a forward over ``tokens`` tokens runs (None: unknown, e.g. a symbolic batch; ``static``:
        a graph being traced or exported, where the grouped path's data-dependent shapes are not allowed)."""
        static = static or tokens is None
        if self.path != "auto":
            return "masked" if static and self.path == "grouped" else self.path
        dtype_bytes = self.A.element_size()
        return choose_path(self.sizes, self.k, tokens, dtype_bytes=dtype_bytes, static=static)

    def extra_lr_multipliers(self, optimizer: str = "adam") -> dict[nn.Parameter, float]:
        """Per-expert core multipliers (SPEC §2 with d_ρ = 1) and 1.0 for the gate, for `param_groups`."""
        mults = lr_multipliers(self._expert_sizes(), optimizer)
        return {self.A: mults["A"], self.B: mults["B"], self.gate: 1.0}

    # -- forward ----------------------------------------------------------------------------------
    def routing(self, x: torch.Tensor) -> Routing:
        """Gate logits and top-k routing of the tokens of x (..., d_in), flattened to (N, ·)."""
        x2 = x.reshape(-1, self.in_features)
        return route(torch.matmul(x2, self.gate.t()), self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"layer {self.name or type(self).__name__}: input has {x.shape[-1]} features in its last "
                f"dimension (shape {tuple(x.shape)}), expected d_in = {self.in_features}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        r = route(torch.matmul(x2, self.gate.t()), self.k)
        if self.training:
            self.last_aux_loss = load_balancing_loss(r.logits, r.indices)
        tokens = x2.shape[0]
        static = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
        path = self.path_for(tokens if isinstance(tokens, int) else None, static=static)
        xp = Fn.pad_input(x2, self.sizes)
        if path == "grouped":
            y = _grouped(xp, self.A, self.B, r.indices, r.weights.to(xp.dtype), self.sizes)
        elif path == "sparse":
            y = _sparse(xp, self.A, self.B, r.indices, r.weights.to(xp.dtype), self.sizes)
        else:
            y = _masked(xp, self.A, self.B, r.dense_weights().to(xp.dtype), self.sizes)
        y = Fn.unpad_output(y, self.sizes).reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    # -- description --------------------------------------------------------------------------------
    @torch.no_grad()
    def to_dense(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (d_out, d_in) map for one fixed routing.

        Args:
            weights: (E,) routing weights of the experts. Default: the routing of a token whose logits all
                tie (1/k on experts 0..k-1), which is every token's routing while the gate is zero; so with
                a zero gate ``layer(x) == x @ layer.to_dense().T + bias`` exactly.
        """
        if weights is None:
            weights = torch.zeros(self.experts, dtype=self.A.dtype, device=self.A.device)
            weights[: self.k] = 1.0 / self.k
        if tuple(weights.shape) != (self.experts,):
            raise ShapeError(f"layer {self.name or 'BTTMoELinear'}: routing weights must have shape "
                             f"({self.experts},), got {tuple(weights.shape)}")
        a = self.A * weights.to(self.A).reshape(1, 1, -1, 1, 1)
        return Fn.fold(a, self.B, self.sizes).detach()

    def cost(self, tokens: int = 1) -> Cost:
        """Exact params (cores + gate + bias) and FLOPs over ``tokens`` tokens on the path used for them.

        FLOPs count the multiply-adds (× 2) of the gate and of the core contractions: E experts on the
        masked path, k on the sparse and grouped paths.
        """
        s = self.sizes
        params = s.params + self.gate.numel() + (self.out_features if self.bias is not None else 0)
        active = self.experts if self.path_for(tokens) == "masked" else self.k
        core_macs = s.macs_per_token("xab") // self.experts * active
        return Cost(params=params, flops=2 * tokens * (core_macs + self.in_features * self.experts))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", experts={self.experts}, k={self.k}, path={self.path}"

    # -- construction from dense ------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, structure, init: str = "project", *,
                    name: str | None = None, zero_init_last: bool = False) -> "BTTMoELinear":
        """Build from a dense weight; ``init="project"`` is described in `einfx.moe.projection`.

        The projection puts the per-block SVD triplets of the weight into the experts (scaled by k), so
        that the layer with its zero gate computes exactly the rank-k BTT projection of the weight;
        ``projection_error`` is its relative Frobenius error ‖W − to_dense()‖ / ‖W‖.
        """
        if init not in INITS:
            raise ValueError(f"layer {name!r}: unknown init {init!r}; valid: {', '.join(INITS)}")
        check_weight(weight, name)
        layer = super().from_weight(weight, bias, structure, "random", name=name, zero_init_last=zero_init_last)
        if init == "project":
            A, B = project_experts(weight.detach(), layer.sizes, layer.k, name=name)
            with torch.no_grad():
                layer.A.copy_(A)
                layer.B.copy_(B)
                work = torch.promote_types(weight.dtype, torch.float32)
                w = weight.detach().to(work)
                err = (w - layer.to_dense().to(work)).norm() / w.norm().clamp_min(torch.finfo(work).tiny)
            layer.projection_error = float(err)
        return layer
