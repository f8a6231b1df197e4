"""`EinsumLinear`: the nn.Module of a structured linear layer (drop-in for nn.Linear)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from einfx.errors import ShapeError, StructureError, WeightError
from einfx.planning import execute, plan_for
from einfx.planning.profile import default_profile
from einfx.structures import functional as Fn
from einfx.structures.init import init_cores_
from einfx.structures.projection import check_weight, project
from einfx.structures.sizes import ORDERS, Sizes
from einfx.structures.structure import Structure

__all__ = ["EinsumLinear", "Cost", "check_weight", "INITS"]

INITS = ("project", "random")


@dataclass(frozen=True)
class Cost:
    """Exact parameter count (cores + bias) and FLOPs (2 × multiply-adds) for a number of tokens."""

    params: int
    flops: int


class EinsumLinear(nn.Module):
    """A linear layer whose weight is a two-core einsum structure (SPEC §1).

    Args:
        d_in: input features.
        d_out: output features.
        structure: a `Structure` (or anything `Structure.from_dict` accepts).
        bias: whether to add a learnable bias.
        zero_init_last: zero the last core at init (output projections of residual branches).
        name: the layer's name in its model, used in error messages.

    The forward pass takes (..., d_in) and returns (..., d_out), in float32, float16 or bfloat16.
    ``order`` is "auto" (the planner picks the order and layout per token count) or the order pinned by
    `set_order` ("xab", "xba" or "fold"), which the planner then keeps.
    """

    # structure kind -> the subclass that implements it (BTT-MoE registers itself: einfx.moe.layer); the base
    # class does not import its subclasses, so the floors of the package stay one-way
    _KIND_CLASSES: dict[str, type] = {}

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            EinsumLinear._KIND_CLASSES[kind] = cls

    @classmethod
    def _class_for(cls, structure) -> type:
        if cls is not EinsumLinear or structure is None:
            return cls
        kind = Structure.from_dict(structure).kind
        sub = EinsumLinear._KIND_CLASSES.get(kind)
        if sub is None and kind == "btt_moe":
            raise StructureError("BTT-MoE layers are built by einfx.moe.layer; import einfx (or einfx.layers) first")
        return sub or cls

    def __new__(cls, *args, **kwargs):
        # EinsumLinear(d_in, d_out, Structure.btt_moe(...)) builds the BTT-MoE subclass (einfx.moe).
        structure = args[2] if len(args) > 2 else kwargs.get("structure")
        return super().__new__(cls._class_for(structure))

    def __init__(self, d_in: int, d_out: int, structure, bias: bool = True, *, zero_init_last: bool = False,
                 name: str | None = None, device=None, dtype=None):
        super().__init__()
        self.structure = Structure.from_dict(structure)
        self.sizes: Sizes = self.structure.resolve(d_in, d_out, layer=name)
        self.in_features, self.out_features = d_in, d_out
        self.name = name
        self.order = "auto"
        self.projection_error: float | None = None
        # the device profile a captured graph (torch.export, ONNX) plans with; None: the device's default
        self.export_profile = None
        # a plan measured fastest in the runtime a graph is exported for (einfx.export.tune); captured graphs run it
        self.export_plan = None
        factory = {"device": device, "dtype": dtype}
        if self.sizes.dense:
            self.weight = nn.Parameter(torch.empty(d_out, d_in, **factory))
        else:
            self.A = nn.Parameter(torch.empty(self.sizes.a_shape, **factory))
            self.B = nn.Parameter(torch.empty(self.sizes.b_shape, **factory))
        self.bias = nn.Parameter(torch.zeros(d_out, **factory)) if bias else None
        init_cores_(self.cores(), self.sizes, zero_last=zero_init_last)

    def __getattr__(self, name: str):
        # Code written for nn.Linear reads ``.weight`` (T5 checks its dtype in forward; PyTorch's encoder
        # fast path passes it to a fused kernel): a structured layer answers with the exact dense weight it
        # computes, differentiable with respect to the cores. Only called when normal lookup fails.
        if name == "weight" and "A" in self.__dict__.get("_parameters", {}):
            return Fn.fold(self.A, self.B, self.sizes)
        return super().__getattr__(name)

    # -- structure --------------------------------------------------------------------------------
    def cores(self) -> dict[str, nn.Parameter]:
        """The weight cores by name: {"A", "B"} or {"weight"} for dense."""
        return {"weight": self.weight} if self.sizes.dense else {"A": self.A, "B": self.B}

    def _eager_plan(self, tokens: int, x: torch.Tensor):
        """`plan_for` memoized on the layer per (tokens, dtype, device, threads, order): the planner's own
        cache hashes the sizes and the profile on every call, a few µs that small layers notice."""
        cache = self.__dict__.setdefault("_einfx_plans", {})
        key = (tokens, x.dtype, x.device.type, torch.get_num_threads(), self.order)
        plan = cache.get(key)
        if plan is None:
            if len(cache) >= 64:
                cache.clear()
            plan = cache[key] = plan_for(self, tokens, dtype=x.dtype, profile=default_profile(x.device.type))
        return plan

    def set_order(self, order: str) -> None:
        """Pin the contraction order (the planner still chooses the layout), or "auto" to unpin it."""
        if order not in ORDERS + ("auto",):
            raise ValueError(f"unknown contraction order {order!r}; valid: {', '.join(ORDERS + ('auto',))}")
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"layer {self.name or type(self).__name__}: input has {x.shape[-1]} features in its last "
                f"dimension (shape {tuple(x.shape)}), expected d_in = {self.in_features}"
            )
        if self.sizes.dense:
            return torch.nn.functional.linear(x, self.weight, self.bias)  # nn.Linear's kernel, bit for bit
        # traced / symbolic token counts plan for 512 tokens: the plan's steps run at any count
        n = x.numel() // self.in_features
        tokens = max(1, n) if isinstance(n, int) else 512
        capturing = not isinstance(n, int) or torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if capturing and self.export_plan is not None:
            plan = self.export_plan
        elif capturing:
            plan = plan_for(self, tokens, dtype=x.dtype, profile=self.export_profile or default_profile(x.device.type))
            if plan.token_block:  # a captured graph must serve every token count: run the whole batch
                plan = dataclasses.replace(plan, token_block=0)
        else:
            plan = self._eager_plan(tokens, x)
        return execute(plan, x, self.cores(), self.bias)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The dense weight (d_out, d_in), same convention as ``nn.Linear.weight``."""
        if self.sizes.dense:
            return self.weight.detach().clone()
        return Fn.fold(self.A, self.B, self.sizes).detach()

    def cost(self, tokens: int = 1) -> Cost:
        """Exact parameters and FLOPs of a forward pass over ``tokens`` input vectors, for the plan used."""
        s = self.sizes
        params = s.params + (self.out_features if self.bias is not None else 0)
        if s.dense:
            flops = 2 * tokens * s.d_in * s.d_out
        else:
            flops = plan_for(self, tokens).flops  # the plan the forward pass runs at this token count
        return Cost(params=params, flops=flops)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, structure={self.structure.name}, "
                f"sizes=[{self.sizes.describe()}], order={self.order}, bias={self.bias is not None}")

    # -- construction from dense ------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, structure, init: str = "project", *,
                    name: str | None = None, zero_init_last: bool = False) -> "EinsumLinear":
        """Build from a dense weight (d_out, d_in) and optional bias, keeping device and dtype.

        ``init="project"`` fits the cores to the weight (SPEC §3) and records ``projection_error``
        (relative Frobenius error); ``init="random"`` uses the spectral μP init and copies only the bias.
        """
        sub = cls._class_for(structure)
        if sub is not cls:
            # BTT-MoE projects onto its experts differently (einfx.moe.projection), like __new__ dispatches.
            return sub.from_weight(weight, bias, structure, init, name=name, zero_init_last=zero_init_last)
        if init not in INITS:
            raise ValueError(f"layer {name!r}: unknown init {init!r}; valid: {', '.join(INITS)}")
        check_weight(weight, name)
        d_out, d_in = weight.shape
        if bias is not None and tuple(bias.shape) != (d_out,):
            raise WeightError(f"layer {name!r}: bias has shape {tuple(bias.shape)}, expected ({d_out},)")
        layer = cls(d_in, d_out, structure, bias=bias is not None, name=name, zero_init_last=zero_init_last,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if bias is not None:
                layer.bias.copy_(bias)
            if init == "project":
                result = project(weight.detach(), layer.structure, layer.sizes, name=name)
                for key, core in result.cores.items():
                    getattr(layer, key).copy_(core)
                layer.projection_error = float(result.rel_error)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, structure, init: str = "project", *, name: str | None = None,
                    zero_init_last: bool = False) -> "EinsumLinear":
        """Build from an ``nn.Linear`` (or any module with a 2-D ``weight`` (d_out, d_in) and ``bias``)."""
        weight = getattr(linear, "weight", None)
        if weight is None:
            raise WeightError(f"layer {name!r}: {type(linear).__name__} has no 'weight' to convert")
        return cls.from_weight(weight, getattr(linear, "bias", None), structure, init, name=name,
                               zero_init_last=zero_init_last)
