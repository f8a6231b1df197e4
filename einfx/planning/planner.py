"""The planner: enumerate contraction orders and intermediate layouts of a structured layer, score each with
the cost model, return the cheapest as a frozen `Plan`. A pure function of (sizes, tokens, dtype, profile),
cached per signature.

Orders: x·A then ·B ("xab"), x·B then ·A ("xba"), and A·B folded into a dense W first ("fold").
Per GEMM step the choices are: which side the activation sits on (C or Cᵀ is computed, so the result comes
out as [batch, rows, cols] or [batch, cols, rows]); the order of the core's free indices in the result (so the
next GEMM can read it through a strided view); which activation-only indices ride along as batch indices (the
core is broadcast over them instead of forcing a copy). An activation that a GEMM cannot read as a strided
(batch, rows, cols) matrix with a unit inner stride is charged a copy; on backends without strided GEMM
(onnxruntime) every non-identity permute is a copy. The final permute to y[n, φ, ε, δ] is charged too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from functools import lru_cache

from einfx.errors import PlanError
from einfx.planning.costmodel import ZERO, PrimCost, copy_cost, gemm_cost, view_cost
from einfx.planning.plan import Plan, Step
from einfx.planning.profile import DeviceProfile, default_profile
from einfx.structures.sizes import Sizes

__all__ = ["plan_layer", "plan_for", "all_plans", "dense_cost", "ORDERS_ALL", "dtype_name", "PLAN_TIE",
           "activation_permutes"]

ORDERS_ALL = ("xab", "xba", "fold")
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
# Storage order of the cores (sizes.py) and of the input / output.
_A_LAYOUT, _B_LAYOUT = ("f", "d", "r", "g", "a"), ("f", "e", "r", "g", "b")
_X_LAYOUT, _Y_LAYOUT = ("n", "g", "b", "a"), ("n", "f", "e", "d")
_LETTER = {"n": "N", "a": "α", "b": "β", "g": "γ", "d": "δ", "e": "ε", "f": "φ", "r": "ρ"}


def dtype_name(dtype) -> str:
    """``"float32"`` for torch.float32 or "float32"; raise `PlanError` for other dtypes."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise PlanError(f"no plan for dtype {name!r}; valid: {', '.join(_ITEMSIZE)}")
    return name


class _Builder:
    """Accumulates steps and cost for one candidate plan."""

    def __init__(self, profile: DeviceProfile):
        self.steps: list[Step] = []
        # an eager layer call costs call_s beyond its steps; exported graphs (onnxruntime) do not
        self.cost: PrimCost = PrimCost(time=profile.call_s) if profile.strided_gemm else ZERO
        self.copies = 0
        self.notes: list[str] = []
        self.profile = profile
        self._k = 0

    def add(self, op: str, inputs: tuple[str, ...], args: tuple = (), *, cost: PrimCost | None = None) -> str:
        self._k += 1
        out = f"v{self._k}"
        self.steps.append(Step(op, out, inputs, tuple(args)))
        if cost is not None:
            self.cost = self.cost + cost
        elif op in ("reshape", "permute", "expand"):
            self.cost = self.cost + view_cost(self.profile)
        return out

    def copy(self, elements: int, itemsize: int, run: int, note: str, block: int | None = None) -> None:
        self.cost = self.cost + copy_cost(elements, itemsize, run, self.profile, block)
        self.copies += 1
        self.notes.append(note)


def _groups_mergeable(layout: tuple[str, ...], groups) -> bool:
    for group in groups:
        if group:
            pos = [layout.index(i) for i in group]
            if pos != list(range(pos[0], pos[0] + len(pos))):
                return False
    return True


def _run(src, dst, sz) -> int:
    """Elements that stay contiguous when a tensor stored as ``src`` is copied into layout ``dst``."""
    run = 1
    for a, b in zip(reversed(src), reversed(dst)):
        if a != b:
            break
        run *= sz[a] if a != "n" else 1 << 20
    return run


