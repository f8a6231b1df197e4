"""One layer's plan as a standalone ONNX graph, built node by node (no torch export): what the tuner times.

    plan step          ONNX node
    reshape / restore  Reshape (a constant shape: the graph is made for one token count)
    permute            Transpose
    expand             Expand
    contiguous         Identity (ONNX tensors have no strides)
    pad                Pad (zeros at the end of the last axis)
    crop / slice       Slice
    matmul             MatMul
    (bias)             Add

The cores and the bias are initializers, so the weight-side reshapes and transposes are constant-folded by
the runtime exactly as they are in a whole exported model. Building a graph takes about a millisecond, so
timing a handful of candidate plans per layer signature costs a fraction of a second each.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from einfx.errors import PlanError
from einfx.planning.plan import Plan, apply_step

__all__ = ["plan_model", "dense_model", "OPSET"]

OPSET = 18
_ELEM = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.float64: TensorProto.DOUBLE}


def _shapes(plan: Plan, tokens: int, d_in: int, cores: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The static shape of every value of ``plan`` for ``tokens`` input rows (run on meta tensors)."""
    env = {"x": torch.empty(tokens, d_in, device="meta")}
    env.update({k: torch.empty(v.shape, device="meta") for k, v in cores.items()})
    for step in plan.steps:
        missing = [v for v in step.inputs if v not in env]
        if missing:
            raise PlanError(f"plan step {step} reads {missing[0]!r}, which no earlier step wrote; "
                            f"available: {sorted(env)}")
        env[step.out] = apply_step(step, [env[i] for i in step.inputs], env)
    return {k: tuple(v.shape) for k, v in env.items()}


def _const(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def plan_model(plan: Plan, cores: dict[str, torch.Tensor], bias: torch.Tensor | None, tokens: int,
               d_in: int) -> onnx.ModelProto:
    """An ONNX model ``y = layer(x)`` for x of shape (tokens, d_in), running ``plan``'s steps.

    Raises:
        PlanError: a step reads a value no earlier step wrote.
    """
    dtype = next(iter(cores.values())).dtype
    elem = _ELEM[dtype]
    shapes = _shapes(plan, tokens, d_in, cores)
    nodes, inits = [], [numpy_helper.from_array(c.detach().cpu().numpy(), k) for k, c in cores.items()]
    for i, st in enumerate(plan.steps):
        a, v, out = st.args, st.inputs[0], st.out
        if st.op in ("reshape", "restore"):
            shape = shapes[out] if st.op == "restore" else a
            inits.append(_const(f"shape_{i}", shape))
            nodes.append(helper.make_node("Reshape", [v, f"shape_{i}"], [out]))
        elif st.op == "permute":
            nodes.append(helper.make_node("Transpose", [v], [out], perm=[int(p) for p in a]))
        elif st.op == "expand":
            inits.append(_const(f"shape_{i}", shapes[out]))
            nodes.append(helper.make_node("Expand", [v, f"shape_{i}"], [out]))
        elif st.op == "contiguous":
            nodes.append(helper.make_node("Identity", [v], [out]))
        elif st.op == "pad":
            rank = len(shapes[v])
            inits.append(_const(f"pads_{i}", [0] * (2 * rank - 1) + [int(a[0])]))
            nodes.append(helper.make_node("Pad", [v, f"pads_{i}"], [out]))
        elif st.op in ("crop", "slice"):
            ends, axes = ((a[0], a[1]), (0, 1)) if st.op == "crop" else ((a[0],), (len(shapes[v]) - 1,))
            inits += [_const(f"starts_{i}", [0] * len(ends)), _const(f"ends_{i}", ends), _const(f"axes_{i}", axes)]
            nodes.append(helper.make_node("Slice", [v, f"starts_{i}", f"ends_{i}", f"axes_{i}"], [out]))
        else:  # matmul
            nodes.append(helper.make_node("MatMul", list(st.inputs), [out]))
    y = plan.output
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.detach().cpu().numpy(), "bias"))
        nodes.append(helper.make_node("Add", [y, "bias"], ["y"]))
        y = "y"
    return _model(nodes, inits, elem, (tokens, d_in), y, shapes[plan.output])


def dense_model(weight: torch.Tensor, bias: torch.Tensor | None, tokens: int) -> onnx.ModelProto:
    """``y = x @ weight.T + bias`` for x of shape (tokens, d_in): what a folded layer exports to."""
    d_out, d_in = weight.shape
    inits = [numpy_helper.from_array(weight.detach().t().contiguous().cpu().numpy(), "weight_t")]
    nodes = [helper.make_node("MatMul", ["x", "weight_t"], ["xw"])]
    y = "xw"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.detach().cpu().numpy(), "bias"))
        nodes.append(helper.make_node("Add", ["xw", "bias"], ["y"]))
        y = "y"
    return _model(nodes, inits, _ELEM[weight.dtype], (tokens, d_in), y, (tokens, d_out))


def _model(nodes, inits, elem, x_shape, y: str, y_shape) -> onnx.ModelProto:
    if y != "y":
        nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(nodes, "einfx_layer", [helper.make_tensor_value_info("x", elem, list(x_shape))],
                              [helper.make_tensor_value_info("y", elem, list(y_shape))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="einfx")
    onnx.checker.check_model(model)
    return model
