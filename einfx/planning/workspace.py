"""Scratch memory for eager CPU inference: the intermediates of a plan reuse one buffer per thread.

Why: a structured layer makes a few activation-sized intermediates per call (GEMM outputs, the one relayout
copy). Fresh CPU allocations of a few MiB come from the system allocator as new pages, and touching them
costs page faults: measured on the project's 2-core host, a BTT rank-1 layer (d = 1024, 512 tokens) spent
4.0 ms per call in a process where glibc returned freed memory to the OS and 1.0 ms where it did not, for
the same arithmetic. A dense layer makes one allocation (its output); a structured one should not pay for
four more. This is the role oneDNN's per-thread "library scratchpad" plays.

What: one flat buffer per (thread, device, dtype, inference mode), carved into 64-byte aligned pieces with a
bump pointer that resets at the start of every plan run. A run that needs more than the buffer holds gets
fresh tensors for the excess and grows the buffer for the next run, up to ``MAX_BYTES`` per buffer; beyond
that it allocates as before. Only values that do not escape the plan live here (the plan's output is
always a fresh tensor), and only when no autograd graph is recorded: training and tracing allocate normally.
``release()`` frees this thread's buffers.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["Scratch", "scratch", "release", "MAX_BYTES"]

MAX_BYTES = 256 * 2**20
_ALIGN_BYTES = 64
_local = threading.local()


class Scratch:
    """Bump allocator over this thread's buffers for one plan run (create with `scratch()`)."""

    def __init__(self, buffers: dict):
        self._buffers = buffers
        self._used: dict = {}

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype and device, backed by scratch memory."""
        key = (like.device, like.dtype, torch.is_inference_mode_enabled())
        numel = math.prod(shape)
        align = max(1, _ALIGN_BYTES // like.element_size())
        start = self._used.get(key, 0)
        self._used[key] = start + -(-numel // align) * align
        buf = self._buffers.get(key)
        if buf is None or start + numel > buf.numel():
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf[start:start + numel].view(shape)

    def close(self) -> None:
        """Grow the buffers that were too small for this run (within ``MAX_BYTES``)."""
        for key, used in self._used.items():
            device, dtype, inference = key
            buf = self._buffers.get(key)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if (buf is None or buf.numel() < used) and used * itemsize <= MAX_BYTES:
                with torch.inference_mode(inference):
                    self._buffers[key] = torch.empty(used, dtype=dtype, device=device)


def scratch() -> Scratch:
    """A `Scratch` over the calling thread's buffers (use once per plan run, then ``close()`` it)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return Scratch(buffers)


def release() -> None:
    """Free the calling thread's scratch buffers."""
    _local.buffers = {}
