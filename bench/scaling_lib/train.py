"""One training run of the scaling study, and its FLOP accounting.

A run trains one (task, variant, width) with Adam at a constant learning rate after a linear warmup and
evaluates the held-out loss at several step counts (checkpoints): each checkpoint is a model trained for
that many steps under a constant-rate schedule, so one run gives one (C, L) point per step count.

Learning rates follow μP for Adam: hidden matrices get ``lr · base_width / width``, and `einfx.param_groups`
then scales each structured core by its structure-aware multiplier (SPEC §2); vector-like parameters
(biases, norms), the input layer and the embeddings keep ``lr``. Training FLOPs per step are
3 × `forward_flops` (forward, and a backward pass of twice the forward's matmuls).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

import einfx
from einfx.moe import BTTMoELinear, MoEFeedForward

__all__ = ["RunConfig", "RunResult", "optimizer_groups", "train_flops_per_step", "train_run", "AUX_WEIGHT",
           "INPUT_PREFIXES", "step_seconds"]

# SPEC §5: the training loss adds 0.01 × the mean load-balancing loss of the MoE layers.
AUX_WEIGHT = 0.01
# Parameters whose μP learning rate does not shrink with width (input-side maps of fixed fan-in).
INPUT_PREFIXES = ("inp.", "tok.", "pos.")


@dataclass(frozen=True)
class RunConfig:
    """Hyperparameters of one run.

    Attributes:
        width: model width d.
        checkpoints: step counts at which the held-out loss is measured (the last is the run's length).
        batch: sequences (text) or samples (regression) per step.
        lr: base learning rate (at ``base_width``).
        base_width: width at which hidden matrices use ``lr`` itself.
        warmup: linear warmup steps.
        clip: gradient-norm clip.
        seed: model initialization seed.
    """

    width: int
    checkpoints: tuple[int, ...]
    batch: int
    lr: float
    base_width: int
    warmup: int = 20
    clip: float = 1.0
    seed: int = 0

    @property
    def steps(self) -> int:
        return max(self.checkpoints)


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run: a (step, training FLOPs, held-out loss) point per checkpoint."""

    variant: str
    width: int
    params: int
    flops_per_step: int
    points: tuple[tuple[int, int, float], ...]
    seconds: float
    diverged: bool = False

    def to_dict(self) -> dict:
        return {"variant": self.variant, "width": self.width, "params": self.params,
                "flops_per_step": self.flops_per_step, "seconds": round(self.seconds, 3), "diverged": self.diverged,
                "points": [{"step": s, "flops": c, "loss": l} for s, c, l in self.points]}


def _counted_flops(module: nn.Module, tokens: int) -> int:
    if isinstance(module, BTTMoELinear):
        # Count the active experts (the sparse path's FLOPs, which grow with k); the run may execute the
        # masked path, which gives the same outputs and is faster on CPU.
        saved = module.path
        module.set_path("sparse")
        try:
            return module.cost(tokens).flops
        finally:
            module.set_path(saved)
    return module.cost(tokens).flops


def forward_flops(model: nn.Module, tokens: int) -> int:
    """Forward FLOPs over ``tokens`` tokens: Σ cost(tokens) of the linear and MoE layers + the model's
    extra matmuls (attention), BTT-MoE counted with its k active experts."""
    total = sum(_counted_flops(m, tokens) for m in model.modules()
                if isinstance(m, (einfx.EinsumLinear, MoEFeedForward)))
    return total + model.extra_flops(tokens)


def train_flops_per_step(model: nn.Module, tokens: int) -> int:
    """3 × forward FLOPs: the backward pass costs two forward passes (input and weight gradients)."""
    return 3 * forward_flops(model, tokens)


def optimizer_groups(model: nn.Module, lr: float, width: int, base_width: int) -> list[dict]:
    """Adam parameter groups with μP width scaling on top of `einfx.param_groups` (module docstring)."""
    hidden_lr = lr * base_width / width
    groups = []
    fixed = {"params": [], "param_names": [], "lr": lr, "name": "width-independent"}
    for g in einfx.param_groups(model, lr=hidden_lr):
        keep = [(n, p) for n, p in zip(g["param_names"], g["params"])
                if p.ndim >= 2 and not n.startswith(INPUT_PREFIXES)]
        moved = [(n, p) for n, p in zip(g["param_names"], g["params"])
                 if not (p.ndim >= 2 and not n.startswith(INPUT_PREFIXES))]
        fixed["params"] += [p for _, p in moved]
        fixed["param_names"] += [n for n, _ in moved]
        if keep:
            groups.append({**g, "params": [p for _, p in keep], "param_names": [n for n, _ in keep]})
    return groups + ([fixed] if fixed["params"] else [])


def _has_moe(model: nn.Module) -> bool:
    return any(isinstance(m, (BTTMoELinear, MoEFeedForward)) for m in model.modules())


def _step(model, opt, task, cfg: RunConfig, step: int, device, aux: bool) -> float:
    x, y = task.batch(step, cfg.batch, device)
    loss = task.loss(model(x), y)
    total = loss + AUX_WEIGHT * einfx.aux_loss(model, reduction="mean").to(loss.device) if aux else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    return float(loss.detach())


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(optimizer_groups(model, cfg.lr, cfg.width, cfg.base_width), betas=(0.9, 0.98))
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def train_run(task, build, variant: str, cfg: RunConfig, device="cpu") -> RunResult:
    """Train ``build()`` (a model factory, called under ``cfg.seed``) on ``task``; evaluate at each checkpoint.

    A run whose training loss becomes non-finite stops and is marked ``diverged`` (its later checkpoints
    are missing, not filled in).
    """
    torch.manual_seed(cfg.seed)
    model = build().to(device)
    tokens = task.tokens_per_batch(cfg.batch)
    per_step = train_flops_per_step(model, tokens)
    params = sum(p.numel() for p in model.parameters())
    opt = _optimizer(model, cfg)
    aux = _has_moe(model)
    points, diverged = [], False
    start = time.perf_counter()
    checkpoints = sorted(set(cfg.checkpoints))
    for step in range(1, cfg.steps + 1):
        scale = min(1.0, step / max(1, cfg.warmup))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        model.train()
        if not math.isfinite(_step(model, opt, task, cfg, step - 1, device, aux)):
            diverged = True
            break
        if step in checkpoints:
            model.eval()
            points.append((step, step * per_step, task.evaluate(model, device)))
    return RunResult(variant, cfg.width, params, per_step, tuple(points), time.perf_counter() - start, diverged)


def step_seconds(task, build, cfg: RunConfig, device="cpu", steps: int = 4) -> float:
    """Median time of a training step (after one untimed step), for the run-time estimate.

    On CPU this is the process's CPU time, not wall time, so that an estimate made on a busy machine
    still tells the run time on free cores (with one thread per process, CPU time ≈ wall time).
    """
    torch.manual_seed(cfg.seed)
    model = build().to(device)
    opt = _optimizer(model, cfg)
    aux = _has_moe(model)
    cuda = str(device).startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    times = []
    for step in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t = clock()
        _step(model, opt, task, cfg, step, device, aux)
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t)
    return sorted(times[1:])[len(times[1:]) // 2]
