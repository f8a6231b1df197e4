"""`to_onnx`: export a (lowered, folded) einfx model to ONNX, check it, verify it in onnxruntime.

Pipeline, top to bottom:
    deploy passes (fold-to-dense, lowering; GraphModules only)  -> cast to the export dtype
    -> torch.onnx.export(dynamo=True) into a temporary folder beside the destination
    -> onnx.checker full check, no Einsum node -> onnxruntime parity at several sizes, median latency
    -> os.replace into place (the external data file first, then the .onnx file)
Any failure removes the temporary folder: no file (nor temporary file) is left behind, and an existing
file at the destination is untouched.

Facts about torch 2.14's exporter this relies on (checked by experiment):
    * ``torch.onnx.export(m, args, dynamo=True, dynamic_shapes=...)`` returns an ``ONNXProgram``;
      ``dynamic_shapes`` takes, per positional input, ``{dim: "name"}``; string names become dynamic dims
      named that way in the graph. A size-1 example dimension can still be specialized to 1 inside the
      model (GPT-2 did), so tracing repeats such inputs to size 2 (`_trace_inputs`).
    * ``ONNXProgram.save(path, external_data=True)`` writes the weights to ``<basename>.data`` beside the
      file and records that relative name, so both files can move together.
    * float16 and bfloat16 export by casting the module and the floating inputs; onnxruntime's CPU provider
      has float16 kernels but no bfloat16 kernels (MatMul, Add), so bfloat16 is verified on CUDA only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch

from einfx.errors import ExportError
from einfx.export.failures import explain_export_failure
from einfx.export.ops import check_onnx, load_graph
from einfx.export.session import resolve_device, session
from einfx.export.view import ExportView
from einfx.export.verify import TOLERANCES, ParityCheck, input_variants, reference_outputs, rel_error
from einfx.passes.base import run_passes
from einfx.passes.fold import fold_modules, fold_to_dense
from einfx.passes.lower import lower, lowerable
from einfx.export.graph_passes import optimize_graph
from einfx.export.pass_choice import PassChoice, choose_passes, label
from einfx.export.runtimes import check_runtime, load
from einfx.export.tune import TuningCache, tune_model
from einfx.planning.profile import load_profile

__all__ = ["to_onnx", "ExportReport", "cast_inputs", "DTYPES", "EXTERNAL_DATA_THRESHOLD", "apply_deploy_passes"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# protobuf refuses messages of 2 GiB; weights above this size go to an external data file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
BATCH = "batch"
# rows (batch × sequence) a graph's layers are tuned for when to_onnx is not told its deployment shape
DEPLOY_TOKENS = 512


@dataclass(frozen=True)
class ExportReport:
    """What `to_onnx` wrote and measured.

    Attributes:
        path: the ``.onnx`` file.
        data_path: its external data file, or None when the weights are inside the ``.onnx`` file.
        dtype: the export dtype name.
        opset: the default-domain opset of the graph.
        input_names, output_names: the graph's inputs and outputs.
        dynamic_axes: input name -> {dim: axis name}.
        op_counts: node counts by op type (no Einsum: the export refuses it).
        file_bytes, data_bytes: sizes of the ``.onnx`` file and of the external data file.
        passes: the deploy passes applied before export.
        providers: onnxruntime execution providers of the verification session (empty if not verified).
        checks: one `ParityCheck` per verified input set (the example inputs first).
        tolerance: the relative error allowed for this dtype.
        latency: median onnxruntime latency on the example inputs (io-binding), or None.
        note: why verification or timing was skipped, if it was.
        runtime: the runtime the layers were tuned for (None: planned by the cost model).
        tuned: layer name -> `einfx.export.tune.Tuned` (what was measured, and the winner) when tuned.
        rewrites: what the whole-graph passes did (`einfx.export.graph_passes.optimize_graph` counts).
        pass_choice: with a runtime, which optional passes were timed there and left out
            (`einfx.export.pass_choice.PassChoice`), or None.
    """

    path: str
    data_path: str | None
    dtype: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict = field(default_factory=dict)
    op_counts: dict = field(default_factory=dict)
    file_bytes: int = 0
    data_bytes: int = 0
    passes: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    checks: tuple[ParityCheck, ...] = ()
    tolerance: float = 0.0
    latency: object = None
    note: str = ""
    runtime: str | None = None
    tuned: dict = field(default_factory=dict)
    rewrites: dict = field(default_factory=dict)
    pass_choice: PassChoice | None = None

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_rel_error(self) -> float | None:
        return max(c.rel_error for c in self.checks) if self.checks else None

    @property
    def latency_ms(self) -> float | None:
        return self.latency.median_ms if self.latency is not None else None

    @property
    def total_bytes(self) -> int:
        return self.file_bytes + self.data_bytes

    def __str__(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in list(self.op_counts.items())[:8])
        lines = [
            f"ONNX export {self.path} ({self.dtype}, opset {self.opset}, {self.total_bytes / 2**20:.2f} MiB"
            + (f", external data {self.data_path}" if self.data_path else "") + ")",
            f"  inputs {list(self.input_names)} dynamic {self.dynamic_axes}; outputs {list(self.output_names)}",
            f"  ops: {ops}" + (" ..." if len(self.op_counts) > 8 else ""),
        ]
        if self.passes:
            lines.append(f"  passes: {', '.join(self.passes)}")
        for check in self.checks:
            lines.append(f"  {check}")
        if self.latency is not None:
            lines.append(f"  latency: {self.latency}")
        done = {k: v for k, v in self.rewrites.items() if v and k != "pruned"}
        if done:
            lines.append("  graph: " + ", ".join(f"{k} {v}" for k, v in done.items()))
        if self.pass_choice is not None and self.pass_choice.times:
            timed = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.pass_choice.times.items())
            kept = label(self.pass_choice.skipped)
            lines.append(f"  graph passes timed in {self.pass_choice.runtime}: {timed}; kept: {kept}")
        if self.tuned:
            dense = sum(t.dense for t in self.tuned.values())
            lines.append(f"  tuned for {self.runtime}: {len(self.tuned) - dense} structured, {dense} folded to "
                         f"dense ({len({t.signature for t in self.tuned.values()})} signatures)")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def apply_deploy_passes(module: torch.nn.Module, device: str = "cpu", *, runtime: str | None = None,
                        tokens: int = DEPLOY_TOKENS, threads: int = 0, tuning: TuningCache | None = None,
                        tuned: dict | None = None) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """Fold-to-dense, then lowering, for a model about to run in onnxruntime on ``device``.

    With ``runtime`` (``"onnxruntime"`` or ``"openvino"``), the fold and the plan of every structured layer
    are measured in that runtime at ``tokens`` rows instead (`einfx.export.tune.tune_model`, cached in
    ``tuning``); the measurements go into ``tuned`` (a dict) when one is given.

    Both plan with the device profile seen through onnxruntime (no free strided views), so a layer whose
    structured plan would lose to dense there is folded to an exact dense layer, and every other structured
    layer becomes MatMul/Transpose/Reshape nodes: in a GraphModule by the lowering pass, in a module tree
    (the user's own class) by the layer's forward, which a capturing export runs with the same plan.
    Returns the module and the names of the passes applied.
    """
    profile = load_profile(device, fallback=True).with_backend("onnxruntime")
    # a policy with fold_to_dense=False (recorded on the module by einfx.optimize) keeps every layer structured
    keep = () if getattr(module, "einfx_fold_to_dense", True) else ("*",)
    if not any(lowerable(m) for m in module.modules()):
        return module, ()
    if runtime is not None:
        measured = tune_model(module, runtime, tokens, threads=threads, keep=keep, cache=tuning)
        if tuned is not None:
            tuned.update(measured)
        names = (f"tune[{runtime}, {tokens} tokens]", "lower")
        if isinstance(module, torch.fx.GraphModule):
            module.recompile()
            module = lower(module, profile=profile).graph_module
        return module, names
    if not isinstance(module, torch.fx.GraphModule):
        fold_modules(module, profile=profile, keep=keep)
        return module, ("fold_to_dense", "lower")
    passes = [functools.partial(fold_to_dense, profile=profile, keep=keep), functools.partial(lower, profile=profile)]
    result = run_passes(module, passes)
    return result.graph_module, ("fold_to_dense", "lower")


def _check_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ExportError(f"example_inputs must be a tensor, a non-empty tuple of tensors or a mapping of input "
                          f"names to tensors, got {type(example_inputs).__name__}")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise ExportError(f"example_inputs[{i}] must be a torch.Tensor, got {type(x).__name__}")
    return tuple(example_inputs)


def _input_names(module: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _split_inputs(module: torch.nn.Module, example_inputs) -> tuple[tuple[torch.Tensor, ...], list[str], bool]:
    """(tensors, their input names, passed by keyword?) from a tensor, a tuple or a mapping (a tokenizer's
    output); tensors that are None in a mapping are left out."""
    if isinstance(example_inputs, Mapping):
        items = [(str(k), v) for k, v in example_inputs.items() if v is not None]
        if not items:
            raise ExportError("example_inputs is an empty mapping; give the model's inputs by name, e.g. "
                              "{'input_ids': ids, 'attention_mask': mask}")
        for name, value in items:
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"example_inputs[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
        return tuple(v for _, v in items), [k for k, _ in items], True
    inputs = _check_inputs(example_inputs)
    return inputs, _input_names(module, len(inputs)), False


def _sequence_axis(name: str) -> str:
    return "decoder_sequence" if name.startswith("decoder_") else "sequence"


def _dynamic_axes(names: list[str], inputs, dynamic_batch: bool, dynamic_sequence: bool,
                  dynamic_axes) -> dict[int, dict[int, str]]:
    """input index -> {dim: axis name}: batch (dim 0 of every input), sequence (dim 1 of every integer
    (batch, tokens) input: ids, masks, positions; decoder inputs get their own), and the user's axes."""
    axes: dict[int, dict[int, str]] = {i: {0: BATCH} for i, x in enumerate(inputs) if dynamic_batch and x.dim() > 0}
    for i, x in enumerate(inputs):
        if dynamic_sequence and x.dim() == 2 and not x.is_floating_point() and not x.is_complex():
            axes.setdefault(i, {})[1] = _sequence_axis(names[i])
    for key, dims in (dynamic_axes or {}).items():
        if isinstance(key, str):
            if key not in names:
                raise ExportError(f"dynamic_axes names input {key!r}; the module's inputs are {names}")
            index = names.index(key)
        elif isinstance(key, int) and 0 <= key < len(inputs):
            index = key
        else:
            raise ExportError(f"dynamic_axes key {key!r} is neither an input name {names} nor an index 0..{len(inputs) - 1}")
        if not isinstance(dims, Mapping):
            dims = {int(d): f"{names[index]}_dim{int(d)}" for d in dims}
        for dim, axis in dims.items():
            if not isinstance(dim, int) or not 0 <= dim < inputs[index].dim():
                raise ExportError(
                    f"dynamic_axes[{key!r}]: dim {dim!r} is not a dimension of input {names[index]!r} "
                    f"of shape {tuple(inputs[index].shape)}"
                )
            axes.setdefault(index, {})[dim] = str(axis)
    return axes


def _eager_attention(module: torch.nn.Module) -> torch.nn.Module:
    """A Hugging Face model switched to its eager attention (the module is a copy).

    Exported, the SDPA path and the eager path disagree on the rows of a padded batch that attend to nothing
    (left padding: a relative error of 0.3 on LLaMA's logits); the eager one exports as it runs in torch. The
    reference that verification compares against is switched the same way.
    """
    config = getattr(module, "config", None)
    if hasattr(module, "set_attn_implementation") and getattr(config, "_attn_implementation", "eager") != "eager":
        module.set_attn_implementation("eager")
    return module


def _prepare(module: torch.nn.Module, dtype: str) -> torch.nn.Module:
    # A copy, so that eval mode, passes and the dtype cast never touch the caller's module.
    module = _eager_attention(copy.deepcopy(module).eval())
    if dtype != "float32":
        module = module.to(DTYPES[dtype])
    return module


def cast_inputs(inputs: Sequence[torch.Tensor], dtype: str) -> tuple[torch.Tensor, ...]:
    """Floating inputs cast to the export dtype; integer and bool inputs unchanged."""
    return tuple(x.to(DTYPES[dtype]) if x.is_floating_point() else x for x in inputs)


def _trace_inputs(inputs: Sequence[torch.Tensor], axes: Mapping[int, Mapping[int, str]]) -> tuple[torch.Tensor, ...]:
    """The example inputs with every dynamic axis of size 1 repeated to size 2.

    torch.export specializes a size-1 dimension to the constant 1 where the model broadcasts it, and the
    graph would then accept a batch of 1 only; tracing at size 2 keeps the axis symbolic.
    """
    out = []
    for i, x in enumerate(inputs):
        for dim in axes.get(i, {}):
            if x.shape[dim] == 1:
                x = torch.cat([x, x], dim=dim)
        out.append(x)
    return tuple(out)


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _describe(module: torch.nn.Module) -> str:
    name = getattr(module, "name", None)
    return f"{type(module).__name__}" + (f" {name!r}" if isinstance(name, str) and name else "")


def _verify(tmp_path, reference, inputs, axes, dtype, device, verify_inputs, latency_repeats):
    """Parity checks and latency in onnxruntime; returns (providers, checks, latency, note)."""
    if dtype == "bfloat16" and resolve_device(device) == "cpu":
        return (), (), None, ("not verified: onnxruntime's CPUExecutionProvider has no bfloat16 kernels; "
                              "verify on a CUDA machine with onnxruntime-gpu")
    sess = session(tmp_path, device)
    tol = TOLERANCES[dtype]
    sets = [inputs] + (list(verify_inputs) if verify_inputs is not None else input_variants(inputs, axes))
    checks, note = [], ""
    for xs in sets:
        xs = _check_inputs(xs)
        expected = reference_outputs(reference, xs)
        got = sess.run_into(cast_inputs(xs, dtype), [e.shape for e in expected])
        checks.append(ParityCheck(tuple(tuple(x.shape) for x in xs), rel_error(got, expected), tol))
        if all(not e.any() for e in expected):
            note = f"the torch outputs on inputs {checks[-1].input_shapes} are all zero: parity there says little"
    latency = sess.benchmark(cast_inputs(inputs, dtype), warmup=2, repeats=latency_repeats) if latency_repeats else None
    return (sess.provider,), tuple(checks), latency, note


def _rewrite_graph(path: str, runtime: str | None = None, feeds=None, threads: int = 0, static: bool = False
                   ) -> tuple[dict[str, int], PassChoice | None]:
    """`optimize_graph` on the file in place (the temporary export, before any check); with a runtime, the
    optional passes are kept only where they are faster there (`choose_passes` on ``feeds``, compiled for
    their shapes when ``static``)."""
    model = onnx.load(path)
    choice = None
    if runtime is None:
        rewritten, counts = optimize_graph(model)
    else:
        rewritten, choice = choose_passes(model, runtime, feeds, threads, static=static)
        counts = choice.counts
    if any(counts.values()):
        onnx.save(rewritten, path)
    return counts, choice


def deploy_feeds(inputs: Sequence[torch.Tensor], names: Sequence[str], axes: Mapping[int, Mapping[int, str]],
                 tokens: int, dtype: str) -> dict[str, np.ndarray]:
    """The example inputs repeated along the batch axis to about ``tokens`` rows, as numpy feeds. Rows are
    batch × sequence for (batch, sequence) ids and (batch, sequence, features) inputs, batch for (batch,
    features); other inputs (images) and a batch axis that is not dynamic keep the example's size."""
    first = inputs[0]
    if first.dim() == 2 and not first.is_floating_point() or first.dim() == 3 and first.is_floating_point():
        rows = first.shape[0] * first.shape[1]
    elif first.dim() == 2:
        rows = first.shape[0]
    else:
        rows = 0
    batched = rows > 0 and all(axes.get(i, {}).get(0) == "batch" for i in range(len(inputs)))
    times = max(1, -(-tokens // int(rows))) if batched else 1
    return {name: x.repeat(times, *([1] * (x.dim() - 1))).numpy()
            for name, x in zip(names, cast_inputs(inputs, dtype))}


def shaped_feeds(inputs: Sequence[torch.Tensor], names: Sequence[str], axes: Mapping[int, Mapping[int, str]],
                 shape: tuple[int, ...], dtype: str) -> dict[str, np.ndarray]:
    """The example inputs tiled (then cut) to the deployment ``shape``, (batch,) or (batch, sequence), as
    numpy feeds: along every dynamic batch axis, and along every dynamic sequence axis (`_sequence_axis`)."""
    feeds = {}
    for i, (name, x) in enumerate(zip(names, cast_inputs(inputs, dtype))):
        for dim, size in ((0, shape[0]), (1, shape[1] if len(shape) > 1 else None)):
            axis = axes.get(i, {}).get(dim)
            if size is None or axis not in (BATCH, "sequence", "decoder_sequence") or x.dim() <= dim:
                continue
            reps = [1] * x.dim()
            reps[dim] = -(-size // x.shape[dim])
            x = x.repeat(*reps).narrow(dim, 0, size)
        feeds[name] = x.numpy()
    return feeds


def _check_deploy_shape(shape, names, inputs, axes, runtime) -> tuple[int, ...] | None:
    """``deploy_shape`` as a tuple, refused with the reason when it cannot be met."""
    if shape is None:
        return None
    if runtime is None:
        raise ExportError("deploy_shape is the shape the runtime compiles the graph at; give runtime= too "
                          "('onnxruntime' or 'openvino')")
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not 1 <= len(shape) <= 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ExportError(f"deploy_shape must be (batch,) or (batch, sequence) of positive ints, got {shape!r}")
    kinds = {axis for dims in axes.values() for axis in dims.values()}
    if shape[0] != inputs[0].shape[0] and BATCH not in kinds:
        raise ExportError(f"deploy_shape batch {shape[0]} differs from the example's {inputs[0].shape[0]}, but "
                          "no input has a dynamic batch axis (dynamic_batch=False)")
    if len(shape) == 2 and not kinds & {"sequence", "decoder_sequence"}:
        raise ExportError(f"deploy_shape {shape} gives a sequence length, but none of the inputs {list(names)} has "
                          "a dynamic sequence axis (integer (batch, tokens) inputs with dynamic_sequence=True)")
    return shape


def _verify_openvino(tmp_path, reference, inputs, dtype) -> tuple[ParityCheck, ...]:
    """Parity of the file run in OpenVINO (f32 precision hint) against torch on the example inputs."""
    if dtype != "float32":
        return ()
    runner = load("openvino", tmp_path)
    xs = _check_inputs(inputs)
    expected = reference_outputs(reference, xs)
    feeds = dict(zip(runner.input_names, (x.detach().cpu().numpy() for x in xs)))
    got = [torch.from_numpy(np.asarray(y)) for y in runner(feeds)]
    check = ParityCheck(tuple(tuple(x.shape) for x in xs), rel_error(got, expected), TOLERANCES[dtype])
    return (dataclasses.replace(check, where="openvino"),)


def _export(module, inputs, axes, opset, tmp_path, use_external: bool, what: str, names, output_names) -> None:
    """torch.onnx.export (dynamo) and save to ``tmp_path``; exporter failures become `ExportError`."""
    shapes = tuple(axes.get(i, {}) or None for i in range(len(inputs)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, inputs, dynamo=True, verbose=False, opset_version=opset,
                                        dynamic_shapes=(shapes,) if any(shapes) else None,
                                        input_names=list(names),
                                        output_names=list(output_names) if output_names else None)
        program.save(tmp_path, external_data=use_external)
    except Exception as exc:  # the exporter raises many types; keep the original as the cause
        raise explain_export_failure(exc, what) from exc


def _publish(tmp_path: str, path: str, use_external: bool) -> str | None:
    """Move the checked files into place, the data file first; return the data file's path, if any."""
    data_tmp = tmp_path + ".data"
    data_path = path + ".data" if use_external and os.path.exists(data_tmp) else None
    if data_path:
        os.replace(data_tmp, data_path)
    os.replace(tmp_path, path)
    return data_path


def to_onnx(module: torch.nn.Module, example_inputs, path: str | os.PathLike, dtype: str = "float32",
            dynamic_batch: bool = True, dynamic_axes: Mapping | None = None, opset: int | None = None,
            verify: bool = True, external_data: bool | None = None, *, device: str = "auto",
            verify_inputs: Sequence[Sequence[torch.Tensor]] | None = None,
            latency_repeats: int = 10, dynamic_sequence: bool = True,
            outputs: Sequence[str] | None = None, runtime: str | None = None, tokens: int = DEPLOY_TOKENS,
            threads: int = 0, tuning: TuningCache | None = None, graph_passes: bool = True,
            deploy_shape: tuple[int, ...] | None = None) -> ExportReport:
    """Export ``module`` to an ONNX file at ``path``, check it and verify it against torch.

    Args:
        module: any nn.Module: a model from ``einfx.optimize`` (the user's class or a GraphModule) gets the
            fold/lower deploy passes.
        example_inputs: a tensor, a tuple of tensors (positional inputs), or a mapping of input names to
            tensors (keyword inputs, e.g. a tokenizer's output); the ONNX inputs take these names.
        path: destination ``.onnx`` file; written atomically.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (module and floating inputs are cast).
        dynamic_batch: make dim 0 of every input a dynamic axis named ``"batch"``.
        dynamic_axes: more dynamic axes: {input name or index: {dim: axis name} or [dims]}, e.g.
            ``{"input_ids": {1: "seq"}}``; axes sharing a name share a size.
        opset: ONNX opset (default: the exporter's).
        verify: run the file in onnxruntime on the example inputs and on inputs of other sizes (every
            dynamic axis takes two other sizes), and refuse it (raising, writing nothing) when the relative
            error exceeds the dtype's tolerance (1e-4 float32, 2e-2 float16/bfloat16).
        external_data: store weights in ``<path>.data``; None chooses it for weights near or above 2 GiB.
        device: onnxruntime device for verification: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        verify_inputs: input tuples to verify on instead of the generated other-size variants.
        latency_repeats: timed runs for the median latency (0: no timing).
        dynamic_sequence: make dim 1 of every integer (batch, tokens) input (ids, masks, positions) a
            dynamic axis, ``"sequence"`` (``"decoder_sequence"`` for ``decoder_*`` inputs), as Optimum does.
        outputs: for a model returning a ModelOutput or dict, the outputs to export (default: its main
            output, the first tensor: ``logits`` or ``last_hidden_state``); models called with a
            ``use_cache`` argument are exported with ``use_cache=False`` (no past key values).
        runtime: the runtime the graph is for, ``"onnxruntime"`` or ``"openvino"``: every structured layer's
            fold-to-dense decision and plan are measured there (the cost model's best plans and dense, timed
            per distinct layer signature, cached: `einfx.export.tune`), so that no layer stays structured
            where dense runs faster; with ``"openvino"`` the file is also verified in OpenVINO. None: the
            cost model decides (no measurement).
        tokens: rows (batch × sequence) of the deployment shape the layers are tuned for.
        threads: runtime threads for tuning (0: the runtime's default).
        tuning: the `TuningCache` to read and extend (default: the runtime's cache beside the device profile).
        graph_passes: rewrite the exported graph as a whole (`einfx.export.graph_passes`: identical nodes
            merged, sibling MatMuls on one activation fused into one, transposes sunk and pairs cancelled);
            exact, and verified with the rest. With a ``runtime``, sibling fusion and transpose sinking are
            kept only where that runtime runs the graph faster with them, timed on the example inputs repeated
            along the batch axis to ``tokens`` rows (`einfx.export.pass_choice`). Skipped for weights in an
            external data file.
        deploy_shape: with a ``runtime``, the static shape the graph will be compiled at, (batch,) or (batch,
            sequence), as OpenVINO deployments do with ``Model.reshape`` (`einfx.export.runtimes`): the layers
            are tuned at batch × sequence rows (instead of ``tokens``; batch-only: ``tokens``), and the optional
            passes are timed on the example tiled to that shape, compiled for it.

    Returns:
        An `ExportReport`.

    Raises:
        ExportError: the module cannot be exported (naming the node and op), the checker refuses the
            graph, it holds an Einsum node, or verification fails. No file is left behind.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"to_onnx exports a torch.nn.Module, got {type(module).__name__}")
    inputs, names, keyword = _split_inputs(module, example_inputs)
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {path}: folder {folder!r} does not exist")
    what = _describe(module)
    axes = _dynamic_axes(names, inputs, dynamic_batch, dynamic_sequence, dynamic_axes)
    deploy_shape = _check_deploy_shape(deploy_shape, names, inputs, axes, runtime)
    if deploy_shape is not None and len(deploy_shape) == 2:
        tokens = deploy_shape[0] * deploy_shape[1]
    reference = ExportView(_eager_attention(copy.deepcopy(module).eval()), names, keyword, outputs) if verify else None
    if runtime is not None:
        check_runtime(runtime)
    tuned: dict = {}
    prepared, passes = apply_deploy_passes(_prepare(module, dtype), resolve_device(device), runtime=runtime,
                                           tokens=tokens, threads=threads, tuning=tuning, tuned=tuned)
    view = ExportView(prepared, names, keyword, outputs)
    use_external = _weight_bytes(prepared) >= EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)

    tmp_dir = tempfile.mkdtemp(prefix=".einfx-export-", dir=folder)
    tmp_path = os.path.join(tmp_dir, os.path.basename(path))
    try:
        traced = cast_inputs(_trace_inputs(inputs, axes), dtype)
        with torch.no_grad():
            view(*traced)  # learns the output names of a mapping output
        _export(view, traced, axes, opset, tmp_path, use_external, what, names, view.output_names)
        rewrites, choice = {}, None
        if graph_passes and not use_external:
            if runtime is None:
                feeds = None
            elif deploy_shape is not None:
                feeds = shaped_feeds(inputs, names, axes, deploy_shape, dtype)
            else:
                feeds = deploy_feeds(inputs, names, axes, tokens, dtype)
            rewrites, choice = _rewrite_graph(tmp_path, runtime, feeds, threads, static=deploy_shape is not None)
        op_counts = check_onnx(tmp_path)
        providers, checks, latency, note = (), (), None, "not verified (verify=False)"
        if verify:
            providers, checks, latency, note = _verify(tmp_path, reference, inputs, axes, dtype, device,
                                                       verify_inputs, latency_repeats)
            if runtime == "openvino":
                checks += _verify_openvino(tmp_path, reference, inputs, dtype)
            if not all(c.passed for c in checks):
                raise ExportError(
                    f"{what}: onnxruntime output differs from torch beyond the {dtype} tolerance "
                    f"{TOLERANCES[dtype]:g} ({providers[0]}):\n  " + "\n  ".join(map(str, checks))
                )
            if note:
                warnings.warn(f"{path}: {note}", stacklevel=2)
        graph = load_graph(tmp_path)
        data_path = _publish(tmp_path, path, use_external)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    opset_used = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportReport(
        path=path, data_path=data_path, dtype=dtype, opset=opset_used,
        input_names=tuple(i.name for i in graph.graph.input),
        output_names=tuple(o.name for o in graph.graph.output),
        dynamic_axes={names[i]: dict(d) for i, d in axes.items()}, op_counts=op_counts,
        file_bytes=os.path.getsize(path), data_bytes=os.path.getsize(data_path) if data_path else 0,
        passes=passes, providers=providers, checks=checks, tolerance=TOLERANCES[dtype], latency=latency,
        note=note, runtime=runtime, tuned=tuned, rewrites=rewrites, pass_choice=choice,
    )
