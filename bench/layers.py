"""Benchmark: one structured layer (EinsumLinear) against nn.Linear, per structure and size.

    python bench/layers.py [--sizes 768 1024 4096] [--tokens 512] [--repeat 7] [--quick]

Square d -> d layers with bias, torch eager, no_grad. CPU in float32 with ``--tokens`` tokens; with a GPU also
bfloat16 with ``--cuda-tokens`` tokens. Per size, the dense layer and every structure are timed side by side
(interleaved samples, medians; see _timing.py). Columns:
    params, FLOPs      exact, from EinsumLinear.cost(tokens) (bias included in params)
    ω ψ ν              the θ taxonomy of SPEC §1 (parameter sharing, rank, compute intensity)
    dense / struct ms  median time of nn.Linear / of the structured layer
    speedup            dense time / structured time (above 1: the structure is faster)
    FLOP ratio         dense FLOPs / structured FLOPs (the speedup the FLOP count promises)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import machine_description, median_times  # noqa: E402  (bench/ is the script's directory)

from einfx import EinsumLinear, Structure, taxonomy  # noqa: E402

__all__ = ["STRUCTURES", "main"]

STRUCTURES = (
    Structure.dense(), Structure.low_rank(rank_frac=0.25), Structure.kronecker(), Structure.tensor_train(rank=2),
    Structure.monarch(), Structure.btt(rank=4),
)


def _dense(d: int, device: str, dtype: torch.dtype) -> nn.Linear:
    dense = nn.Linear(d, d)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(d, d, generator=torch.Generator().manual_seed(d)) / d ** 0.5)
    return dense.to(device, dtype).eval()


def _time_size(d: int, tokens: int, device: str, dtype: torch.dtype, args) -> tuple[dict, float]:
    """{structure name: (layer, seconds)} and the dense seconds, all measured in one interleaved run."""
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    dense = _dense(d, device, dtype)
    layers = {s.name: EinsumLinear(d, d, s).to(device, dtype).eval() for s in STRUCTURES}
    fns = {name: (lambda m: (lambda: m(x)))(layer) for name, layer in layers.items()}
    fns["nn.Linear"] = lambda: dense(x)
    with torch.no_grad():
        times = median_times(fns, warmup=args.warmup, repeat=args.repeat, min_time=args.min_time)
    return {name: (layers[name], times[name]) for name in layers}, times["nn.Linear"]


def _row(name: str, d: int, tokens: int, layer: EinsumLinear, t_struct: float, t_dense: float, gpu=None) -> list:
    cost = layer.cost(tokens)
    dense_flops = 2 * tokens * d * d
    tax = taxonomy(layer.structure, d, d)
    row = [name, f"{cost.params:,}", f"{cost.flops / 1e9:.3f}", f"{tax.omega:.2f} {tax.psi:.2f} {tax.nu:.2f}",
           f"{t_dense * 1e3:.3f}", f"{t_struct * 1e3:.3f}", f"{t_dense / t_struct:.2f}",
           f"{dense_flops / cost.flops:.1f}"]
    if gpu is not None:
        g_struct, g_dense = gpu
        row += [f"{g_dense * 1e3:.3f}", f"{g_struct * 1e3:.3f}", f"{g_dense / g_struct:.2f}"]
    return row


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
              + " |")


def main(argv=None) -> None:
    """Parse arguments, time every structure at every size and print one table per size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[768, 1024, 4096], help="square layer sizes d")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per forward on the CPU (float32)")
    ap.add_argument("--cuda-tokens", type=int, default=8192, help="tokens per forward on the GPU (bfloat16)")
    ap.add_argument("--repeat", type=int, default=7, help="timed samples per layer (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    ap.add_argument("--min-time", type=float, default=0.02, help="shortest duration of one sample, seconds")
    ap.add_argument("--quick", action="store_true", help="sizes 768 1024, 3 samples: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat, args.min_time = [768, 1024], 3, 0.01
    cuda = torch.cuda.is_available()
    print(machine_description())
    print(f"CPU: float32, {args.tokens} tokens" + (f"; CUDA: bfloat16, {args.cuda_tokens} tokens" if cuda else "")
          + f"; medians of {args.repeat} interleaved samples; eager, no_grad")
    header = ["structure", "params", "GFLOPs", "ω ψ ν", "dense ms", "struct ms", "speedup", "FLOP ratio"]
    if cuda:
        header += ["cuda dense ms", "cuda struct ms", "cuda speedup"]
    for d in args.sizes:
        cpu, cpu_dense = _time_size(d, args.tokens, "cpu", torch.float32, args)
        gpu = _time_size(d, args.cuda_tokens, "cuda", torch.bfloat16, args) if cuda else None
        rows = []
        for name, (layer, t) in cpu.items():
            rows.append(_row(name, d, args.tokens, layer, t, cpu_dense,
                             (gpu[0][name][1], gpu[1]) if gpu else None))
        print(f"\n## d = {d} ({d}x{d} with bias; CPU FLOPs for {args.tokens} tokens)")
        _print_table(header, rows)


if __name__ == "__main__":
    main()
