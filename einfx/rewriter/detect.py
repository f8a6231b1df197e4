"""Find every linear computation with a weight parameter in a captured model.

Forms recognised, in arrow form (W: the effective (d_out, d_in) weight, P: a parameter):

    call_module nn.Linear(x)                         -> Linear,  W = weight
    call_module Conv1D(x)        (GPT-2)             -> Conv1D,  W = weight.t()  (stored (in, out))
    F.linear(x, P[, b]) / aten.linear                -> W = P
    matmul/mm/@(x, P), addmm(b, x, P)                -> W = P.t()
    matmul/mm/@(x, t(P)) and P.T/transpose/permute   -> W = P
    call_module nn.MultiheadAttention(x, x, x)       -> fused projection (in_proj_weight, (3d, d)) + out_proj

Every candidate carries either no objection or a reason a user can read: tied or shared weight, weight
used elsewhere, non-2-D weight, a form einfx does not rewrite. Policy-level decisions (exclusion, min
features, structure shape) are made later, in `einfx.rewriter.decide`.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from einfx.rewriter.attention import mha_objection
from einfx.rewriter.heads import feature_groups
from einfx.rewriter.trace import is_conv1d
from einfx.layers.linear import EinsumLinear

__all__ = ["Candidate", "detect", "detect_modules", "KINDS"]

KINDS = ("Linear", "Conv1D", "matmul", "fused projection")

_aten = torch.ops.aten
_LINEAR_FNS = {F.linear, torch._C._nn.linear, _aten.linear.default}
_MM_FNS = {torch.matmul, torch.mm, operator.matmul, _aten.mm.default, _aten.matmul.default}
_MM_METHODS = {"matmul", "mm", "__matmul__"}
_ADDMM_FNS = {torch.addmm, _aten.addmm.default}
_T_FNS = {torch.t, _aten.t.default, torch.Tensor.t}
_TRANSPOSE_FNS = {torch.transpose, _aten.transpose.int}
_PERMUTE_FNS = {torch.permute, _aten.permute.default}


@dataclass(frozen=True)
class Candidate:
    """One linear computation found in the model.

    Attributes:
        name: the layer name used by policies and reports (module path, or parameter path for raw params).
        kind: one of ``KINDS``.
        d_in, d_out: features of the effective weight (d_out, d_in).
        module_types: class names (MRO) of the module that owns the weight, for ``module_type`` rules.
        weight: path of the weight parameter; ``transposed``: stored (in, out), so W = weight.t().
        bias: path of the bias parameter, or ``None``.
        site: how the rewrite happens: "module" (swap a call_module target), "function" (replace a
            call_function/call_method node), "mha" (decompose an nn.MultiheadAttention), "fallback"
            (module-level fallback, no graph).
        node: the graph node name (``None`` for the fallback).
        objection: why the candidate cannot be rewritten whatever the policy, or ``None``.
        shape: the stored weight shape.
        groups: (input, output) feature groups seen in the graph (attention heads, `einfx.rewriter.heads`),
            1 for none.
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    module_types: tuple[str, ...]
    weight: str
    transposed: bool
    bias: str | None
    site: str
    node: str | None
    objection: str | None = None
    shape: tuple[int, ...] = ()
    groups: tuple[int, int] = (1, 1)


def _type_names(module: nn.Module | None) -> tuple[str, ...]:
    if module is None:
        return ()
    return tuple(c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object))