def _slab(src, dst, sz) -> int:
    """Elements of the blocks a copy permutes within: the indices after the outer ones that the source and
    the destination share, in order. Blocks that fit in cache are transposed at block bandwidth
    (``block`` in `copy_cost`)."""
    common = 0
    while common < min(len(src), len(dst)) and src[common] == dst[common]:
        common += 1
    return math.prod(sz[i] for i in src[common:])


def _fast_strided(inner: str, m, k, side: str, profile: DeviceProfile) -> bool:
    """Whether a GEMM reads a strided activation (innermost index ``inner``) without a copy.

    Any operand whose rows or columns have unit stride: cuBLAS strided-batched GEMM and MKL (through torch's
    bmm) take it as a transposed operand. Measured on CPU (d = 1024, 512 tokens, scratch memory): a left
    operand with unit stride along M ran 1.4x slower than a contiguous one, a strided right operand 1.15x,
    against 3-4x for a copy plus the GEMM. (Without scratch memory, when every copy also page-faulted, this
    used to look the other way round.)
    """
    return inner in m or inner in k


def _shape(indices, sz) -> tuple[int, ...]:
    return tuple(-1 if i == "n" else sz[i] for i in indices)


def _group_shape(groups, sz) -> tuple[int, ...]:
    return tuple(-1 if "n" in g else math.prod(sz[i] for i in g) for g in groups)


# group permutations (target[i] = source[perm[i]]) that onnxruntime fuses into FusedMatMul without a copy
_ORT_FUSABLE = {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0)}


class _Skip(Exception):
    """A candidate that does not apply (or duplicates another one)."""


def _note(src, dst) -> str:
    return f"copy {''.join(_LETTER[i] for i in src)}→{''.join(_LETTER[i] for i in dst)}"


def _staged_copy(b: _Builder, v: str, p_layout, bt, k, sz, itemsize: int) -> str:
    """Relayout to (N, batch, K) in two cache-friendly copies: move N outermost (long contiguous runs), then
    shuffle inside each token's block; the GEMM then reads (batch, N, K) as a strided view."""
    elems = math.prod(sz[i] for i in p_layout)
    block = elems // sz["n"]
    layout = tuple(p_layout)
    if layout[0] != "n":
        first = ("n",) + tuple(i for i in layout if i != "n")
        v = b.add("contiguous", (b.add("permute", (v,), tuple(layout.index(i) for i in first)),), cost=ZERO)
        b.copy(elems, itemsize, _run(layout, first, sz), _note(layout, first))
        layout = first
    second = ("n",) + tuple(bt) + tuple(k)
    if second != layout:
        v = b.add("contiguous", (b.add("permute", (v,), tuple(layout.index(i) for i in second)),), cost=ZERO)
        b.copy(elems, itemsize, _run(layout, second, sz), _note(layout, second) + " per token", block)
    return b.add("permute", (v,), tuple(second.index(i) for i in tuple(bt) + ("n",) + tuple(k)))


