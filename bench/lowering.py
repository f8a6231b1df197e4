"""Benchmark: dense vs the plain (naive) BTT vs the planned + lowered BTT, in torch and onnxruntime.

    python bench/lowering.py [--quick] [--reps 7]

CPU float32, 512 tokens, d ∈ {1024, 4096}, BTT rank ∈ {1, 4}; torch eager and onnxruntime CPU (2 intra-op
threads). With a GPU: torch bfloat16 with 8192 tokens. Measurements of dense / naive / planned are
interleaved and the medians reported. "planned" is the eager layer running its plan in torch, and the
lowered (exported) plan in onnxruntime, after fold-to-dense (a layer the cost
model says loses to dense runs as an exact dense layer). Then: Spearman correlation of predicted vs measured
time over (layer, plan) pairs. Columns: times in ms, speedup = dense / variant, "realized" = planned speedup
/ FLOP ratio, predicted = the cost model's planned time.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
from torch import fx, nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _timing import machine_description, median_times  # noqa: E402  (bench/ is the script's directory)
from einfx import EinsumLinear, Structure  # noqa: E402
from einfx.export.session import session  # noqa: E402
from einfx.passes.fold import dense_linear, fold_decision  # noqa: E402
from einfx.passes.lower import lower  # noqa: E402
from einfx.rewriter.trace import EinfxTracer  # noqa: E402
from einfx.planning import all_plans, default_profile, execute  # noqa: E402
from einfx.structures import functional as Fn  # noqa: E402


_THREADS = 2
# On a shared, oversubscribed host wall-clock timings mostly measure the other tenants; process CPU time of a
# single-threaded run is what the code itself costs. "--clock wall" gives wall-clock times instead.
_CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


class _Naive(nn.Module):
    """The ANCHORS plain BTT: functional.contract (two bmms with permute copies in between)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        s = self.layer.sizes
        return Fn.contract(x, self.layer.A, self.layer.B, s, s.best_token_order()) + self.layer.bias


def _variants(layer, tokens, profile):
    """dense, naive and planned (lowered, or folded to dense when the cost model says dense wins)."""
    dense = dense_linear(layer)
    decision = fold_decision(layer, tokens, profile)
    if decision.fold:
        planned = dense_linear(layer)
    elif profile.strided_gemm:
        # torch: the eager layer runs its plan (token blocks included), as in a model from einfx.optimize
        planned = layer
    else:
        # onnxruntime: the lowered graph (whole-batch plan of plain nodes) is what gets exported
        wrapped = nn.Sequential(layer)
        planned = lower(fx.GraphModule(wrapped, EinfxTracer().trace(wrapped)), tokens=tokens,
                        profile=profile).graph_module.eval()
    return {"dense": dense, "naive": _Naive(layer), "planned": planned}, decision