def _lookup(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


class _Context:
    """Facts about the graph and the model shared by every pattern: ties, uses, owners."""

    def __init__(self, gm: nn.Module, original: nn.Module | None):
        self.gm = gm
        self.original = original if original is not None else gm
        self.aliases: dict[int, list[str]] = defaultdict(list)
        for root in {id(gm): gm, id(self.original): self.original}.values():
            for pname, p in root.named_parameters(remove_duplicate=False):
                if pname not in self.aliases[id(p)]:
                    self.aliases[id(p)].append(pname)
        self.module_calls: Counter = Counter()
        self.attr_uses: Counter = Counter()
        self.attr_users: dict[str, list[str]] = defaultdict(list)
        graph = gm.graph if isinstance(gm, fx.GraphModule) else None
        for node in graph.nodes if graph is not None else ():
            if node.op == "call_module":
                self.module_calls[node.target] += 1
            elif node.op == "get_attr":
                self.attr_uses[node.target] += len(node.users)
                self.attr_users[node.target].extend(u.name for u in node.users)

    def param(self, path: str) -> nn.Parameter | None:
        try:
            value = self.gm.get_parameter(path)
        except AttributeError:
            return None
        return value if isinstance(value, nn.Parameter) else None

    def owner_types(self, path: str) -> tuple[str, ...]:
        owner = path.rpartition(".")[0]
        return _type_names(_lookup(self.original, owner)) or _type_names(_lookup(self.gm, owner))

    def tie_objection(self, path: str, param: nn.Parameter) -> str | None:
        others = [n for n in self.aliases.get(id(param), []) if n != path]
        if others:
            return (f"tied or shared weight: {path!r} is the same tensor as {', '.join(map(repr, others))}; "
                    "structuring it would silently break the tie (exclude it, or untie the weights first)")
        return None


def _layer_name(weight_path: str) -> str:
    owner, _, leaf = weight_path.rpartition(".")
    if leaf == "weight" and owner:
        return owner
    if leaf.endswith("_weight") and leaf != "_weight":
        return f"{owner}.{leaf[:-7]}" if owner else leaf[:-7]
    return weight_path


def _transposed_source(node) -> fx.Node | None:
    """``node`` if it is a 2-D transpose of another node (t, .T, transpose(0, 1), permute(1, 0))."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    src = node.args[0]
    if node.op == "call_method" and node.target == "t" or node.op == "call_function" and node.target in _T_FNS:
        return src
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return src
    dims = tuple(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    is_transpose = (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target in _TRANSPOSE_FNS)
    is_permute = (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target in _PERMUTE_FNS)
    if is_transpose and dims in ((0, 1), (1, 0), (-1, -2), (-2, -1)):
        return src
    if is_permute and dims == (1, 0):
        return src
    return None


def _param_source(ctx: _Context, node) -> tuple[str, bool, fx.Node | None] | None:
    """(parameter path, transposed-view?, the transpose node) when ``node`` is a parameter or its transpose."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and ctx.param(node.target) is not None:
        return node.target, False, None
    src = _transposed_source(node)
    if src is not None and src.op == "get_attr" and ctx.param(src.target) is not None:
        return src.target, True, node
    return None


def _linear_args(node: fx.Node):
    """(x, weight node, bias node, form) for the linear-like call nodes, else ``None``.

    form "linear" means y = x Wᵀ (+ b); "mm" means y = x M (+ b).
    """
    kw = node.kwargs
    if node.op == "call_function" and node.target in _LINEAR_FNS:
        bias = node.args[2] if len(node.args) > 2 else kw.get("bias")
        return node.args[0], node.args[1] if len(node.args) > 1 else kw.get("weight"), bias, "linear"
    if node.op == "call_function" and node.target in _MM_FNS and len(node.args) == 2:
        return node.args[0], node.args[1], None, "mm"
    if node.op == "call_method" and node.target in _MM_METHODS and len(node.args) == 2:
        return node.args[0], node.args[1], None, "mm"
    if node.op == "call_function" and node.target in _ADDMM_FNS and len(node.args) == 3:
        if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
            return None
        return node.args[1], node.args[2], node.args[0], "mm"
    return None


def _function_candidate(ctx: _Context, node: fx.Node) -> Candidate | None:
    parsed = _linear_args(node)
    if parsed is None:
        return None
    x, w, b, form = parsed
    src = _param_source(ctx, w)
    if src is None:
        left = _param_source(ctx, x)
        if left is None or form != "mm":
            return None
        path = left[0]
        p = ctx.param(path)
        return Candidate(_layer_name(path), "matmul", int(p.shape[-1]), int(p.shape[0]), ctx.owner_types(path), path,
                         False, None, "function", node.name,
                         f"weight {path!r} is the left operand ({node.name} = W @ x), not a map over the last "
                         "dimension of the input; einfx rewrites x @ W and F.linear forms only",
                         tuple(p.shape))
    path, via_t, t_node = src
    param = ctx.param(path)
    types = ctx.owner_types(path)
    # effective W (d_out, d_in): F.linear takes W directly, x @ M takes Mᵀ; a transpose flips it again.
    transposed = (form == "mm") != via_t
    shape = tuple(param.shape)
    if "MultiheadAttention" in types and path.endswith("in_proj_weight"):
        kind = "fused projection"
    elif "Conv1D" in types:
        kind = "Conv1D"
    elif "Linear" in types:
        kind = "Linear"
    else:
        kind = "matmul"
    if param.dim() != 2:
        d_in, d_out = (shape[-1], shape[-2]) if not transposed else (shape[-2], shape[-1])
        return Candidate(_layer_name(path), kind, int(d_in), int(d_out), types, path, transposed, None, "function",
                         node.name, f"non-2-D weight: {path!r} has shape {shape}; einfx structures 2-D weights",
                         shape)
    d_out, d_in = (shape[1], shape[0]) if transposed else shape
    objection = ctx.tie_objection(path, param)
    uses = ctx.attr_uses[path]
    if objection is None and (uses > 1 or (t_node is not None and len(t_node.users) > 1)):
        users = ", ".join(ctx.attr_users[path])
        objection = f"weight used elsewhere: {path!r} feeds {uses} graph nodes ({users}), not only {node.name}"
    bias_path = None
    if b is not None:
        bsrc = _param_source(ctx, b)
        if bsrc is None or bsrc[1] or tuple(ctx.param(bsrc[0]).shape) != (d_out,):
            objection = objection or f"bias of {node.name} is computed in the graph, not a ({d_out},) parameter"
        else:
            bias_path = bsrc[0]
            bparam = ctx.param(bias_path)
            if objection is None and (ctx.attr_uses[bias_path] > 1 or ctx.tie_objection(bias_path, bparam)):
                objection = f"bias {bias_path!r} is used elsewhere or shared"
    return Candidate(_layer_name(path), kind, int(d_in), int(d_out), types, path, transposed, bias_path, "function",
                     node.name, objection, shape)


def _module_candidate(ctx: _Context, node: fx.Node, module: nn.Module) -> Candidate:
    path = node.target
    conv = is_conv1d(module)
    kind = "Conv1D" if conv else "Linear"
    weight = module.weight
    shape = tuple(weight.shape)
    d_in, d_out = (shape[0], shape[1]) if conv else (shape[1], shape[0])
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    objection = ctx.tie_objection(f"{path}.weight", weight)
    if objection is None and ctx.module_calls[path] > 1:
        objection = (f"weight used elsewhere: module {path!r} is called {ctx.module_calls[path]} times; "
                     "structuring it would change every call site")
    if objection is None and ctx.attr_uses[f"{path}.weight"]:
        objection = f"weight used elsewhere: {path}.weight is also read directly by {ctx.attr_users[path + '.weight']}"
    return Candidate(path, kind, int(d_in), int(d_out), _type_names(module), f"{path}.weight", conv, bias,
                     "module", node.name, objection, shape)


def _mha_objection(ctx: _Context, node: fx.Node, module: nn.MultiheadAttention) -> str | None:
    args = list(node.args) + [None] * (3 - len(node.args))
    q, k, v = (node.kwargs.get(n, args[i]) for i, n in enumerate(("query", "key", "value")))
    if ctx.module_calls[node.target] > 1:
        calls = ctx.module_calls[node.target]
        return f"weight used elsewhere: attention module {node.target!r} is called {calls} times"
    extra = list(node.args[3:]) + [node.kwargs.get(n) for n in ("key_padding_mask", "attn_mask")]
    masked = any(isinstance(a, fx.Node) for a in extra) or bool(node.kwargs.get("is_causal"))
    return mha_objection(module, q is k is v, masked)


def _mha_candidates(ctx: _Context, node: fx.Node, module: nn.MultiheadAttention) -> list[Candidate]:
    path, e = node.target, module.embed_dim
    objection = _mha_objection(ctx, node, module)
    out = []
    w = module.in_proj_weight
    if w is not None:
        obj = objection or ctx.tie_objection(f"{path}.in_proj_weight", w)
        bias = f"{path}.in_proj_bias" if module.in_proj_bias is not None else None
        out.append(Candidate(f"{path}.in_proj", "fused projection", e, 3 * e, _type_names(module),
                             f"{path}.in_proj_weight", False, bias, "mha", node.name, obj, tuple(w.shape)))
    op = module.out_proj
    obj = objection or ctx.tie_objection(f"{path}.out_proj.weight", op.weight)
    bias = f"{path}.out_proj.bias" if op.bias is not None else None
    out.append(Candidate(f"{path}.out_proj", "Linear", e, e, _type_names(op), f"{path}.out_proj.weight", False,
                         bias, "mha", node.name, obj, tuple(op.weight.shape)))
    return out


def detect(gm: fx.GraphModule, original: nn.Module | None = None) -> list[Candidate]:
    """Every linear computation with a weight parameter in ``gm``, in graph order.

    Args:
        gm: the captured graph module.
        original: the model ``gm`` was captured from, for module class names and weight ties.
    """
    ctx = _Context(gm, original)
    modules = dict(gm.named_modules())
    found: list[Candidate] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules.get(node.target)
            if isinstance(module, EinsumLinear):
                continue
            if isinstance(module, nn.MultiheadAttention):
                found.extend(_mha_candidates(ctx, node, module))
            elif isinstance(module, nn.Linear) or is_conv1d(module):
                cand = _module_candidate(ctx, node, module)
                x = node.args[0] if node.args else node.kwargs.get("input")
                found.append(replace(cand, groups=feature_groups(node, x, cand.d_in, cand.d_out)))
        elif node.op in ("call_function", "call_method"):
            cand = _function_candidate(ctx, node)
            if cand is not None:
                x = _linear_args(node)[0]
                found.append(replace(cand, groups=feature_groups(node, x, cand.d_in, cand.d_out)))
    return found


def detect_modules(model: nn.Module) -> list[Candidate]:
    """Module-level fallback (no graph): every nn.Linear and Conv1D submodule, by name."""
    ctx = _Context(model, None)
    found = []
    for path, module in model.named_modules():
        if isinstance(module, EinsumLinear) or not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        conv = is_conv1d(module)
        shape = tuple(module.weight.shape)
        d_in, d_out = (shape[0], shape[1]) if conv else (shape[1], shape[0])
        bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
        objection = ctx.tie_objection(f"{path}.weight", module.weight)
        found.append(Candidate(path, "Conv1D" if conv else "Linear", int(d_in), int(d_out), _type_names(module),
                               f"{path}.weight", conv, bias, "fallback", None, objection, shape))
    return found