def _gemm_step(b: _Builder, pname: str, p_layout, core: str, q_layout, batch, contract, p_free, q_free, sz,
               itemsize: int, dtype: str, *, moved, side: str, q_order, staged: bool = False):
    """Append one GEMM step; return (output value, output layout). ``staged``: relayout via `_staged_copy`."""
    prof = b.profile
    bt = [i for i in p_layout if i in batch or i in moved]
    m = [i for i in p_layout if i in p_free and i not in moved]
    k = [i for i in p_layout if i in contract]
    target = bt + (m + k if side == "left" else k + m)
    perm = tuple(p_layout.index(i) for i in target)
    tokens_elems = math.prod(sz[i] for i in p_layout)
    pgroups = (bt, m, k) if side == "left" else (bt, k, m)
    mergeable = _groups_mergeable(p_layout, (bt, m, k))
    # group-level view: the three groups in storage order (empty groups first, as size-1 dims)
    order = sorted(range(3), key=lambda i: p_layout.index(pgroups[i][0]) if pgroups[i] else -1)
    src_groups = [pgroups[i] for i in order]
    gperm = tuple(order.index(i) for i in range(3))
    if prof.strided_gemm:
        strided_ok = mergeable and _fast_strided(p_layout[-1], m, k, side, prof)
    else:  # onnxruntime folds these Transposes into FusedMatMul (transA/transB, transBatchA/transBatchB)
        strided_ok = mergeable and gperm in _ORT_FUSABLE
    needs_copy = perm != tuple(range(len(perm))) and not strided_ok
    if staged:
        if not (needs_copy and prof.strided_gemm and side == "left" and m == ["n"] and k):
            raise _Skip
        v = _staged_copy(b, b.add("reshape", (pname,), _shape(p_layout, sz)), p_layout, bt, k, sz, itemsize)
        v = b.add("reshape", (v,), _group_shape(pgroups, sz))
    elif mergeable:
        # (batch, rows, cols) as one 3-D permute: a strided view in torch, a FusedMatMul input in onnxruntime
        v = b.add("reshape", (pname,), _group_shape(src_groups, sz))
        if gperm != (0, 1, 2):
            v = b.add("permute", (v,), gperm)
    else:
        v = b.add("permute", (b.add("reshape", (pname,), _shape(p_layout, sz)),), perm)
    if needs_copy and not staged:
        b.copy(tokens_elems, itemsize, _run(p_layout, target, sz), _note(p_layout, target),
               _slab(p_layout, target, sz))
        if prof.strided_gemm:  # torch would read the strided view slowly (or not at all): copy it now
            v = b.add("contiguous", (v,), cost=ZERO)
    if not mergeable and not staged:
        v = b.add("reshape", (v,), _group_shape(pgroups, sz))
    # the core: drop size-1 dims, permute to [batch, K, free] or [batch, free, K], broadcast over `moved`
    q_kept = [i for i in q_layout if i in sz and sz[i] > 1]
    q_target = [i for i in bt if i not in moved] + (k + list(q_order) if side == "left" else list(q_order) + k)
    c = b.add("reshape", (core,), tuple(sz[i] for i in q_kept))
    qperm = tuple(q_kept.index(i) for i in q_target)
    core_elems = math.prod(sz[i] for i in q_kept)
    if qperm != tuple(range(len(qperm))):
        c = b.add("permute", (c,), qperm)
    full = bt + q_target[len([i for i in bt if i not in moved]):]
    if moved:
        c = b.add("reshape", (c,), tuple(1 if i in moved else sz[i] for i in full))
        c = b.add("expand", (c,), tuple(sz[i] for i in full))
    if moved or qperm != tuple(range(len(qperm))):
        b.cost = b.cost + copy_cost(core_elems * math.prod(sz[i] for i in moved), itemsize, 1 << 20, prof)
    qgroups = (bt, k, list(q_order)) if side == "left" else (bt, list(q_order), k)
    c = b.add("reshape", (c,), _group_shape(qgroups, sz))
    out = b.add("matmul", (v, c) if side == "left" else (c, v), cost=ZERO)
    size = lambda idx: math.prod(sz[i] for i in idx)  # noqa: E731
    gemm = gemm_cost(size(bt), size(m), size(q_order), size(k), itemsize, dtype, prof)
    # a left operand read through a transposed view (unit stride along its rows); measured on CPU, a right
    # operand with a unit-stride contraction index runs at nearly full speed (1.15x), so it is not charged
    if prof.strided_gemm and not needs_copy and not staged and side == "left" and p_layout[-1] in m:
        gemm = replace(gemm, time=gemm.time * prof.transposed_read)
    b.cost = b.cost + gemm
    return out, tuple(bt + (m + list(q_order) if side == "left" else list(q_order) + m))


