"""Dense vs BTT vs BTT-MoE vs standard MoE feed-forward blocks at matched parameters.

Every block maps d -> hidden -> d with GELU in between. BTT-MoE uses E experts with k active in both
layers (d -> 4d -> d); BTT uses rank E (the same core parameters, no gate); the dense FFN and the standard
MoE (E dense experts, top-k) get the hidden width that matches the BTT-MoE block's parameter count.
For each block: parameters, FLOPs per token of the path run (from ``cost()``), and the best time of a
forward pass for every compute path (BTT-MoE: masked, sparse, grouped and the cost model's auto choice; standard
MoE: masked and grouped). Further tables set the BTT-MoE cost model's choice against the measured faster
path of one layer, per token count.

    python bench/moe.py                      # quick CPU run
    python bench/moe.py --d 1024 --tokens 128 1024 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import einfx
from einfx.moe import MoEFeedForward


class _FFN(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))

    def cost(self, tokens: int) -> einfx.Cost:
        costs = [_layer_cost(m, tokens) for m in (self.up, self.down)]
        return einfx.Cost(sum(c.params for c in costs), sum(c.flops for c in costs))


def _layer_cost(m: nn.Module, tokens: int) -> einfx.Cost:
    if isinstance(m, nn.Linear):
        return einfx.Cost(m.weight.numel() + m.bias.numel(), 2 * tokens * m.weight.numel())
    return m.cost(tokens)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def _time(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Best-of-``reps`` milliseconds of a forward pass (after two warm-up calls).

    The minimum, not the median: on a shared machine the other processes only ever add time.
    """
    for _ in range(2):
        module(x)
    times = []
    for _ in range(reps):
        _sync(x.device.type)
        t0 = time.perf_counter()
        module(x)
        _sync(x.device.type)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def _set_paths(block: nn.Module, path: str) -> None:
    for m in block.modules():
        if isinstance(m, (einfx.moe.BTTMoELinear, MoEFeedForward)):
            m.set_path(path)


def _gate_noise(block: nn.Module) -> None:
    # trained routers are not uniform: random gates spread the tokens over the experts
    with torch.no_grad():
        for m in block.modules():
            if hasattr(m, "gate"):
                m.gate.normal_(std=0.5)


def build_blocks(d: int, experts: int, k: int, device: str) -> dict[str, nn.Module]:
    moe = einfx.Structure.btt_moe(experts=experts, k=k)
    kw = {"device": device}
    btt_moe = _FFN(einfx.EinsumLinear(d, 4 * d, moe, **kw), einfx.EinsumLinear(4 * d, d, moe, **kw))
    target = btt_moe.cost(1).params
    btt = _FFN(einfx.EinsumLinear(d, 4 * d, einfx.Structure.btt(rank=experts), **kw),
               einfx.EinsumLinear(4 * d, d, einfx.Structure.btt(rank=experts), **kw))
    h_dense = max(1, round((target - d) / (2 * d + 1)))
    dense = _FFN(nn.Linear(d, h_dense, device=device), nn.Linear(h_dense, d, device=device))
    h_moe = MoEFeedForward.hidden_for_params(d, target, experts)
    std_moe = MoEFeedForward(d, h_moe, experts=experts, k=k, device=device)
    blocks = {f"dense (h={h_dense})": dense, f"BTT rank {experts} (h={4 * d})": btt,
              f"BTT-MoE E={experts} k={k} (h={4 * d})": btt_moe, f"std MoE E={experts} k={k} (h={h_moe})": std_moe}
    for b in blocks.values():
        _gate_noise(b)
        b.eval()
    return blocks


def block_table(d: int, tokens: int, experts: int, k: int, device: str, reps: int, rounds: int = 2
                ) -> list[list[str]]:
    blocks = build_blocks(d, experts, k, device)
    x = torch.randn(tokens, d, device=device)
    paths = {"btt_moe": ("masked", "sparse", "grouped", "auto"), "std": ("masked", "grouped")}
    cases = []
    for name, block in blocks.items():
        kind = "btt_moe" if "BTT-MoE" in name else "std" if "std MoE" in name else None
        cases += [(name, block, kind, path) for path in paths.get(kind, ("-",))]
    # interleaved rounds, best time per case: whatever ran first (allocator growth, a busy neighbour)
    # does not decide the table
    best = [float("inf")] * len(cases)
    for _ in range(rounds):
        for i, (_, block, kind, path) in enumerate(cases):
            if kind:
                _set_paths(block, path)
            best[i] = min(best[i], _time(block, x, reps))
    rows = []
    for (name, block, kind, path), ms in zip(cases, best):
        if kind:
            _set_paths(block, path)
        c = block.cost(tokens)
        shown = path
        if kind == "btt_moe" and path == "auto":
            shown = "auto→" + "/".join(m.path_for(tokens) for m in (block.up, block.down))
        rows.append([name, shown, f"{c.params:,}", f"{c.flops // tokens:,}", f"{ms:.2f}"])
    return rows


def path_table(d: int, token_list: list[int], experts: int, k: int, device: str, reps: int) -> list[list[str]]:
    layer = einfx.EinsumLinear(d, 4 * d, einfx.Structure.btt_moe(experts=experts, k=k), device=device).eval()
    _gate_noise(layer)
    rows = []
    for tokens in token_list:
        x = torch.randn(tokens, d, device=device)
        times = {"masked": float("inf"), "sparse": float("inf"), "grouped": float("inf")}
        for _ in range(2):  # interleaved rounds, as in block_table
            for path in times:
                layer.set_path(path)
                times[path] = min(times[path], _time(layer, x, reps))
        layer.set_path("auto")
        chosen = layer.path_for(tokens)
        faster = min(times, key=times.get)
        rows.append([str(tokens), f"{times['masked']:.2f}", f"{times['sparse']:.2f}", f"{times['grouped']:.2f}",
                     chosen, faster, "yes" if chosen == faster else "no"])
    return rows


def _print(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--path-experts", type=int, nargs="+", default=[8, 32],
                   help="expert counts for the path-choice table (at most the layer's largest useful rank)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} float32, "
          f"best of 2 rounds x {args.reps} forward passes (no grad)")
    for tokens in args.tokens:
        _print(f"FFN blocks d={args.d}, {tokens} tokens, matched parameters",
               ["block", "path", "params", "FLOPs/token", "ms"],
               block_table(args.d, tokens, args.experts, args.k, args.device, args.reps))
    for experts in args.path_experts:
        _print(f"BTT-MoE layer {args.d}->{4 * args.d}, E={experts} k={args.k}: cost-model choice vs measurement",
               ["tokens", "masked ms", "sparse ms", "grouped ms", "chosen", "faster", "agree"],
               path_table(args.d, sorted({1, 8, *args.tokens}), experts, args.k, args.device, args.reps))


if __name__ == "__main__":
    main()
