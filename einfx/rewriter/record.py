"""The recording front end: run the model once on its example inputs and watch every parameter.

A graph tracer must understand all of a model's forward code; recording needs only to run it. Under a
`torch.overrides.TorchFunctionMode` and forward hooks on every module, one eager call records

- how often each module was called, and with which arguments (``nn.MultiheadAttention``: is it
  self-attention, are there masks);
- every torch function that read a parameter (or a view of one: ``t``, ``T``, ``transpose``, ...), and
  which module's forward was running when it did.

So it sees inside code that graph tracers keep opaque (torchvision's ``shifted_window_attention`` reads
``qkv.weight`` through ``F.linear``), and it works on Hugging Face models in their default configuration
(KV cache, ``ModelOutput``, keyword-only calls) because nothing is traced.

From the record, `record_candidates` lists every linear computation:

    nn.Linear / Conv1D whose weight only its own forward reads   -> site "module"   (swap the submodule)
    nn.MultiheadAttention                                        -> site "mha"      (in_proj + out_proj)
    a weight read by F.linear / matmul in other forward code     -> site "function" (needs a graph)
    a weight also read elsewhere (embedding, another op)         -> objection "weight used elsewhere"

Reading only metadata (``.dtype``, ``.device``, ``.shape``, ``size()``) is not a use.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from einfx.rewriter.attention import mha_objection
from einfx.rewriter.detect import Candidate, _layer_name, _type_names
from einfx.rewriter.heads import HeadWatch
from einfx.rewriter.trace import is_conv1d
from einfx.layers.linear import EinsumLinear

__all__ = ["Use", "Recording", "record", "record_candidates", "linear_modules"]

_F = torch.nn.functional
# Functions computing x·W with a weight operand, and where the weight sits: "linear" takes W (d_out, d_in),
# "right" takes M = Wᵀ as the right operand.
_LINEAR_FNS = {_F.linear: "linear", torch._C._nn.linear: "linear"}
_RIGHT_FNS = {torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__,
              torch.Tensor.bmm}
_ADDMM_FNS = {torch.addmm, torch.Tensor.addmm}
_TRANSPOSE_FNS = {torch.t, torch.Tensor.t, torch.transpose, torch.Tensor.transpose, torch.permute,
                  torch.Tensor.permute, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
_META_NAMES = {"size", "dim", "numel", "__len__", "is_floating_point", "element_size",
               "data_ptr", "is_contiguous", "requires_grad_", "has_names", "_is_view", "stride"}


@dataclass(frozen=True)
class Use:
    """One torch function call that read a parameter.

    Attributes:
        module: path of the innermost module whose forward was running ("" for the root).
        fn: the function's name (``linear``, ``matmul``, ``embedding``, ...).
        linear: the call computes x·W with the parameter as its weight operand.
        transposed: for a linear use, W = parameterᵀ (``x @ P``); ``None`` when the orientation is unknown.
    """

    module: str
    fn: str
    linear: bool = False
    transposed: bool | None = None


@dataclass(frozen=True)
class Recording:
    """What one eager call showed: module calls, parameter uses, and self-attention checks.

    Attributes:
        calls: module path -> number of forward calls.
        uses: parameter path -> the calls that read it (metadata reads excluded).
        mha: ``nn.MultiheadAttention`` path -> why its call cannot be decomposed, or ``None``.
        groups: linear module path -> its (input, output) feature groups (`einfx.rewriter.heads`), where seen.
    """

    calls: Mapping[str, int] = field(default_factory=dict)
    uses: Mapping[str, tuple[Use, ...]] = field(default_factory=dict)
    mha: Mapping[str, str | None] = field(default_factory=dict)
    groups: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def _fn_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "attribute")
    return name


class _Watcher(TorchFunctionMode):
    """Records each call whose arguments hold a parameter (or a view of one we saw made)."""

    def __init__(self, params: Mapping[int, str], stack: list[str], heads: HeadWatch):
        super().__init__()
        self.params = params
        self.stack = stack
        self.heads = heads
        # views of parameters made during the call: id -> (path, flipped, the view kept alive)
        self.views: dict[int, tuple[str, bool | None, torch.Tensor]] = {}
        self.uses: dict[str, list[Use]] = defaultdict(list)

    def _source(self, value) -> tuple[str, bool | None] | None:
        if not isinstance(value, torch.Tensor):
            return None
        path = self.params.get(id(value))
        if path is not None:
            return path, False
        view = self.views.get(id(value))
        return (view[0], view[1]) if view is not None else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.heads.observe(func, args, out)
        leaves = pytree.tree_leaves((args, kwargs))
        sources = [(i, s) for i, s in enumerate(map(self._source, leaves)) if s is not None]
        if not sources:
            return out
        name = _fn_name(func)
        where = self.stack[-1] if self.stack else ""
        first = self._source(args[0]) if args else None
        if first is not None and isinstance(out, torch.Tensor) and _shares_storage(out, args[0]):
            # a view of a parameter: remember it (and whether it swaps the two matrix axes)
            flipped = None
            if func in _TRANSPOSE_FNS and args[0].dim() == 2:
                flipped = not first[1] if first[1] is not None else None
            elif args[0].shape == out.shape and func not in _TRANSPOSE_FNS:
                flipped = first[1]
            self.views[id(out)] = (first[0], flipped, out)
            return out
        if name in _META_NAMES or (getattr(func, "__name__", "") == "__get__" and func not in _TRANSPOSE_FNS):
            return out  # metadata (size, dtype, device, ...): not a use of the values
        for _, (path, flipped) in sources:
            self.uses[path].append(self._use(func, name, where, args, path, flipped))
        return out

    def _use(self, func, name, where, args, path, flipped) -> Use:
        def operand(i):
            return self._source(args[i]) if len(args) > i else None

        if func in _LINEAR_FNS and operand(1) is not None and operand(1)[0] == path:
            return Use(where, name, True, flipped)
        if func in _RIGHT_FNS and operand(1) is not None and operand(1)[0] == path and operand(0) is None:
            return Use(where, name, True, None if flipped is None else not flipped)
        if func in _ADDMM_FNS and operand(2) is not None and operand(2)[0] == path and operand(1) is None:
            return Use(where, name, True, None if flipped is None else not flipped)
        return Use(where, name)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.device == b.device
    except RuntimeError:  # tensors without storage (meta, functional wrappers)
        return False


def _mha_check(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> str | None:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
    masked = bound.get("key_padding_mask") is not None or bound.get("attn_mask") is not None or bool(
        bound.get("is_causal"))
    why = mha_objection(module, q is k is v, masked)
    if why is not None:
        return why
    if q.dim() != 3:
        return f"unbatched input of shape {tuple(q.shape)}: einfx's attention decomposition takes batched inputs"
    return None


@torch.no_grad()
def record(model: nn.Module, args: tuple = (), kwargs: Mapping | None = None) -> Recording:
    """Run ``model(*args, **kwargs)`` once and record module calls and parameter uses.

    The model's outputs are discarded; its parameters and buffers are not changed (batch-norm running
    statistics are restored when the model is in training mode).
    """
    params: dict[int, str] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), path)
    stack: list[str] = []
    calls: Counter = Counter()
    mha: dict[str, str | None] = {}
    names = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
    handles = []

    def pre(module, a, kw):
        path = names.get(id(module), "?")
        calls[path] += 1
        stack.append(path)
        if a and (isinstance(module, nn.Linear) or is_conv1d(module)):
            heads.input(path, a[0])
        if isinstance(module, nn.MultiheadAttention):
            why = _mha_check(module, a, kw)
            mha[path] = mha.get(path) or why
            if calls[path] > 1:
                mha[path] = f"weight used elsewhere: attention module {path!r} is called {calls[path]} times"

    def post(module, a, kw, out):
        if stack:
            stack.pop()
        if isinstance(module, nn.Linear) or is_conv1d(module):
            heads.output(names.get(id(module), "?"), out)

    for module in {id(m): m for m in model.modules()}.values():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    saved = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()
             if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)} if model.training else {}
    heads = HeadWatch()
    watcher = _Watcher(params, stack, heads)
    try:
        with watcher:
            model(*args, **dict(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
        if saved:
            state = model.state_dict(keep_vars=True)
            for k, v in saved.items():
                state[k].copy_(v)
    return Recording(dict(calls), {k: tuple(v) for k, v in watcher.uses.items()}, mha, heads.groups())


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear, Conv1D and nn.MultiheadAttention (not the out_proj inside one) by path."""
    found: dict[str, nn.Module] = {}
    mha_paths = []
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            mha_paths.append(path)
            found[path] = module
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            if not any(path == f"{p}.out_proj" if p else path == "out_proj" for p in mha_paths):
                found[path] = module
    return found


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for path, p in model.named_parameters(remove_duplicate=False):
        out[id(p)].append(path)
    return out