def _finish(b: _Builder, yname: str, y_layout, sizes: Sizes, sz, itemsize: int) -> str:
    target = [i for i in _Y_LAYOUT if i == "n" or sz[i] > 1]
    perm = tuple(y_layout.index(i) for i in target)
    elems = math.prod(sz[i] for i in y_layout)
    v = b.add("reshape", (yname,), _shape(y_layout, sz))
    if perm != tuple(range(len(perm))):
        v = b.add("permute", (v,), perm)
        b.copy(elems, itemsize, _run(y_layout, target, sz), _note(y_layout, target), _slab(y_layout, target, sz))
    v = b.add("reshape", (v,), (-1, sizes.out_padded))
    if sizes.out_padded != sizes.d_out:
        v = b.add("slice", (v,), (sizes.d_out,), cost=view_cost(b.profile))
        b.copy(sz["n"] * sizes.d_out, itemsize, sizes.d_out, "crop output")
    return b.add("restore", (v, "x"), (sizes.d_out,))


def _token_plans(sizes: Sizes, order: str, sz: dict, itemsize: int, dtype: str, profile: DeviceProfile,
                 naive: bool):
    """Yield (builder, layout text) for every candidate of a token order (only the plain one if naive)."""
    first, second = ("A", "B") if order == "xab" else ("B", "A")
    lay = {"A": _A_LAYOUT, "B": _B_LAYOUT}
    # x·A contracts α over γ; the free indices of A are (φ, δ, ρ); then B contracts (γ, β, ρ) over φ.
    own_in, other_in = ("a", "b") if first == "A" else ("b", "a")
    own_out, other_out = ("d", "e") if first == "A" else ("e", "d")
    keep = lambda idx: [i for i in idx if i == "n" or sz[i] > 1]  # noqa: E731
    x_layout = tuple(keep(_X_LAYOUT))
    q1_free = keep(("f", own_out, "r"))
    q1_orders = [tuple(q1_free)] if naive else list(itertools.permutations(q1_free))
    p1_opt = [i for i in keep((other_in,))]
    p2_opt = [i for i in keep((own_out,))]
    subsets = lambda opt: [()] if naive else [s for r in range(len(opt) + 1) for s in itertools.combinations(opt, r)]  # noqa: E731,E501
    sides = ("left",) if naive else ("left", "right")
    stages = (False,) if naive else (False, True)
    for mv1, side1, qo1, st1, mv2, side2, st2 in itertools.product(subsets(p1_opt), sides, q1_orders, stages,
                                                                   subsets(p2_opt), sides, stages):
        b = _Builder(profile)
        x = "x"
        if sizes.in_padded != sizes.d_in:
            x = b.add("pad", (x,), (sizes.in_padded - sizes.d_in,), cost=ZERO)
            b.copy(sz["n"] * sizes.in_padded, itemsize, sizes.d_in, "pad input")
        try:
            t, t_layout = _gemm_step(b, x, x_layout, first, lay[first], {"g"}, {own_in}, {"n", other_in},
                                     q1_free, sz, itemsize, dtype, moved=mv1, side=side1, q_order=qo1, staged=st1)
            y, y_layout = _gemm_step(b, t, t_layout, second, lay[second], {"f"}, {"g", other_in, "r"},
                                     {"n", own_out}, keep((other_out,)), sz, itemsize, dtype, moved=mv2,
                                     side=side2, q_order=tuple(keep((other_out,))), staged=st2)
        except _Skip:
            continue
        _finish(b, y, y_layout, sizes, sz, itemsize)
        text = (f"{'·'.join(_LETTER[i] for i in t_layout)} | {'·'.join(_LETTER[i] for i in y_layout)}"
                + (f"; {', '.join(b.notes)}" if b.notes else "; no copies"))
        yield b, text


