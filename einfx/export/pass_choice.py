"""Measured whole-graph passes: an optional pass stays only where it makes the graph faster in its runtime.

Every pass of `einfx.export.graph_passes` is exact, but five of them trade one kernel for another, and
whether that pays depends on the runtime: fusing q, k and v into one MatMul gives a wider GEMM and a Split,
which onnxruntime ran 0.89-0.99x as fast at d = 384 (bench/results/graph_passes.md); sharing the fused
siblings' relayout makes one large Transpose of three, which OpenVINO ran slower at MiniLM btt(4) (it
copies the key's slice the slow way too), where onnxruntime reads it inside the stacked GEMM; a sunk
transpose changes which MatMul operand is transposed; a residual sum kept out of onnxruntime's
SkipLayerNormalization fusion pays only where that fused kernel is the slower one; a GEMM computed the other
way round puts its constant core on the other side (OpenVINO ran MiniLM btt(1) 53.6 ms without the
orientation pass and 57.4 ms with it, for one set of tuned plans, where onnxruntime gains). So for a given
runtime the graph is built with every pass and with each non-empty subset of the optional passes that did
something left out (at most twenty-four graphs: sharing relayouts needs sibling fusion, so it is never kept
without it), each is compiled and timed side by side at the deployment shape (interleaved rounds, medians),
and the fastest is kept; leaving passes out must win by `KEEP_MARGIN`, so timing noise keeps the full set.

    graph, choice = choose_passes(model, "openvino", feeds)
    choice.skipped      # ("fuse_siblings",)
    choice.times        # {"all passes": 0.0213, "without fuse_siblings": 0.0198}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from einfx.export.graph_passes import LABELS, optimize_graph
from einfx.export.runtimes import load
from einfx.export.tune import median_times

__all__ = ["PassChoice", "choose_passes", "OPTIONAL", "KEEP_MARGIN", "label"]

# passes whose benefit depends on the runtime; the others (dedupe, transpose pairs, prune) only remove work
OPTIONAL = ("fuse_siblings", "share_relayouts", "sink_transposes", "plain_norm_sums", "orient_gemms")
# a pass that only rewrites what another makes: left out with it, so no two timed graphs are the same
_NEEDS = {"share_relayouts": "fuse_siblings"}
# a graph with passes left out replaces the full one only when it is this much faster
KEEP_MARGIN = 1.02


@dataclass(frozen=True)
class PassChoice:
    """What was timed and kept.

    Attributes:
        runtime: where the graphs were timed.
        skipped: the optional passes left out of the kept graph.
        times: label (`label`) -> median seconds per run, for every graph timed.
        counts: the kept graph's pass counts (as `optimize_graph` returns them).
        shapes: input name -> the static shape the graphs were compiled for; empty: compiled with their
            dynamic axes.
    """

    runtime: str
    skipped: tuple[str, ...]
    times: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        times_ms = {k: round(v * 1e3, 4) for k, v in self.times.items()}
        return {"runtime": self.runtime, "skipped": list(self.skipped), "times_ms": times_ms,
                "shapes": {k: list(v) for k, v in self.shapes.items()}}


def label(skipped: tuple[str, ...]) -> str:
    return "all passes" if not skipped else "without " + ", ".join(skipped)


def choose_passes(model: onnx.ModelProto, runtime: str, feeds: Mapping[str, np.ndarray], threads: int = 0, *,
                  timer=median_times, margin: float = KEEP_MARGIN, static: bool = False
                  ) -> tuple[onnx.ModelProto, PassChoice]:
    """The fastest of ``model`` rewritten with every pass and with the active optional passes left out.

    Args:
        model: the exported graph, before any whole-graph pass.
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        feeds: input name -> array at the deployment shape (inputs the graph does not have are dropped).
        threads: runtime threads (0: the runtime's default).
        timer: ``timer({label: fn}) -> {label: seconds}`` (tests substitute a fake clock).
        margin: how much faster a graph with passes left out must be to be kept.
        static: compile each graph for the feeds' shapes (`einfx.export.runtimes.load` with ``shapes``), as a
            deployment at that static shape does.
    """
    full, counts = optimize_graph(model)
    active = [name for name in OPTIONAL if counts[LABELS[name]]]
    graphs = {(): (full, counts)}
    for k in range(1, len(active) + 1):
        for skipped in itertools.combinations(active, k):
            if any(_NEEDS.get(name) in skipped for name in active if name not in skipped):
                continue  # the same graph as with the dependent pass left out too
            graphs[skipped] = optimize_graph(model, skip=skipped)
    names = {i.name for i in model.graph.input}
    inputs = {k: v for k, v in feeds.items() if k in names}
    shapes = {k: tuple(v.shape) for k, v in inputs.items()} if static else {}
    if len(graphs) == 1:
        return full, PassChoice(runtime, (), {}, counts, shapes)
    runners = {label(s): load(runtime, g, threads, spinning=False, shapes=shapes or None)
               for s, (g, _) in graphs.items()}
    times = timer({name: (lambda r=r: r(inputs)) for name, r in runners.items()})
    best = min(graphs, key=lambda s: times[label(s)])
    if times[label(best)] * margin >= times[label(())]:
        best = ()
    graph, kept = graphs[best]
    return graph, PassChoice(runtime, best, times, kept, shapes)
