"""Plans compiled to straight-line Python: one function per (plan, scratch set), cached on the plan.

Interpreting a plan step by step (a dict of values, a dispatch on the op name) cost about 10 µs per step on
the project's host, more than the torch op itself for small layers; the generated function calls the torch
ops directly, the way torch.fx's generated ``forward`` does:

    def run(x, cores, pad):
        A = cores['A']
        B = cores['B']
        v1 = x.reshape(-1, 32, 32)
        v2 = v1.permute(1, 2, 0)
        ...
        v6 = _bmm_out(v5, v2, pad)         # a value kept in scratch memory
        ...
        v16 = _fresh(v15).reshape(x.shape[:-1] + (1024,))   # the output: contiguous, owns its memory
        return v16
"""

from __future__ import annotations

import keyword

import torch
import torch.nn.functional as F

from einfx.errors import PlanError

__all__ = ["compiled", "VIEW_OPS"]

_CACHE_KEY = "_einfx_compiled"
# ops whose output is a view of their first input (no memory of its own)
VIEW_OPS = ("reshape", "permute", "expand", "crop", "slice")


def _matmul_out(a: torch.Tensor, b: torch.Tensor, pad) -> torch.Tensor:
    if a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    if a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2]:
        shape = tuple(a.shape[:-1]) + (b.shape[-1],)
    else:
        shape = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])) + (a.shape[-2], b.shape[-1])
    return torch.matmul(a, b, out=pad.empty(shape, a))


def _bmm_out(a: torch.Tensor, b: torch.Tensor, pad) -> torch.Tensor:
    return torch.bmm(a, b, out=pad.empty((a.shape[0], a.shape[1], b.shape[2]), a))


def _mm_out(a: torch.Tensor, b: torch.Tensor, pad) -> torch.Tensor:
    return torch.mm(a, b, out=pad.empty((a.shape[0], b.shape[1]), a))