def _fold_plan(sizes: Sizes, sz: dict, itemsize: int, dtype: str, profile: DeviceProfile) -> _Builder:
    s = sizes
    f, d, r, g, a, bb, e = s.phi, s.delta, s.rho, s.gamma, s.alpha, s.beta, s.epsilon
    b = _Builder(profile)
    bm = b.add("reshape", (b.add("permute", ("B",), (0, 3, 1, 4, 2)),), (f * g, e * bb, r))
    am = b.add("reshape", (b.add("permute", ("A",), (0, 3, 2, 1, 4)),), (f * g, r, d * a))
    b.copy(math.prod(s.a_shape) + math.prod(s.b_shape), itemsize, 1, "core relayout")
    w = b.add("matmul", (bm, am), cost=gemm_cost(f * g, e * bb, d * a, r, itemsize, dtype, profile))
    w = b.add("permute", (b.add("reshape", (w,), (f, g, e, bb, d, a)),), (0, 2, 4, 1, 3, 5))
    w = b.add("reshape", (w,), (s.out_padded, s.in_padded))
    b.copy(s.out_padded * s.in_padded, itemsize, a, "fold W")
    if (s.out_padded, s.in_padded) != (s.d_out, s.d_in):
        w = b.add("crop", (w,), (s.d_out, s.d_in), cost=view_cost(profile))
    _dense_matmul(b, w, s, sz["n"], itemsize, dtype)
    return b


def _dense_matmul(b: _Builder, w: str, s: Sizes, tokens: int, itemsize: int, dtype: str) -> str:
    wt = b.add("permute", (w,), (1, 0))
    if not b.profile.strided_gemm:
        b.copy(s.d_in * s.d_out, itemsize, 1, "transpose W")
    return b.add("matmul", ("x", wt), cost=gemm_cost(1, tokens, s.d_out, s.d_in, itemsize, dtype, b.profile))


def dense_cost(d_in: int, d_out: int, tokens: int, dtype="float32", profile: DeviceProfile | None = None) -> PrimCost:
    """Predicted cost of x @ W.T for a dense (d_out, d_in) weight (the fold-to-dense alternative)."""
    profile = profile or default_profile("cpu")
    return gemm_cost(1, tokens, d_out, d_in, _ITEMSIZE[dtype_name(dtype)], dtype_name(dtype), profile)


@lru_cache(maxsize=2048)
def plan_layer(sizes: Sizes, tokens: int, dtype: str = "float32", profile: DeviceProfile | None = None,
               orders: tuple[str, ...] = ORDERS_ALL) -> Plan:
    """The cheapest plan for a layer of ``sizes`` over ``tokens`` input vectors (cached per signature); for a
    graph backend (a profile without free strided views), the plan with the fewest activation permutes among
    those predicted within `PLAN_TIE` of the cheapest.

    Args:
        sizes: resolved layer sizes (``EinsumLinear.sizes``).
        tokens: number of input vectors (product of the leading dimensions of x).
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``.
        profile: device profile (default: the built-in CPU profile).
        orders: the orders allowed, a subset of ``ORDERS_ALL`` (dense layers ignore it).
    """
    profile = profile or default_profile("cpu")
    dtype = dtype_name(dtype)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise PlanError(f"tokens must be a positive integer, got {tokens!r}")
    bad = [o for o in orders if o not in ORDERS_ALL]
    if bad or not orders:
        raise PlanError(f"unknown contraction orders {bad or orders!r}; valid: {', '.join(ORDERS_ALL)}")
    itemsize = _ITEMSIZE[dtype]
    dense = dense_cost(sizes.d_in, sizes.d_out, tokens, dtype, profile)
    if sizes.dense:
        b = _Builder(profile)
        _dense_matmul(b, "weight", sizes, tokens, itemsize, dtype)
        return _make(b, "dense", "x·Wᵀ", b, dense, tokens, dtype, profile, 1)
    sz = dict(n=tokens, a=sizes.alpha, b=sizes.beta, g=sizes.gamma, d=sizes.delta, e=sizes.epsilon,
              f=sizes.phi, r=sizes.rho)
    naive_order = sizes.best_token_order()
    naive, _ = next(_token_plans(sizes, naive_order, sz, itemsize, dtype, profile, naive=True))
    scored = []
    for order in orders:
        if order == "fold":
            cands = [(_fold_plan(sizes, sz, itemsize, dtype, profile), "fold A·B to W, then x·Wᵀ")]
        else:
            cands = _token_plans(sizes, order, sz, itemsize, dtype, profile, naive=False)
        for b, text in cands:
            # ties: fewer FLOPs, then fewer copies, then enumeration order (deterministic)
            scored.append(((b.cost.time, b.cost.flops, b.copies, len(scored)), b, order, text))
    fastest = min(key[0] for key, *_ in scored)
    _, b, order, text = min(scored, key=lambda c: _choice_key(c[0], c[1], fastest, profile))
    plan = _make(b, order, text, naive, dense, tokens, dtype, profile, len(scored))
    return _blocked(plan, sizes, tokens, dtype, profile, orders) or plan