def _foreign(uses: tuple[Use, ...], owner: str) -> list[Use]:
    return [u for u in uses if u.module != owner]


def _describe_uses(model: nn.Module, uses: list[Use]) -> str:
    seen = []
    for u in uses:
        owner = model.get_submodule(u.module) if u.module else model
        text = f"{u.fn} in {type(owner).__name__}.forward ({u.module or 'the root module'!r})"
        if text not in seen:
            seen.append(text)
    return ", ".join(seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")


def record_candidates(model: nn.Module, rec: Recording) -> list[Candidate]:
    """Every linear computation of ``model`` (module tree order), judged from the recording ``rec``."""
    aliases = _aliases(model)

    def tie(path: str, param) -> str | None:
        others = [n for n in aliases.get(id(param), []) if n != path]
        if others:
            return (f"tied or shared weight: {path!r} is the same tensor as {', '.join(map(repr, others))}; "
                    "structuring it would silently break the tie (exclude it, or untie the weights first)")
        return None

    found: list[Candidate] = []
    owned: set[str] = set()
    for path, module in linear_modules(model).items():
        prefix = f"{path}." if path else ""
        types = _type_names(module)
        if isinstance(module, nn.MultiheadAttention):
            found.extend(_mha_candidates(model, path, module, rec, tie))
            owned.update(f"{prefix}{n}" for n, _ in module.named_parameters())
            continue
        conv = is_conv1d(module)
        weight = f"{prefix}weight"
        owned.add(weight)
        shape = tuple(module.weight.shape)
        d_in, d_out = (shape[0], shape[1]) if conv else (shape[1], shape[0])
        bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
        if bias:
            owned.add(bias)
        kind = "Conv1D" if conv else "Linear"
        objection = tie(weight, module.weight) or (tie(bias, module.bias) if bias else None)
        foreign = _foreign(rec.uses.get(weight, ()), path)
        foreign_bias = _foreign(rec.uses.get(bias, ()), path) if bias else []
        calls = rec.calls.get(path, 0)
        site = "module"
        if objection is None and calls > 1 and not isinstance(module, EinsumLinear):
            objection = (f"weight used elsewhere: module {path!r} is called {calls} times; "
                         "structuring it would change every call site")
        if objection is None and foreign:
            if calls == 0 and all(u.linear for u in foreign) and len(foreign) == 1 and not foreign_bias[1:]:
                site = "function"  # the module is never called: its weight is a functional linear site
            else:
                objection = (f"weight used elsewhere: {weight!r} is read by {_describe_uses(model, foreign)}"
                             + (" besides the module's own call" if calls else " (the module itself is never called)"))
        found.append(Candidate(path, kind, int(d_in), int(d_out), types, weight, conv, bias, site, None,
                               objection, shape, rec.groups.get(path, (1, 1))))
    owned_ids = {id(p) for path, p in model.named_parameters(remove_duplicate=False) if path in owned}
    for path, uses in rec.uses.items():
        if path in owned or id(model.get_parameter(path)) in owned_ids:
            continue
        linear = [u for u in uses if u.linear]
        if not linear:
            continue
        param = model.get_parameter(path)
        found.append(_function_candidate(model, path, param, uses, linear, tie))
    return found


def _function_candidate(model, path, param, uses, linear, tie) -> Candidate:
    owner = path.rpartition(".")[0]
    types = _type_names(model.get_submodule(owner) if owner else model)
    shape = tuple(param.shape)
    transposed = linear[0].transposed
    if param.dim() == 2:
        d_out, d_in = (shape[1], shape[0]) if transposed else shape
    else:
        d_in, d_out = shape[-1], shape[0]
    objection = tie(path, param)
    if param.dim() != 2:
        objection = f"non-2-D weight: {path!r} has shape {shape}; einfx structures 2-D weights"
    elif objection is None and len(uses) > 1:
        objection = f"weight used elsewhere: {path!r} is read by {_describe_uses(model, list(uses))}"
    return Candidate(_layer_name(path), "matmul", int(d_in), int(d_out), types, path, bool(transposed), None,
                     "function", None, objection, shape)


def _mha_candidates(model, path, module: nn.MultiheadAttention, rec: Recording, tie) -> list[Candidate]:
    prefix = f"{path}." if path else ""
    types = _type_names(module)
    called = rec.calls.get(path, 0)
    objection = rec.mha.get(path)
    if objection is None and not called:
        objection = None if module._qkv_same_embed_dim else "separate q/k/v weights are not rewritten"
    inside = {f"{prefix}{n}" for n, _ in module.named_parameters()}
    foreign = [u for n in inside for u in _foreign(rec.uses.get(n, ()), path)]
    if objection is None and foreign:
        objection = f"weight used elsewhere: the attention weights of {path!r} are read by {_describe_uses(model, foreign)}"
    e = module.embed_dim
    out = []
    if module.in_proj_weight is not None:
        w = module.in_proj_weight
        bias = f"{prefix}in_proj_bias" if module.in_proj_bias is not None else None
        out.append(Candidate(f"{prefix}in_proj", "fused projection", e, 3 * e, types, f"{prefix}in_proj_weight",
                             False, bias, "mha", None, objection or tie(f"{prefix}in_proj_weight", w), tuple(w.shape)))
    else:
        for leaf in ("q", "k", "v"):
            w = getattr(module, f"{leaf}_proj_weight")
            out.append(Candidate(f"{prefix}{leaf}_proj", "fused projection", int(w.shape[1]), int(w.shape[0]), types,
                                 f"{prefix}{leaf}_proj_weight", False, None, "mha", None,
                                 objection or "separate q/k/v weights (kdim/vdim differ from embed_dim) are not "
                                 "rewritten", tuple(w.shape)))
    op = module.out_proj
    bias = f"{prefix}out_proj.bias" if op.bias is not None else None
    out.append(Candidate(f"{prefix}out_proj", "Linear", e, e, _type_names(op), f"{prefix}out_proj.weight", False,
                         bias, "mha", None, objection or tie(f"{prefix}out_proj.weight", op.weight),
                         tuple(op.weight.shape)))
    return out
