"""Plans as data: a `Plan` is a list of primitive `Step`s (reshape, permute, expand, pad, crop, matmul,
slice, restore) over named values, plus its predicted figures and those of the naive plan and of dense.

``execute(plan, x, cores)`` runs a plan eagerly with torch; ``einfx.passes.lower`` emits the same steps as
FX graph nodes. Every op is a plain differentiable torch op, so plans train with autograd.
Value names: ``x`` (the input), the core names (``A``, ``B`` or ``weight``), and step outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from einfx.errors import PlanError
from einfx.planning.codegen import VIEW_OPS, compiled
from einfx.planning.workspace import scratch

__all__ = ["Step", "Plan", "execute", "uses_scratch", "apply_step", "OPS"]

# op -> number of tensor inputs; every op has exactly one output.
OPS = {"pad": 1, "reshape": 1, "permute": 1, "expand": 1, "contiguous": 1, "crop": 1, "slice": 1, "matmul": 2, "restore": 2}


@dataclass(frozen=True)
class Step:
    """One primitive: ``out = op(*inputs, *args)``.

    ops: pad (args: extra), reshape (shape; -1 marks the token dimension), permute (perm), expand (shape),
    contiguous (materialize the layout: the one place a plan copies an activation),
    crop (rows, cols: W[:rows, :cols]), slice (stop: v[..., :stop]), matmul (two inputs),
    restore (inputs y, x; args: d_out: y reshaped to x's leading dimensions + (d_out,)).
    """

    op: str
    out: str
    inputs: tuple[str, ...]
    args: tuple = ()

    def __post_init__(self):
        if self.op not in OPS:
            raise PlanError(f"unknown plan op {self.op!r}; valid: {', '.join(OPS)}")
        if len(self.inputs) != OPS[self.op]:
            raise PlanError(f"plan op {self.op!r} takes {OPS[self.op]} inputs, got {self.inputs}")


@dataclass(frozen=True)
class Plan:
    """A contraction plan for one layer signature (sizes, tokens, dtype, profile).

    Attributes:
        steps: the primitives, in order; the last step's output is y (..., d_out) without bias.
        order: "xab", "xba", "fold" or "dense".
        layout: a readable description of the intermediate layouts and where the copies are.
        time, flops, bytes, launches: predicted seconds, exact FLOPs, bytes moved and kernel launches.
        naive_time, naive_flops, naive_bytes: the same for the plain plan of `einfx.structures.functional`.
        dense_time, dense_flops: the same for x @ W.T with the folded dense weight precomputed.
        copies: number of copies (explicit or forced by a non-strided operand) the plan makes per call.
        tokens, dtype, profile: the signature the plan was made for.
        candidates: how many plans were scored.
        token_block: when > 0, the steps run on chunks of this many tokens and the outputs are concatenated,
            so that every intermediate of a chunk stays in cache (eager torch on CPU); 0 runs all tokens at once.
    """

    steps: tuple[Step, ...]
    order: str
    layout: str
    time: float
    flops: int
    bytes: int
    launches: int
    naive_time: float
    naive_flops: int
    naive_bytes: int
    dense_time: float
    dense_flops: int
    copies: int
    tokens: int
    dtype: str
    profile: str
    candidates: int = 1
    output: str = field(default="y")
    token_block: int = 0

    def __getstate__(self) -> dict:
        # the compiled code cached on the plan (einfx.planning.codegen) is rebuilt on demand, not pickled
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_einfx")}

    @property
    def speedup_vs_dense(self) -> float:
        """Predicted dense time / this plan's time."""
        return self.dense_time / self.time if self.time else float("inf")

    def describe(self) -> str:
        return (f"{self.order} [{self.layout}] predicted {self.time * 1e3:.3f} ms, {self.flops / 1e6:.2f} MFLOP, "
                f"{self.copies} copies (naive {self.naive_time * 1e3:.3f} ms, dense {self.dense_time * 1e3:.3f} ms)")


_VIEW_OPS = VIEW_OPS + ("restore",)


def _scratch_values(plan: "Plan") -> frozenset[str]:
    """Step outputs that may live in scratch memory: materialized values the plan output is not a view of."""
    cached = plan.__dict__.get("_einfx_scratch")
    if cached is None:
        cached = plan.__dict__["_einfx_scratch"] = _find_scratch_values(plan)
    return cached


def _find_scratch_values(plan: "Plan") -> frozenset[str]:
    producer = {step.out: step for step in plan.steps}
    escaping, name = set(), plan.output
    while name in producer:
        escaping.add(name)
        step = producer[name]
        # a permute (of dims > 1) or a crop makes the value strided; the output (restore) is then a copy, and
        # nothing upstream escapes
        if step.op not in _VIEW_OPS or step.op == "slice" or (
                step.op == "permute" and tuple(step.args) != tuple(range(len(step.args)))):
            break
        name = step.inputs[0]
    return frozenset(s.out for s in plan.steps if s.op in ("matmul", "contiguous", "pad") and s.out not in escaping)


def apply_step(step: Step, vals: list, env: dict):
    """The value of one plan step on torch tensors ``vals`` (its inputs), the reference interpreter."""
    a = step.args
    v = vals[0]
    if step.op == "pad":
        return F.pad(v, (0, a[0]))
    if step.op == "reshape":
        return v.reshape(a)
    if step.op == "permute":
        return v.permute(a)
    if step.op == "expand":
        return v.expand(a)
    if step.op == "contiguous":
        return v.contiguous()
    if step.op == "crop":
        return v[: a[0], : a[1]]
    if step.op == "slice":
        return v[..., : a[0]]
    if step.op == "matmul":
        return torch.matmul(v, vals[1])
    if step.op == "restore":
        return v.reshape(vals[1].shape[:-1] + (a[0],))
    raise PlanError(f"unknown plan op {step.op!r}")  # unreachable: Step validates op


def uses_scratch(x: torch.Tensor, cores: dict[str, torch.Tensor]) -> bool:
    """Whether `execute` runs on scratch memory: plain CPU tensors and no autograd graph being recorded."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or x.layout != torch.strided:
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(c.requires_grad for c in cores.values())):
        return False
    return all(type(c) in (torch.Tensor, torch.nn.Parameter) for c in cores.values())


def execute(plan: Plan, x: torch.Tensor, cores: dict[str, torch.Tensor],
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``plan`` on input ``x`` (..., d_in) with the layer's cores; returns (..., d_out) (+ ``bias``).

    The plan runs as generated straight-line code (`einfx.planning.codegen`). The result is always a fresh,
    contiguous tensor. In eager CPU inference (see `uses_scratch`) the intermediates live in this thread's
    scratch memory (`einfx.planning.workspace`) instead of fresh allocations and the bias is added in place.
    """
    fast = uses_scratch(x, cores)
    inplace = _scratch_values(plan) if fast else frozenset()
    run = compiled(plan, inplace)
    block = plan.token_block
    try:
        if block and x.dim() >= 1 and isinstance(x.numel(), int) and x.numel() // max(1, x.shape[-1]) > block:
            flat = x.reshape(-1, x.shape[-1])
            ys = [_run(run, chunk, cores, inplace) for chunk in flat.split(block)]
            y = torch.cat(ys)
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        else:
            y = _run(run, x, cores, inplace)
    except KeyError as exc:
        raise PlanError(f"plan ({plan.order}, {plan.tokens} tokens) reads core {exc.args[0]!r}, which was not "
                        f"given; given: {sorted(cores)}") from exc
    if bias is None:
        return y
    return y.add_(bias) if fast and type(bias) in (torch.Tensor, torch.nn.Parameter) else y + bias


def _run(run, x: torch.Tensor, cores: dict[str, torch.Tensor], inplace: frozenset) -> torch.Tensor:
    if not inplace:
        return run(x, cores, None)
    pad = scratch()
    y = run(x, cores, pad)
    pad.close()
    return y
