"""Shared timing helpers for the bench/ scripts: robust medians and a one-line machine description.

Times are medians over repeated samples after warm-up; each sample runs the function enough times to last at
least ``min_time`` seconds, so short kernels are not dominated by timer resolution. On CUDA every sample is
bracketed by a device synchronisation. ``median_times`` measures several functions side by side (interleaved
round-robin), so that load from other processes hits all of them alike and their ratios stay meaningful.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

__all__ = ["median_time", "median_times", "machine_description"]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _calls_per_sample(fn: Callable[[], object], min_time: float, clock=time.perf_counter) -> int:
    """How many back-to-back calls make one sample last at least ``min_time`` seconds."""
    number = 1
    while True:
        _sync()
        start = clock()
        for _ in range(number):
            fn()
        _sync()
        elapsed = clock() - start
        if elapsed >= min_time or number >= 1 << 20:
            return number
        # aim a little past the target so that one more doubling is rarely needed
        number = max(number * 2, int(number * 1.2 * min_time / max(elapsed, 1e-9)))


def _sample(fn: Callable[[], object], number: int, clock=time.perf_counter) -> float:
    _sync()
    start = clock()
    for _ in range(number):
        fn()
    _sync()
    return (clock() - start) / number


def median_time(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 7, min_time: float = 0.02) -> float:
    """Median wall-clock seconds of one call of ``fn``.

    Args:
        fn: a function of no arguments (wrap the call in a lambda).
        warmup: calls made first and not timed (allocator, caches, lazy init, autotuning).
        repeat: number of timed samples; the median is returned.
        min_time: the shortest duration of one sample, in seconds; short functions run several times per
            sample and the per-call time is reported.

    Returns:
        The median over ``repeat`` samples of the seconds per call.
    """
    return median_times({"fn": fn}, warmup=warmup, repeat=repeat, min_time=min_time)["fn"]


def median_times(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeat: int = 7,
                 min_time: float = 0.02, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of several functions, measured side by side.

    The samples are interleaved (one sample of each function per round) so that a burst of load from other
    processes affects every function in the same round. Arguments are those of `median_time`; ``clock`` is
    the timer (``time.process_time`` measures the process's CPU time: robust on a shared host, single thread).

    Returns:
        ``{name: median seconds per call}`` in the order of ``fns``.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    numbers = {name: _calls_per_sample(fn, min_time, clock) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, numbers[name], clock))
    return {name: statistics.median(values) for name, values in samples.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description() -> str:
    """One line: CPU model, usable/total cores, torch version, intra-op threads and the GPU if any."""
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = total
    parts = [
        f"CPU: {_cpu_model()} ({usable} usable of {total} cores)",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} threads",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.append(f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        parts.append("GPU: none")
    return "; ".join(parts)


def write_result(path: str, text: str) -> None:
    """Write a results file atomically (a temporary name, then a rename): never a half-written table."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
