"""`calibrate(device)`: measure a `DeviceProfile` in well under a minute and store it.

Measured: GEMM rate at a large square-ish shape (float32, and float16/bfloat16), the efficiency of a
batched GEMM with small dimensions (solved for the half-efficiency dimension h) and its slowdown when it reads
an operand through a transposed view, the fixed cost of an eager structured-layer call, the bandwidth of a
chunked copy, of an element-granular transpose and of a plain clone, the cost of one tiny kernel launch
and of one view op. Each figure is the median of repeated timings.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from einfx.planning.plan import execute
from einfx.planning.planner import plan_layer
from einfx.structures.structure import Structure
from einfx.planning.profile import DeviceProfile, default_profile, device_key, save_profile

__all__ = ["calibrate"]


def _timer(device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # single-threaded CPU work is timed in process CPU time: on a shared host, wall time measures the
    # other tenants; with several threads, CPU time would also count the threads' spin-waits, so wall it is
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter

    def run(fn, reps: int = 7, inner: int = 1) -> float:
        fn()
        sync()
        samples = []
        for _ in range(reps):
            start = clock()
            for _ in range(inner):
                fn()
            sync()
            samples.append((clock() - start) / inner)
        samples.sort()
        return samples[len(samples) // 2]

    return run


def _solve_half_dim(eff: float, dims: tuple[int, int, int]) -> float:
    """h such that Π d / (d + h) = eff (bisection; eff is clamped to a sane range)."""
    eff = min(max(eff, 1e-3), 0.999)
    lo, hi = 0.0, 4096.0
    for _ in range(60):
        mid = (lo + hi) / 2
        value = 1.0
        for d in dims:
            value *= d / (d + mid)
        lo, hi = (mid, hi) if value > eff else (lo, mid)
    return (lo + hi) / 2


def _small_rate(run, dtype) -> float:
    # CPU half precision is often emulated and slow: a small shape keeps calibration short
    a, b = torch.randn(128, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    return 2 * 128 * 256 * 256 / run(lambda: a @ b, reps=3)


def _with_call_cost(profile: DeviceProfile, dev: torch.device, run) -> DeviceProfile:
    """Measure ``call_s``: an eager run of a tiny structured plan minus what its steps are predicted to cost."""
    sizes = Structure.btt(rank=1).resolve(64, 64)
    plan = plan_layer(sizes, 1, "float32", profile)
    cores = {"A": torch.randn(sizes.a_shape, device=dev), "B": torch.randn(sizes.b_shape, device=dev)}
    x = torch.randn(1, 64, device=dev)
    with torch.no_grad():
        measured = run(lambda: execute(plan, x, cores, None), reps=5, inner=200)
    steps = plan_layer(sizes, 1, "float32", replace(profile, call_s=0.0)).time
    return replace(profile, call_s=max(0.0, measured - steps))


def calibrate(device="cpu", *, save: bool = True, path=None) -> DeviceProfile:
    """Measure the cost-model constants of ``device`` ("cpu" or "cuda[:i]") and (by default) store them.

    Args:
        device: the device to measure.
        save: write the profile to the user cache dir (or ``path``) as versioned JSON.
        path: an explicit file to write instead of the cache dir.

    Returns:
        The measured `DeviceProfile` (name ``"<kind>-calibrated"``).
    """
    kind = device_key(device)
    dev = torch.device(device if kind == "cuda" else "cpu")
    run = _timer(dev)
    base = default_profile(kind)
    big = (1024, 2048, 2048) if kind == "cuda" else (512, 1024, 1024)
    m, k, n = big

    def rate(dtype) -> float:
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(k, n, device=dev, dtype=dtype)
        return 2 * m * n * k / run(lambda: a @ b)

    f32 = rate(torch.float32)
    half = rate(torch.float16) if kind == "cuda" else _small_rate(run, torch.bfloat16)
    # small batched GEMM: (batch, 512, 32) @ (batch, 32, 32)
    bsz, mm, kk, nn = 64, 512, 32, 32
    xa = torch.randn(bsz, mm, kk, device=dev)
    xb = torch.randn(bsz, kk, nn, device=dev)
    small_rate = 2 * bsz * mm * kk * nn / run(lambda: torch.bmm(xa, xb))
    h = _solve_half_dim(small_rate / f32, (mm, nn, kk))
    # the same GEMM reading its left operand through a transposed view (unit stride along the rows), stored
    # as a planned intermediate is: contraction index outermost, the batch index between
    xt = torch.randn(kk, bsz, mm, device=dev).permute(1, 2, 0)
    transposed = run(lambda: torch.bmm(xt, xb)) * small_rate / (2 * bsz * mm * kk * nn)
    # bandwidths (bytes read + written)
    t = torch.randn(512, 64, 64, device=dev)
    copy_bw = 2 * t.numel() * 4 / run(lambda: t.permute(1, 0, 2).contiguous())
    sq = torch.randn(2048, 2048, device=dev)
    transpose_bw = 2 * sq.numel() * 4 / run(lambda: sq.t().contiguous())
    tok = torch.randn(512, 64, 64, device=dev)
    block_bw = 2 * tok.numel() * 4 / run(lambda: tok.transpose(1, 2).contiguous())
    # streaming copy into a preallocated destination (DRAM bandwidth; a clone would time page faults)
    flat = torch.randn(8 * 1024 * 1024, device=dev)
    dst = torch.empty_like(flat)
    mem_bw = 2 * flat.numel() * 4 / run(lambda: dst.copy_(flat))
    one = torch.ones(1, device=dev)
    launch = run(lambda: one.add(1.0), reps=5, inner=200)
    view = run(lambda: flat.view(1024, -1), reps=5, inner=500)
    profile = _with_call_cost(DeviceProfile(f"{kind}-calibrated", kind, flops_fp32=f32, flops_half=half, gemm_half_dim=h,
                            copy_bandwidth=copy_bw, transpose_bandwidth=transpose_bw, block_bandwidth=block_bw,
                            memory_bandwidth=mem_bw, cache_bytes=base.cache_bytes,
                            launch_s=launch, view_s=view, transposed_read=max(1.0, transposed),
                            threads=torch.get_num_threads() if kind == "cpu" else 1,
                            strided_gemm=base.strided_gemm), dev, run)
    if save:
        save_profile(profile, path)
    return profile