# Graph backends: plans predicted within this fraction of the best time are ties, below the cost model's
# resolution, and the one with the fewest activation permutes is taken. Each such permute is a Transpose node
# of the exported graph, which the model prices as a free operand flag of the GEMM that reads it; runtimes
# that cannot fuse it there (OpenVINO, unless it swaps the last two axes) run it as a copy.
PLAN_TIE = 0.03


def activation_permutes(steps) -> int:
    """Permute steps of a plan that move the activation (x or a value computed from it), identities aside."""
    live = {"x"}
    count = 0
    for step in steps:
        if any(i in live for i in step.inputs):
            live.add(step.out)
            if step.op == "permute" and tuple(step.args) != tuple(range(len(step.args))):
                count += 1
    return count


def _choice_key(key: tuple, b: _Builder, fastest: float, profile: DeviceProfile) -> tuple:
    """Order of the candidates: by ``key`` (time, FLOPs, copies, enumeration) on eager backends; on graph
    backends, the candidates within `PLAN_TIE` of the ``fastest`` time first, fewest activation permutes among
    them."""
    if profile.strided_gemm:
        return key
    if key[0] <= fastest * (1 + PLAN_TIE):
        return (0, activation_permutes(b.steps)) + key
    return (1, 0) + key


# Token blocks tried for eager CPU execution: powers of two from MIN_TOKEN_BLOCK up to half the tokens.
MIN_TOKEN_BLOCK = 16
# Blocking must be predicted this much faster than the whole-batch plan: each chunk re-issues every step
# from Python and runs smaller, less efficient GEMMs, which the per-step constants only partly capture.
BLOCK_GAIN = 0.9


