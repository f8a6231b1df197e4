"""What the whole-graph passes buy end to end: all-MiniLM-L6-v2's structured exports with no graph pass, with
every pass but one (the transpose sinking; the attention biases; the layout passes heads_first,
split_before_gemms and orient_gemms), with every pass (`einfx.export.graph_passes`), and with the passes that
`einfx.export.pass_choice` keeps after timing them in the runtime (what ``to_onnx(..., runtime=R)`` writes),
side by side.

Each structure is exported once per runtime with ``to_onnx(..., runtime=R, tokens=batch x tokens,
graph_passes=False)`` (plans and fold-to-dense decisions measured in R); the passes are then applied to that
same file, so the variants differ only by the passes. Columns: median latency, speedup against the export
without passes, activation Transposes in the file (Transpose nodes whose input is not a constant), what the
passes did. 2 threads, float32, medians of interleaved rounds.

    python bench/graph_passes.py [--shape 8x128] [--out FILE]

Writes bench/results/graph_passes.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import onnx
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import einfx  # noqa: E402
from einfx import Policy, Structure  # noqa: E402
from einfx.export.graph_passes import optimize_graph  # noqa: E402
from einfx.export.pass_choice import choose_passes, label as kept_label  # noqa: E402
from einfx.export.runtimes import available, load  # noqa: E402
from e2e import THREADS, activation_transposes, minilm  # noqa: E402
from _timing import machine_description, median_times, write_result  # noqa: E402

STRUCTURES = {"btt(4)": Structure.btt(rank=4), "btt(1)": Structure.btt(rank=1),
              "low_rank(1/4)": Structure.low_rank(rank_frac=0.25)}
LAYOUT = ("heads_first", "split_before_gemms", "orient_gemms")  # the whole-graph layout passes
VARIANTS = {"no graph passes": None, "passes without sinking": ("sink_transposes",),
            "passes without attention biases": ("attention_biases",),
            "passes without heads first, early splits, orientation": LAYOUT, "all passes": (),
            "timed choice": "choose"}


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "-"


def run(batch: int, length: int) -> list[list[str]]:
    spec = minilm()
    model, example = spec.build(), spec.example()
    feeds = spec.feeds(batch, length)
    rows = []
    with tempfile.TemporaryDirectory(prefix="einfx-passes-") as folder:
        for runtime in ("onnxruntime", "openvino"):
            if not available(runtime):
                continue
            files, info = {}, {}
            for label, structure in STRUCTURES.items():
                optimized = einfx.optimize(model, Policy(default=structure), example_inputs=example)
                raw = os.path.join(folder, f"{label}-{runtime}.onnx".replace("/", "_"))
                einfx.export.to_onnx(optimized, example, raw, latency_repeats=0, runtime=runtime,
                                     tokens=batch * length, threads=THREADS, graph_passes=False)
                for number, (variant, skip) in enumerate(VARIANTS.items()):
                    path = raw
                    counts = {}
                    if skip == "choose":
                        rewritten, choice = choose_passes(onnx.load(raw), runtime, feeds, THREADS)
                        counts = dict(choice.counts, kept=kept_label(choice.skipped))
                        path = raw.replace(".onnx", "-chosen.onnx")
                        onnx.save(rewritten, path)
                    elif skip is not None:
                        rewritten, counts = optimize_graph(onnx.load(raw), skip=skip)
                        path = raw.replace(".onnx", f"-{number}.onnx")
                        onnx.save(rewritten, path)
                    files[(label, variant)] = path
                    info[(label, variant)] = (activation_transposes(path), _counts(counts))
                print(f"{label} exported for {runtime}", flush=True)
            runners = {k: load(runtime, p, THREADS, spinning=False) for k, p in files.items()}
            fns = {k: (lambda r=r: r({n: feeds[n] for n in r.input_names})) for k, r in runners.items()}
            times = median_times(fns, warmup=2, repeat=9, min_time=0.3)
            for (label, variant), t in times.items():
                base = times[(label, "no graph passes")]
                transposes, counts = info[(label, variant)]
                rows.append([label, runtime, variant, f"{t * 1e3:.1f}", f"{base / t:.2f}x", str(transposes), counts])
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8x128", help="batch x tokens")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "graph_passes.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    batch, length = (int(v) for v in args.shape.split("x"))
    rows = run(batch, length)
    header = ["structure", "runtime", "graph", "ms", "speedup vs no passes", "activation transposes in file",
              "passes did"]
    lines = ["# Whole-graph passes on all-MiniLM-L6-v2's structured exports", "",
             f"{machine_description()}; {THREADS} threads; float32; batch {batch} x {length} tokens; the same "
             "export per structure and runtime with and without the passes; medians of interleaved rounds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    write_result(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