def _fresh(v: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns its memory: ``v`` is a view of scratch memory, strided in the usual case
    (``contiguous`` copies) but contiguous when a permuted dimension has size 1 (one token)."""
    return v.clone() if v.is_contiguous() else v.contiguous()


def _views_scratch(plan, name: str, scratch_values: frozenset) -> bool:
    """Whether value ``name`` is a view (through reshape/permute/expand/crop/slice) of a scratch value."""
    producer = {st.out: st for st in plan.steps}
    while name in producer:
        if name in scratch_values:
            return True
        st = producer[name]
        if st.op not in VIEW_OPS:
            return False
        name = st.inputs[0]
    return False


def _contiguous_out(v: torch.Tensor, pad) -> torch.Tensor:
    return pad.empty(tuple(v.shape), v).copy_(v)


def _pad_out(v: torch.Tensor, extra: int, pad) -> torch.Tensor:
    out = pad.empty(tuple(v.shape[:-1]) + (v.shape[-1] + extra,), v)
    out[..., : v.shape[-1]].copy_(v)
    out[..., v.shape[-1]:].zero_()
    return out


def _ranks(plan) -> dict[str, int]:
    """Ranks of the values that a reshape, permute or expand fixes (and what keeps them: copies, matmuls)."""
    rank: dict[str, int] = {}
    for st in plan.steps:
        if st.op in ("reshape", "permute", "expand"):
            rank[st.out] = len(st.args)
        elif st.op in ("contiguous", "pad", "slice") and st.inputs[0] in rank:
            rank[st.out] = rank[st.inputs[0]]
        elif st.op == "matmul" and st.inputs[0] in rank and st.inputs[1] in rank:
            rank[st.out] = max(rank[st.inputs[0]], rank[st.inputs[1]])
    return rank


def _matmul_kind(step, rank: dict[str, int]) -> str:
    """"bmm" or "mm" when both operands' ranks are known to be 3 or 2 (a cheaper call than matmul's
    broadcasting dispatch: 4 µs against 10 µs on the project's host), else "matmul"."""
    ranks = {rank.get(step.inputs[0]), rank.get(step.inputs[1])}
    return {frozenset({3}): "bmm", frozenset({2}): "mm"}.get(frozenset(ranks), "matmul")


def _expr(step, scratch: bool, kind: str = "matmul") -> str:
    ins, a = step.inputs, step.args
    v = ins[0]
    if scratch:
        if step.op == "matmul":
            return f"_{kind}_out({v}, {ins[1]}, pad)"
        if step.op == "contiguous":
            return f"_contiguous_out({v}, pad)"
        return f"_pad_out({v}, {int(a[0])}, pad)"
    if step.op == "pad":
        return f"F.pad({v}, (0, {int(a[0])}))"
    if step.op in ("reshape", "permute", "expand"):
        # ints as separate arguments: torch parses them about 1 µs faster than one tuple
        return f"{v}.{step.op}({', '.join(str(int(i)) for i in a) if a else '()'})"
    if step.op == "contiguous":
        return f"{v}.contiguous()"
    if step.op == "crop":
        return f"{v}[:{int(a[0])}, :{int(a[1])}]"
    if step.op == "slice":
        return f"{v}[..., :{int(a[0])}]"
    if step.op == "matmul":
        return f"torch.{kind}({v}, {ins[1]})"
    # restore: the output is made contiguous, as nn.Linear's is (an output permute that merges into a 2-D
    # transpose, or a crop, would otherwise leave a strided view for the consumer to pay for)
    return f"{v}.contiguous().reshape({ins[1]}.shape[:-1] + ({int(a[0])},))"


def _name_ok(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and name not in _GLOBALS \
        and name not in ("pad", "cores")


_GLOBALS = {"torch": torch, "F": F, "_matmul_out": _matmul_out, "_bmm_out": _bmm_out, "_mm_out": _mm_out,
            "_contiguous_out": _contiguous_out, "_fresh": _fresh, "_pad_out": _pad_out}


def compiled(plan, scratch_values: frozenset = frozenset()):
    """The plan as a function ``run(x, cores: dict, pad)`` returning a contiguous output.

    ``pad`` is a `Scratch` when ``scratch_values`` is not empty.

    Raises:
        PlanError: a step reads a value that no earlier step wrote, or a value name is not an identifier.
    """
    cache = plan.__dict__.setdefault(_CACHE_KEY, {})
    key = scratch_values
    fn = cache.get(key)
    if fn is not None:
        return fn
    defined = {"x"}
    cores = sorted({i for s in plan.steps for i in s.inputs} - {s.out for s in plan.steps} - {"x"})
    defined.update(cores)
    rank = _ranks(plan)
    lines = ["def run(x, cores, pad):"]
    lines += [f"    {c} = cores[{c!r}]" for c in cores]
    for step in plan.steps:
        for name in step.inputs + (step.out,):
            if not _name_ok(name):
                raise PlanError(f"plan step {step}: value name {name!r} is not a plain identifier")
        missing = [i for i in step.inputs if i not in defined]
        if missing and any(i in {s.out for s in plan.steps} for i in missing):
            raise PlanError(f"plan step {step} reads {missing[0]!r}, which no earlier step wrote; "
                            f"available: {sorted(defined)}")
        kind = _matmul_kind(step, rank) if step.op == "matmul" else "matmul"
        expr = _expr(step, step.out in scratch_values, kind)
        if step.op == "restore" and _views_scratch(plan, step.inputs[0], scratch_values):
            expr = f"_fresh({step.inputs[0]}).reshape({step.inputs[1]}.shape[:-1] + ({int(step.args[0])},))"
        lines.append(f"    {step.out} = {expr}")
        defined.add(step.out)
    if plan.output not in defined:
        raise PlanError(f"plan output {plan.output!r} is written by no step; available: {sorted(defined)}")
    lines.append(f"    return {plan.output}")
    namespace = dict(_GLOBALS)
    exec(compile("\n".join(lines), f"<einfx plan {plan.order} {plan.tokens}>", "exec"), namespace)  # noqa: S102
    fn = cache[key] = namespace["run"]
    return fn
