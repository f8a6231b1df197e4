"""Compute-efficiency of structured linear layers at small scale (the paper's scaling findings).

For each task (regression on a random teacher MLP; byte-level GPT on the standard library's sources) every
structure (dense, low-rank, Kronecker, Tensor-Train, Monarch, BTT rank 2, BTT-MoE E=8 k=2, standard MoE)
trains at several widths; each run is evaluated at several step counts. Per structure: loss against
training FLOPs, the compute-optimal frontier, a power-law fit L = a·C^(−b) + c and the compute multiplier
vs dense; then one verdict per claim of the paper. Outputs per task: results/scaling_<task>.md, .json, .png.

    python bench/scaling.py                      # default: both tasks in parallel (one core each), under
                                                 # 60 min on 2 free CPU cores
    python bench/scaling.py --estimate           # time a few steps of every run, print the plan and ETA
    python bench/scaling.py --quick              # smoke run (< 5 min), writes scaling_<task>_quick.*
    python bench/scaling.py --device cuda        # larger preset on a GPU
    python bench/scaling.py --task text --variants dense,btt
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import einfx  # noqa: E402
from einfx.errors import ShapeError  # noqa: E402
from scaling_lib.models import GPT, MLP, VARIANTS, Variant, variant  # noqa: E402
from scaling_lib.plan import TaskScale, preset  # noqa: E402
from scaling_lib.report import write_outputs  # noqa: E402
from scaling_lib.tasks import RegressionTask, TextTask  # noqa: E402
from scaling_lib.train import RunConfig, forward_flops, step_seconds, train_run  # noqa: E402
from scaling_lib.verdict import summarize, verdicts  # noqa: E402

__all__ = ["main", "run_task", "planned_runs", "TASKS"]

TASKS = ("regression", "text")
RESULTS = Path(__file__).resolve().parent / "results"
FLOPS_NOTE = {
    "regression": "each linear layer's cost(tokens); BTT-MoE counts its k = 2 active experts and its gate",
    "text": "each linear layer's cost(tokens) plus attention QKᵀ and AV (4·T·d per token and layer); "
            "BTT-MoE counts its k = 2 active experts and its gate; embeddings, norms, softmax not counted",
}


def _task(name: str, scale: TaskScale):
    return RegressionTask(**scale.task_args) if name == "regression" else TextTask(**scale.task_args)


def _builder(task, name: str, scale: TaskScale, v: Variant, width: int):
    if name == "regression":
        return functools.partial(MLP, task.d_x, task.d_y, width, scale.depth, v)
    return functools.partial(GPT, width, scale.depth, task.context, v)


def planned_runs(task, name: str, scale: TaskScale, variants) -> list[tuple[Variant, int]]:
    """(variant, width) pairs to train: ``widths`` for all, ``extra_widths`` while FLOPs/token stay within
    the widest dense model's; widths a structure cannot factor are skipped (printed)."""
    tokens = task.tokens_per_batch(1)
    cap = forward_flops(_builder(task, name, scale, variant("dense"), max(scale.widths))(), tokens)
    runs = []
    for v in variants:
        extra = () if v.structure.kind == "dense" or v.name in scale.no_extra else scale.extra_widths
        for width in scale.widths + extra:
            try:
                model = _builder(task, name, scale, v, width)()
            except ShapeError as exc:
                print(f"  skip {v.name} at width {width}: {exc}")
                continue
            if width in scale.widths or forward_flops(model, tokens) <= cap:
                runs.append((v, width))
    return runs


def _config(scale: TaskScale, width: int) -> RunConfig:
    return RunConfig(width=width, checkpoints=scale.checkpoints, batch=scale.batch, lr=scale.lr,
                     base_width=min(scale.widths), warmup=scale.warmup)


def _estimate(task, name, scale, runs, device) -> list[float]:
    """Estimated seconds of each run, from a few timed steps (CPU time on CPU, see `step_seconds`)."""
    out = []
    print(f"  {'structure':<13}{'width':>6}{'s/step':>9}{'est. s':>9}")
    for v, width in runs:
        sec = step_seconds(task, _builder(task, name, scale, v, width), _config(scale, width), device)
        out.append(sec * scale.checkpoints[-1])
        print(f"  {v.name:<13}{width:>6}{sec:>9.4f}{out[-1]:>9.1f}")
    return out


def _taxonomy(v: Variant, width: int) -> dict | None:
    if v.moe_ffn:
        return None
    t = einfx.taxonomy(v.structure, width, width)
    return {"omega": t.omega, "psi": t.psi, "nu": t.nu}