def _blocked(plan: Plan, sizes: Sizes, tokens: int, dtype: str, profile: DeviceProfile,
             orders: tuple[str, ...]) -> Plan | None:
    """The plan run on chunks of tokens (each chunk's intermediates stay in cache), when predicted faster.

    Only for eager torch on CPU (a strided-GEMM backend): the chunks run one after another and their
    outputs are concatenated (one extra copy of y). Exported graphs keep whole-batch plans.
    """
    if profile.device != "cpu" or not profile.strided_gemm or plan.order not in ("xab", "xba"):
        return None
    itemsize = _ITEMSIZE[dtype]
    concat = copy_cost(tokens * sizes.d_out, itemsize, sizes.d_out, profile).time
    best = None
    block = MIN_TOKEN_BLOCK
    while block * 2 <= tokens:
        sub = plan_layer(sizes, block, dtype, profile, tuple(o for o in orders if o != "fold") or orders)
        if sub.order in ("xab", "xba") and not sub.token_block:
            chunks = -(-tokens // block)
            call = profile.call_s if profile.strided_gemm else 0.0
            time = chunks * (sub.time - call) + call + concat + chunks * profile.view_s
            if time < BLOCK_GAIN * plan.time and (best is None or time < best[0]):
                best = (time, block, sub)
        block *= 2
    if best is None:
        return None
    time, block, sub = best
    return replace(sub, time=time, flops=sub.flops // block * tokens, bytes=sub.bytes // block * tokens,
                   launches=sub.launches * -(-tokens // block) + 1, naive_time=plan.naive_time,
                   naive_flops=plan.naive_flops, naive_bytes=plan.naive_bytes, dense_time=plan.dense_time,
                   dense_flops=plan.dense_flops, tokens=tokens, candidates=plan.candidates,
                   layout=f"{sub.layout}; in chunks of {block} tokens", token_block=block)


def all_plans(sizes: Sizes, tokens: int, dtype: str = "float32", profile: DeviceProfile | None = None) -> list[Plan]:
    """Every candidate plan the planner scores for a structured layer (for tests and reports), unsorted."""
    profile = profile or default_profile("cpu")
    dtype = dtype_name(dtype)
    itemsize = _ITEMSIZE[dtype]
    if sizes.dense:
        return [plan_layer(sizes, tokens, dtype, profile)]
    dense = dense_cost(sizes.d_in, sizes.d_out, tokens, dtype, profile)
    sz = dict(n=tokens, a=sizes.alpha, b=sizes.beta, g=sizes.gamma, d=sizes.delta, e=sizes.epsilon,
              f=sizes.phi, r=sizes.rho)
    naive, _ = next(_token_plans(sizes, sizes.best_token_order(), sz, itemsize, dtype, profile, naive=True))
    out = [_make(_fold_plan(sizes, sz, itemsize, dtype, profile), "fold", "fold", naive, dense, tokens, dtype,
                 profile, 1)]
    for order in ("xab", "xba"):
        for b, text in _token_plans(sizes, order, sz, itemsize, dtype, profile, naive=False):
            out.append(_make(b, order, text, naive, dense, tokens, dtype, profile, 1))
    return out


def plain_plans(sizes: Sizes, tokens: int, dtype: str = "float32", profile: DeviceProfile | None = None) -> list[Plan]:
    """The plain plan of each order (the token-major layouts of `einfx.structures.functional`: x·A then ·B,
    x·B then ·A, each GEMM reading its activation as rows): for low-rank, two MatMuls against pre-transposed
    constant cores. A measured tuner times them beside the cost model's favourites."""
    profile = profile or default_profile("cpu")
    dtype = dtype_name(dtype)
    if sizes.dense:
        return [plan_layer(sizes, tokens, dtype, profile)]
    itemsize = _ITEMSIZE[dtype]
    dense = dense_cost(sizes.d_in, sizes.d_out, tokens, dtype, profile)
    sz = dict(n=tokens, a=sizes.alpha, b=sizes.beta, g=sizes.gamma, d=sizes.delta, e=sizes.epsilon,
              f=sizes.phi, r=sizes.rho)
    out = []
    for order in ("xab", "xba"):
        for b, text in _token_plans(sizes, order, sz, itemsize, dtype, profile, naive=True):
            out.append(_make(b, order, text, b, dense, tokens, dtype, profile, 1))
            break
    return out


def _make(b: _Builder, order, text, naive: _Builder, dense: PrimCost, tokens, dtype, profile, count) -> Plan:
    return Plan(steps=tuple(b.steps), order=order, layout=text, time=b.cost.time, flops=b.cost.flops,
                bytes=b.cost.bytes, launches=b.cost.launches, naive_time=naive.cost.time,
                naive_flops=naive.cost.flops, naive_bytes=naive.cost.bytes, dense_time=dense.time,
                dense_flops=dense.flops, copies=b.copies, tokens=tokens, dtype=dtype, profile=profile.name,
                candidates=count, output=b.steps[-1].out)


def plan_for(layer, tokens: int, dtype=None, profile: DeviceProfile | None = None, orders=None) -> Plan:
    """`plan_layer` for an `EinsumLinear` (dtype defaults to its parameters', orders to its pinned order)."""
    param = next(iter(layer.cores().values()))
    dtype = dtype_name(dtype if dtype is not None else param.dtype)
    if orders is None:
        pinned = getattr(layer, "order", "auto")
        orders = (pinned,) if pinned in ORDERS_ALL else ORDERS_ALL
    try:
        return plan_layer(layer.sizes, int(tokens), dtype, profile, tuple(orders))
    except PlanError as exc:
        raise PlanError(f"layer {layer.name or type(layer).__name__}: {exc}") from exc

