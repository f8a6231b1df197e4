"""onnxruntime sessions for exported einfx models: provider choice, io-binding runs and latency.

``session(path, device="auto")`` picks the CUDA execution provider when onnxruntime-gpu provides it, else
the CPU one, and says which in ``Session.message``. Inputs and outputs travel through io-binding with
torch tensors as buffers: inputs are placed on the session's device once, outputs are bound on that device,
so ``benchmark()`` times the runs alone, without host copies. torch buffers also carry bfloat16, which
numpy cannot hold.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from einfx.errors import ExportError

__all__ = ["session", "resolve_device", "Session", "Latency", "DEVICES", "ONNX_TYPES", "ort_type_to_torch"]

DEVICES = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_LOG = logging.getLogger("einfx.export")

# ONNX TensorProto element types <-> torch dtypes (the types einfx models take and return).
ONNX_TYPES = {
    torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6, torch.int64: 7,
    torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16,
}
_ORT_TYPE_NAMES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
    "tensor(double)": torch.float64, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16, "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def ort_type_to_torch(type_name: str) -> torch.dtype:
    """The torch dtype of an onnxruntime type string such as ``"tensor(float16)"``."""
    if type_name not in _ORT_TYPE_NAMES:
        raise ExportError(f"onnxruntime type {type_name!r} has no torch counterpart; valid: {', '.join(_ORT_TYPE_NAMES)}")
    return _ORT_TYPE_NAMES[type_name]


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one session run in milliseconds (inputs and outputs already on the device)."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    provider: str

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms median (min {self.min_ms:.3f}, max {self.max_ms:.3f}, n={self.repeats}, {self.provider})"


class Session:
    """An onnxruntime ``InferenceSession`` bound to one device. Build with `session`.

    Attributes:
        path: the ONNX file.
        device: ``"cpu"`` or ``"cuda"``.
        provider: the execution provider the session actually runs on.
        message: one line saying which provider was chosen and why.
        inner: the ``onnxruntime.InferenceSession``.
        input_names, output_names: the graph's inputs and outputs, in order.
    """

    def __init__(self, inner, path: str, device: str, message: str):
        self.inner = inner
        self.path = path
        self.device = device
        self.provider = inner.get_providers()[0]
        self.message = message
        self.input_names = tuple(i.name for i in inner.get_inputs())
        self.output_names = tuple(o.name for o in inner.get_outputs())
        self.output_dtypes = tuple(ort_type_to_torch(o.type) for o in inner.get_outputs())
        self.input_dtypes = tuple(ort_type_to_torch(i.type) for i in inner.get_inputs())

    def __repr__(self) -> str:
        return f"Session({self.path!r}, provider={self.provider})"

    # -- binding ----------------------------------------------------------------------------------
    def place(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copy inputs to the session's device, contiguous and in the graph's input dtypes."""
        if len(inputs) != len(self.input_names):
            raise ExportError(
                f"{self.path}: the graph takes {len(self.input_names)} input(s) {list(self.input_names)}, "
                f"got {len(inputs)}"
            )
        dev = torch.device("cuda", 0) if self.device == "cuda" else torch.device("cpu")
        placed = []
        for name, t, dtype in zip(self.input_names, inputs, self.input_dtypes):
            if not isinstance(t, torch.Tensor):
                raise ExportError(f"{self.path}: input {name!r} must be a torch.Tensor, got {type(t).__name__}")
            placed.append(t.detach().to(device=dev, dtype=dtype).contiguous())
        return placed

    def _binding(self, placed: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor] | None):
        binding = self.inner.io_binding()
        kind = "cuda" if self.device == "cuda" else "cpu"
        for name, t in zip(self.input_names, placed):
            binding.bind_input(name, kind, 0, ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
        for i, name in enumerate(self.output_names):
            if outputs is None:
                binding.bind_output(name, kind, 0)
            else:
                out = outputs[i]
                binding.bind_output(name, kind, 0, ONNX_TYPES[out.dtype], list(out.shape), out.data_ptr())
        return binding

    def _run(self, binding, placed: Sequence[torch.Tensor]) -> None:
        try:
            self.inner.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises RuntimeError or its own pybind types
            shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in zip(self.input_names, placed))
            raise ExportError(f"{self.path}: onnxruntime ({self.provider}) failed on inputs {shapes}: {exc}") from exc

    def run_into(self, inputs: Sequence[torch.Tensor], output_shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Run once, writing the outputs into torch tensors of the given shapes on the session's device.

        Works for every dtype, bfloat16 included. Returns the output tensors (on the session's device).
        """
        if len(output_shapes) != len(self.output_names):
            raise ExportError(
                f"{self.path}: the graph has {len(self.output_names)} output(s) {list(self.output_names)}, "
                f"got {len(output_shapes)} shapes"
            )
        placed = self.place(inputs)
        dev = placed[0].device if placed else torch.device("cpu")
        outs = [torch.empty(tuple(s), dtype=d, device=dev) for s, d in zip(output_shapes, self.output_dtypes)]
        self._run(self._binding(placed, outs), placed)
        return outs

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run once and return the outputs as CPU torch tensors (onnxruntime allocates them)."""
        placed = self.place(inputs)
        binding = self._binding(placed, None)
        self._run(binding, placed)
        results = []
        for name, value in zip(self.output_names, binding.get_outputs()):
            if value.element_type() == ONNX_TYPES[torch.bfloat16]:
                raise ExportError(f"{self.path}: output {name!r} is bfloat16, which numpy cannot hold; use run_into()")
            results.append(torch.from_numpy(value.numpy()))
        return results

    def benchmark(self, inputs: Sequence[torch.Tensor], warmup: int = 3, repeats: int = 20) -> Latency:
        """Median latency of ``repeats`` runs after ``warmup`` runs, timing the runs alone (io-binding)."""
        if repeats < 1 or warmup < 0:
            raise ExportError(f"benchmark needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
        placed = self.place(inputs)
        binding = self._binding(placed, None)
        self._run(binding, placed)  # one checked run, so that a failure names the file and the inputs
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            self.inner.run_with_iobinding(binding)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return Latency(statistics.median(times), min(times), max(times), repeats, self.provider)


_SHARED_POOL: list[int] = []  # the size onnxruntime's process-wide pool was created with (it exists once)


def _options(threads: int | None, spinning: bool | None = None, shared_pool: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: onnxruntime warns about every constant-folded node otherwise
    if shared_pool and not _SHARED_POOL:
        # onnxruntime creates its process-wide pool once per process and refuses to be configured again
        ort.set_global_thread_pool_sizes(int(threads or 0), 1)
        _SHARED_POOL.append(int(threads or 0))
    if _SHARED_POOL:
        # once the process-wide pool exists, onnxruntime refuses sessions with pools of their own
        opts.use_per_session_threads = False
    elif threads is not None:
        opts.intra_op_num_threads = int(threads)
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def resolve_device(device: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"``: where `session` would run for ``device`` (CUDA needs onnxruntime-gpu and torch CUDA)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ExportError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    has_cuda = _CUDA in available and torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ExportError(
            f"device='cuda' but onnxruntime offers {', '.join(available)} and torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}; install onnxruntime-gpu on a CUDA machine, or use device='cpu'/'auto'"
        )
    return "cuda" if has_cuda and device in ("auto", "cuda") else "cpu"


def session(path: str | os.PathLike, device: str = "auto", *, threads: int | None = None,
            spinning: bool | None = None, shared_pool: bool = False) -> Session:
    """Open an ONNX file in onnxruntime with full graph optimization.

    Args:
        path: the ``.onnx`` file (its external data file, if any, beside it).
        device: ``"auto"`` (CUDA when onnxruntime-gpu provides it, else CPU), ``"cpu"`` or ``"cuda"``.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, one per physical core).
        spinning: whether idle intra-op threads spin-wait for work (default: onnxruntime's, yes). Spinning
            lowers one session's latency but, with several sessions in one process on few cores, the idle
            sessions' spinning threads slow the running one (measured 2.5x on 2 cores); pass False there,
            or share one pool.
        shared_pool: run on onnxruntime's process-wide intra-op thread pool instead of a pool of the
            session's own, so that several sessions in one process (dense and optimized, side by side) do
            not compete through their idle spinning threads. Process-wide and for good: the first shared
            session fixes the pool's size (``threads``, default one thread per core), every later einfx
            session joins it (its ``threads`` ignored), and onnxruntime then refuses other sessions created
            without ``use_per_session_threads = False``. Meant for benchmark processes.

    Raises:
        ExportError: an unknown device, ``"cuda"`` without the CUDA provider, or a file onnxruntime refuses.
    """
    import onnxruntime as ort

    use_cuda = resolve_device(device) == "cuda"
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"no ONNX file at {path!r}")
    providers = [_CUDA, _CPU] if use_cuda else [_CPU]
    try:
        inner = ort.InferenceSession(path, sess_options=_options(threads, spinning, shared_pool),
                                     providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise ExportError(f"onnxruntime could not load {path!r} with {providers[0]}: {exc}") from exc
    chosen = inner.get_providers()[0]
    if use_cuda and chosen != _CUDA:
        message = f"onnxruntime: {_CUDA} failed to start (CUDA libraries?); running {path} on {chosen}"
    elif use_cuda:
        message = f"onnxruntime: running {path} on {_CUDA} (GPU, onnxruntime-gpu)"
    elif device == "auto":
        message = f"onnxruntime: {_CUDA} not available (install onnxruntime-gpu on a CUDA machine); running {path} on {_CPU}"
    else:
        message = f"onnxruntime: running {path} on {_CPU} (device='cpu')"
    _LOG.info(message)
    return Session(inner, path, "cuda" if chosen == _CUDA else "cpu", message)