def run_task(name: str, mode: str, device: str, variants, out_dir: Path, estimate: bool = False) -> dict | None:
    """Train every planned run of task ``name`` and write its outputs; returns the record (None if estimating)."""
    scale = preset("cuda" if device.startswith("cuda") and mode == "default" else mode, name)
    t0 = time.perf_counter()
    task = _task(name, scale)
    runs = planned_runs(task, name, scale, variants)
    print(f"[{name}] {len(runs)} runs × {scale.checkpoints[-1]} steps (checkpoints {scale.checkpoints}); "
          f"data ready in {time.perf_counter() - t0:.1f} s")
    est = None
    if estimate or mode != "quick":
        est = _estimate(task, name, scale, runs, device)
        print(f"[{name}] estimated training time: {sum(est) / 60:.1f} min (from timed steps)", flush=True)
        if estimate:
            return {"task": name, "estimate_s": sum(est)}
    results = []
    for i, (v, width) in enumerate(runs):
        r = train_run(task, _builder(task, name, scale, v, width), v.name, _config(scale, width), device)
        results.append(r)
        last = r.points[-1][2] if r.points else float("nan")
        eta = ""
        if est:  # the remaining estimates, corrected by how the finished runs compared with theirs
            pace = sum(x.seconds for x in results) / max(sum(est[: i + 1]), 1e-9)
            eta = f", ETA {pace * sum(est[i + 1:]) / 60:.1f} min"
        print(f"[{name}] {i + 1}/{len(runs)} {v.name:<13} d={width:<5} {r.flops_per_step / 1e9:8.3f} GFLOP/step "
              f"loss {last:.4f}  {r.seconds:6.1f} s  (elapsed {(time.perf_counter() - t0) / 60:.1f} min{eta})"
              + ("  DIVERGED" if r.diverged else ""), flush=True)
    points = {v.name: [(c, l) for r in results if r.variant == v.name for _, c, l in r.points] for v in variants}
    summaries = summarize({k: p for k, p in points.items() if p})
    rows = []
    for v in variants:
        if v.name not in summaries:
            continue
        mine = [r for r in results if r.variant == v.name]
        widths = sorted({r.width for r in mine})
        params = f"{min(r.params for r in mine)}–{max(r.params for r in mine)}"
        rows.append({**summaries[v.name].to_dict(), "widths": widths, "params": params,
                     "taxonomy": _taxonomy(v, max(widths))})
    record = {
        "task": name, "mode": mode, "device": device, "loss": task.loss_name, "flops_note": FLOPS_NOTE[name],
        "setup": _setup(name, scale, task), "seconds": time.perf_counter() - t0, "structures": rows,
        "verdicts": [vars(x) for x in verdicts(summaries)], "runs": [r.to_dict() for r in results],
    }
    stem = f"scaling_{name}" + ("_quick" if mode == "quick" else "")
    paths = write_outputs(record, out_dir, stem)
    print(f"[{name}] wrote {', '.join(str(p) for p in paths.values())}")
    return record


def _setup(name: str, scale: TaskScale, task) -> str:
    common = (f"widths {scale.widths} (+ {scale.extra_widths} for structures cheaper than dense), batch "
              f"{scale.batch}, Adam (β 0.9, 0.98) lr {scale.lr} at width {min(scale.widths)} with μP width scaling "
              f"and einfx.param_groups multipliers, {scale.warmup} warmup steps then constant, grad clip 1, "
              f"held-out loss at steps {scale.checkpoints}")
    if name == "regression":
        return (f"residual MLP students, {scale.depth} FFN blocks (d→d→d), on {task.d_x}→{task.d_y} regression "
                f"from a GELU teacher of width {task.teacher_width} and depth {task.teacher_depth}; "
                f"{task.train_samples} training samples, {task.eval_samples} held out; " + common)
    return (f"byte-level GPT, {scale.depth} layers, context {task.context}, heads of 32, FFN 4d; standard library "
            f".py sources, {task.train_size} train bytes, held-out every 20th file ({task.eval_size} bytes, "
            f"{task.eval_x.shape[0]} sequences); " + common)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 5 min on 2 cores); no claims")
    p.add_argument("--estimate", action="store_true", help="time a few steps of every run and print the ETA only")
    p.add_argument("--task", default="all", choices=TASKS + ("all",))
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the larger preset)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                   help="comma-separated subset (dense is always included as the reference)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--jobs", type=int, default=None,
                   help="tasks run in parallel processes of one thread each (default: 2 for the full CPU run, "
                        "else 1)")
    args = p.parse_args(argv)
    tasks = TASKS if args.task == "all" else (args.task,)
    jobs = args.jobs
    if jobs is None:
        full_cpu = args.task == "all" and not args.quick and not args.device.startswith("cuda")
        jobs = 2 if full_cpu and (os.cpu_count() or 1) >= 2 else 1
    if jobs > 1 and len(tasks) > 1:
        return _parallel(tasks, args, jobs)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    try:
        chosen = [variant(n) for n in dict.fromkeys(["dense"] + names)]
    except ValueError as exc:
        p.error(str(exc))
    mode = "quick" if args.quick else "default"
    t0 = time.perf_counter()
    for name in tasks:
        rec = run_task(name, mode, args.device, chosen, args.out, estimate=args.estimate)
        if rec and "verdicts" in rec:
            print(f"\n[{name}] verdicts ({'smoke run, no claims' if args.quick else 'measured'}):")
            for v in rec["verdicts"]:
                print(f"  - {v['claim']}: {v['outcome']}  [{v['evidence']}]")
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def _parallel(tasks, args, jobs: int) -> int:
    """Run each task in its own process (one torch thread each unless --threads), ``jobs`` at a time."""
    base = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--variants", args.variants,
            "--out", str(args.out), "--jobs", "1", "--threads", str(args.threads or 1)]
    base += ["--quick"] * args.quick + ["--estimate"] * args.estimate
    t0, pending, running, failed = time.perf_counter(), list(tasks), [], []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            print(f"[{name}] started in its own process", flush=True)
            running.append((name, subprocess.Popen(base + ["--task", name])))
        name, proc = running.pop(0)
        if proc.wait() != 0:
            failed.append(f"{name} (exit {proc.returncode})")
    print(f"all tasks done in {(time.perf_counter() - t0) / 60:.1f} min" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
