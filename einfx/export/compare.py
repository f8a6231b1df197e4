"""Dense vs optimized in onnxruntime: export both, time them fairly, print one table.

Timing alternates between the models in rounds (each round: ``repeats`` runs of every model) and keeps
the median over all rounds, so that a noisy shared machine slows both sides alike.
"""

from __future__ import annotations

import os
import statistics
from typing import Mapping, Sequence

import torch

from einfx.export.onnx_export import ExportReport, cast_inputs, to_onnx
from einfx.export.session import Latency, Session, session

__all__ = ["compare_latency", "latency_table", "demo_latency"]


def compare_latency(sessions: Mapping[str, Session], inputs: Sequence[torch.Tensor], rounds: int = 5,
                    repeats: int = 5, warmup: int = 3) -> dict[str, Latency]:
    """Median latency of each session on the same inputs, interleaved in ``rounds`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, sess in sessions.items():
        sess.benchmark(inputs, warmup=warmup, repeats=1)
    for _ in range(rounds):
        for name, sess in sessions.items():
            lat = sess.benchmark(inputs, warmup=0, repeats=repeats)
            times[name].append(lat.median_ms)
    return {
        name: Latency(statistics.median(ts), min(ts), max(ts), rounds * repeats, sessions[name].provider)
        for name, ts in times.items()
    }


def latency_table(reports: Mapping[str, ExportReport], latencies: Mapping[str, Latency],
                  baseline: str | None = None) -> str:
    """A text table: file size, MatMul/Einsum counts, parity error, median latency and speedup."""
    baseline = baseline or next(iter(latencies))
    base = latencies[baseline].median_ms
    head = f"{'model':<12} {'MiB':>8} {'MatMul':>7} {'Einsum':>7} {'max rel err':>12} {'median ms':>10} {'speedup':>8}  provider"
    lines = [head, "-" * len(head)]
    for name, rep in reports.items():
        lat = latencies[name]
        err = f"{rep.max_rel_error:.2e}" if rep.max_rel_error is not None else "-"
        lines.append(
            f"{name:<12} {rep.total_bytes / 2**20:>8.2f} {rep.op_counts.get('MatMul', 0) + rep.op_counts.get('Gemm', 0):>7} "
            f"{rep.op_counts.get('Einsum', 0):>7} {err:>12} {lat.median_ms:>10.3f} {base / lat.median_ms:>7.2f}x  {lat.provider}"
        )
    return "\n".join(lines)


def demo_latency(dense_module: torch.nn.Module, optimized_module: torch.nn.Module, example_inputs,
                 out_dir: str | os.PathLike, *, dtype: str = "float32", device: str = "auto",
                 dynamic_axes: Mapping | None = None, rounds: int = 5, repeats: int = 5
                 ) -> tuple[str, dict[str, ExportReport]]:
    """Export the dense and the optimized model to ``out_dir`` and compare their onnxruntime latency.

    Writes ``dense.onnx`` and ``optimized.onnx`` (both verified against torch). Returns the table text
    (the first line says which onnxruntime provider ran) and the two `ExportReport`s, keyed
    ``"dense"`` and ``"optimized"``.
    """
    os.makedirs(out_dir, exist_ok=True)
    reports = {
        name: to_onnx(mod, example_inputs, os.path.join(os.fspath(out_dir), f"{name}.onnx"), dtype=dtype,
                      dynamic_axes=dynamic_axes, device=device, latency_repeats=0)
        for name, mod in (("dense", dense_module), ("optimized", optimized_module))
    }
    # spinning off: the idle session's spinning threads would slow the timed one (see `session`)
    sessions = {name: session(rep.path, device, spinning=False) for name, rep in reports.items()}
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    latencies = compare_latency(sessions, cast_inputs(inputs, dtype), rounds=rounds, repeats=repeats)
    table = sessions["dense"].message + "\n" + latency_table(reports, latencies, baseline="dense")
    return table, reports