def _interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per call, samples interleaved round-robin; each sample repeats the call >= 20 ms."""
    return median_times(fns, warmup=3, repeat=reps, min_time=0.02, clock=_clock)


def _ort_session(module, x, path):
    """An onnxruntime run of the exported module through io-binding (output memory from onnxruntime's arena),
    the way einfx deploys: the timed call is the session run alone. The sessions share one thread pool:
    with a pool each, the idle sessions' spinning threads slow the timed one (2.5x measured on 2 cores)."""
    torch.onnx.export(module, (x,), path, dynamo=True, verbose=False)
    sess = session(path, "cpu", threads=_THREADS, shared_pool=True)
    binding = sess._binding(sess.place([x]), None)
    return lambda: sess.inner.run_with_iobinding(binding)


def _row(d, rank, flop_ratio, t, predicted, folded):
    sp_n, sp_p = t["dense"] / t["naive"], t["dense"] / t["planned"]
    return (f"| {d} | {rank} | {flop_ratio:.0f} | {t['dense'] * 1e3:.2f} | {t['naive'] * 1e3:.2f} | "
            f"{t['planned'] * 1e3:.2f}{' (folded)' if folded else ''} | {sp_n:.2f} | {sp_p:.2f} | "
            f"{sp_p / flop_ratio:.0%} | {predicted * 1e3:.2f} |")


HEADER = ("| d | rank | FLOP ratio | dense ms | naive ms | planned ms | naive speedup | planned speedup | "
          "realized | predicted ms |\n|---|---|---|---|---|---|---|---|---|---|")


def _btt_case(d, rank, tokens, profile, **layer_kwargs):
    """A BTT layer of width d: its input, dense/structured FLOP ratio, variants and fold decision."""
    layer = EinsumLinear(d, d, Structure.btt(rank=rank), **layer_kwargs).eval()
    param = layer.A
    x = torch.randn(tokens, d, device=param.device, dtype=param.dtype)
    flop_ratio = (d * d) / layer.sizes.macs_per_token(layer.sizes.best_token_order())
    mods, dec = _variants(layer, tokens, profile)
    return x, flop_ratio, mods, dec


def bench_cpu(dims, ranks, tokens, reps, backend="torch"):
    """Rows of the main table for one backend ("torch": the eager layer; "onnxruntime": the lowered graph).

    One backend at a time: onnxruntime's pool threads keep spinning for a while after its runs and would
    slow torch measurements taken right after them.
    """
    torch.manual_seed(0)
    cpu = default_profile("cpu")
    prof = cpu if backend == "torch" else cpu.with_backend("onnxruntime")
    rows = []
    for d in dims:
        for rank in ranks:
            x, flop_ratio, mods, dec = _btt_case(d, rank, tokens, prof)
            with torch.no_grad():
                if backend == "torch":
                    ref = mods["dense"](x)
                    for key, m in mods.items():
                        err = ((m(x) - ref).norm() / ref.norm()).item()
                        assert err < 1e-4, (key, err)
                    t = _interleaved({k: (lambda m=m: m(x)) for k, m in mods.items()}, reps)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        fns = {k: _ort_session(m, x, os.path.join(tmp, f"{k}.onnx")) for k, m in mods.items()}
                        t = _interleaved(fns, reps)
            pred = dec.dense_time if dec.fold else dec.structured_time
            rows.append(_row(d, rank, flop_ratio, t, pred, dec.fold))
            print(f"  {backend} d={d} rank={rank} done", file=sys.stderr, flush=True)
    return rows


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def bench_spearman(tokens, reps, per_layer=4):
    """Predicted vs measured time (torch eager, execute(plan)) over (layer, plan) pairs."""
    torch.manual_seed(1)
    rnd = random.Random(0)
    cpu = default_profile("cpu")
    pairs = []
    cases = [(256, Structure.btt(rank=1)), (256, Structure.btt(rank=4)), (1024, Structure.btt(rank=1)),
             (1024, Structure.btt(rank=4)), (1024, Structure.kronecker()), (512, Structure.low_rank(rank=64)),
             (512, Structure.tensor_train(rank=2)), (768, Structure.monarch())]
    for d, s in cases:
        layer = EinsumLinear(d, d, s)
        plans = all_plans(layer.sizes, tokens, "float32", cpu)
        best = min(plans, key=lambda p: p.time)
        # plans predicted within 20x of the best (the rest, e.g. outer-product orders, take seconds each)
        plans = [p for p in plans if p.time <= 20 * best.time]
        naive_like = max((p for p in plans if p.order != "fold"), key=lambda p: p.time)
        chosen = [best, naive_like] + rnd.sample(plans, min(per_layer - 2, len(plans)))
        x = torch.randn(tokens, d)
        with torch.no_grad():
            fns = {i: (lambda p=p: execute(p, x, layer.cores())) for i, p in enumerate(chosen)}
            t = _interleaved(fns, reps)
        pairs += [(p.time, t[i], f"{s.name}@{d} {p.order}") for i, p in enumerate(chosen)]
        print(f"  measured {s.name}@{d}", file=sys.stderr, flush=True)
    rho = _spearman([p[0] for p in pairs], [p[1] for p in pairs])
    return rho, pairs


FOLD_STRUCTURES = {
    "btt(1)": lambda: Structure.btt(rank=1), "btt(2)": lambda: Structure.btt(rank=2),
    "btt(4)": lambda: Structure.btt(rank=4), "monarch": Structure.monarch, "kronecker": Structure.kronecker,
    "tensor_train(2)": lambda: Structure.tensor_train(rank=2),
    "low_rank(1/4)": lambda: Structure.low_rank(rank_frac=0.25),
}


def bench_fold(dims, tokens, reps, backend="torch"):
    """Every structure at small and mid sizes, after fold-to-dense: the layer as deployed vs dense.

    A folded layer runs the same dense layer as the baseline (speedup 1 by construction, not re-measured).
    Returns {(d, structure): cell text} and the smallest measured speedup of a layer that stayed structured.
    """
    cpu = default_profile("cpu")
    prof = cpu if backend == "torch" else cpu.with_backend("onnxruntime")
    cells, worst = {}, float("inf")
    for d in dims:
        for name, make in FOLD_STRUCTURES.items():
            torch.manual_seed(0)
            layer = EinsumLinear(d, d, make()).eval()
            x = torch.randn(tokens, d)
            mods, dec = _variants(layer, tokens, prof)
            predicted = dec.dense_time / dec.structured_time
            if dec.fold:
                cells[d, name] = f"folded (pred {predicted:.2f}x)"
                continue
            with torch.no_grad():
                if backend == "torch":
                    t = _interleaved({k: (lambda m=mods[k]: m(x)) for k in ("dense", "planned")}, reps)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        fns = {k: _ort_session(mods[k], x, os.path.join(tmp, f"{k}.onnx")) for k in ("dense", "planned")}
                        t = _interleaved(fns, reps)
            speedup = t["dense"] / t["planned"]
            worst = min(worst, speedup)
            cells[d, name] = f"{speedup:.2f}x (pred {predicted:.2f}x)"
        print(f"  {backend} fold sweep d={d} done", file=sys.stderr, flush=True)
    return cells, worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d = 1024 only, fewer repetitions")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-spearman", action="store_true")
    ap.add_argument("--only-spearman", action="store_true")
    ap.add_argument("--no-fold-sweep", action="store_true", help="skip the fold-to-dense sweep (small layers)")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--clock", choices=tuple(_CLOCK), default="wall",
                    help="wall: wall-clock time; cpu: process CPU time (robust on a shared host, use --threads 1)")
    ap.add_argument("--dims", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _THREADS, _clock
    _THREADS, _clock = args.threads, _CLOCK[args.clock]
    dims = tuple(args.dims) if args.dims else (1024,) if args.quick else (1024, 4096)
    print(f"# einfx lowering benchmark ({machine_description()}; {args.clock} clock, medians of {args.reps} "
          f"interleaved samples of >= 20 ms, load average {os.getloadavg()[0]:.1f})\n")
    backends = ("torch",) if args.no_ort else ("torch", "onnxruntime")
    sweep = not (args.quick or args.no_fold_sweep or args.only_spearman)
    sweep_dims = (64, 128, 256, 512)
    tables, folds, rho, pairs = {}, {}, None, []
    # torch first, every part of it (the Spearman pairs included), then onnxruntime: see bench_cpu
    for backend in backends:
        if not args.only_spearman:
            tables[backend] = bench_cpu(dims, (1, 4), 512, args.reps, backend)
        if sweep:
            folds[backend] = bench_fold(sweep_dims, 512, args.reps, backend)
        if backend == "torch" and not args.no_spearman:
            rho, pairs = bench_spearman(512, max(3, args.reps - 2))
    for backend, rows in tables.items():
        print(f"## CPU float32, 512 tokens, {backend}\n{HEADER}")
        print("\n".join(rows) + "\n")
    if torch.cuda.is_available() and not args.only_spearman:
        print("## GPU bfloat16, 8192 tokens, torch\n" + HEADER)
        print("\n".join(bench_gpu(dims, (1, 4), 8192, args.reps)) + "\n")
        ort_rows = None if args.no_ort else bench_gpu_ort(dims, (1, 4), 8192, args.reps)
        if ort_rows is None:
            print("(onnxruntime CUDA rows skipped: --no-ort, or no CUDA provider in onnxruntime)\n")
        else:
            print("## GPU float16, 8192 tokens, onnxruntime CUDA\n" + HEADER)
            print("\n".join(ort_rows) + "\n")
    else:
        print("(no GPU here: GPU rows skipped)\n")
    if folds:
        print("## Fold-to-dense sweep, CPU float32, 512 tokens: speedup over dense as deployed\n"
              "| d | structure | " + " | ".join(folds) + " |\n|---|---|" + "---|" * len(folds))
        for d in sweep_dims:
            for name in FOLD_STRUCTURES:
                print(f"| {d} | {name} | " + " | ".join(cells[d, name] for cells, _ in folds.values()) + " |")
        worst = ", ".join(f"{b} {w:.2f}x" for b, (_, w) in folds.items())
        print(f"\nSlowest layer that stayed structured: {worst} dense.\n")
    if rho is not None:
        print(f"## Cost model ranking: Spearman {rho:.3f} over {len(pairs)} (layer, plan) pairs (CPU torch)\n"
              "| pair | predicted ms | measured ms |\n|---|---|---|")
        for pred, meas, label in sorted(pairs):
            print(f"| {label} | {pred * 1e3:.3f} | {meas * 1e3:.3f} |")

def bench_gpu(dims, ranks, tokens, reps):
    """torch on CUDA, bfloat16: dense, naive and the eager planned layer."""
    torch.manual_seed(0)
    gpu = default_profile("cuda")
    rows = []
    for d in dims:
        for rank in ranks:
            with torch.no_grad():
                x, flop_ratio, mods, dec = _btt_case(d, rank, tokens, gpu, device="cuda", dtype=torch.bfloat16)
                t = _interleaved({k: (lambda m=m: m(x)) for k, m in mods.items()}, reps * 3)
            pred = dec.dense_time if dec.fold else dec.structured_time
            rows.append(_row(d, rank, flop_ratio, t, pred, dec.fold))
    return rows


def bench_gpu_ort(dims, ranks, tokens, reps):
    """onnxruntime CUDA, float16: dense, naive and lowered graphs through io-binding (None without the provider)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    torch.manual_seed(0)
    prof = default_profile("cuda").with_backend("onnxruntime")
    rows = []
    for d in dims:
        for rank in ranks:
            x, flop_ratio, mods, dec = _btt_case(d, rank, tokens, prof)
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
                fns = {}
                for key, module in mods.items():
                    path = os.path.join(tmp, f"{key}.onnx")
                    torch.onnx.export(module.half(), (x.half(),), path, dynamo=True, verbose=False)
                    sess = session(path, "cuda")
                    binding = sess._binding(sess.place([x.half()]), None)
                    fns[key] = lambda sess=sess, binding=binding: sess.inner.run_with_iobinding(binding)
                t = _interleaved(fns, reps * 3)
            pred = dec.dense_time if dec.fold else dec.structured_time
            rows.append(_row(d, rank, flop_ratio, t, pred, dec.fold))
    return rows


if __name__ == "__main__":
    main()
