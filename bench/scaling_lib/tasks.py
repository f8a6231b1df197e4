"""The two tasks of the scaling study, with their data and held-out evaluation.

    regression: x ~ N(0, I_dx) -> y = teacher(x), a fixed random MLP wider than every student, outputs
                standardized (so predicting the mean scores 1.0); loss = MSE on a fixed held-out set;
                training draws fresh samples from a pregenerated pool (one pass in the longest run).
    text:       bytes of the Python standard library's own .py sources (read from disk, no download);
                every 20th file (sorted by path) is held out; loss = cross-entropy in nats per byte.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegressionTask", "TextTask", "stdlib_corpus", "HELD_OUT_EVERY"]

HELD_OUT_EVERY = 20


class _Teacher(nn.Module):
    def __init__(self, d_x: int, d_y: int, width: int, depth: int, gen: torch.Generator):
        super().__init__()
        dims = [d_x] + [width] * depth + [d_y]
        self.weights = [torch.randn(o, i, generator=gen) * (2.0 / i) ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
        self.biases = [torch.randn(o, generator=gen) * 0.1 for o in dims[1:]]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w.t() + b
            if i < len(self.weights) - 1:
                x = F.gelu(x)
        return x


@dataclass
class RegressionTask:
    """Regression on the outputs of a random teacher MLP (the paper's MLP experiment, small).

    Args:
        d_x, d_y: input and output dimensions.
        teacher_width, teacher_depth: size of the teacher (hidden layers of ``teacher_width``).
        train_samples: size of the training pool; eval_samples: size of the held-out set.
        seed: seeds the teacher and both sets.
    """

    d_x: int = 16
    d_y: int = 8
    teacher_width: int = 512
    teacher_depth: int = 3
    train_samples: int = 1 << 16
    eval_samples: int = 4096
    seed: int = 0
    name: str = "regression"
    loss_name: str = "held-out MSE (1.0 = predicting the mean)"

    def __post_init__(self):
        gen = torch.Generator().manual_seed(self.seed)
        teacher = _Teacher(self.d_x, self.d_y, self.teacher_width, self.teacher_depth, gen)
        x = torch.randn(self.train_samples + self.eval_samples, self.d_x, generator=gen)
        y = torch.cat([teacher(chunk) for chunk in x.split(8192)])
        y = (y - y.mean(0)) / y.std(0)
        self._x, self._y = x[: self.train_samples], y[: self.train_samples]
        self.eval_x, self.eval_y = x[self.train_samples:], y[self.train_samples:]

    def tokens_per_batch(self, batch: int) -> int:
        return batch

    def batch(self, step: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number ``step`` (the pool is walked in order and wraps around)."""
        n = self._x.shape[0]
        idx = (torch.arange(batch) + step * batch) % n
        return self._x[idx].to(device), self._y[idx].to(device)

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device) -> float:
        out = torch.cat([model(x.to(device)).float().cpu() for x in self.eval_x.split(1024)])
        return float(F.mse_loss(out, self.eval_y))


def stdlib_corpus() -> list[Path]:
    """The standard library's .py files (site-packages excluded), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


@dataclass
class TextTask:
    """Byte-level language modelling on the standard library's sources, with a held-out split by file.

    Args:
        context: sequence length T.
        train_bytes, eval_bytes: caps on each split (the first files, in sorted order, fill them).
        eval_sequences: number of held-out sequences (evenly spaced over the held-out bytes).
        seed: seeds the training batch offsets.
    """

    context: int = 64
    train_bytes: int = 8 << 20
    eval_bytes: int = 1 << 20
    eval_sequences: int = 128
    seed: int = 0
    name: str = "text"
    loss_name: str = "held-out cross-entropy (nats/byte)"

    def __post_init__(self):
        train, held = bytearray(), bytearray()
        for i, path in enumerate(stdlib_corpus()):
            target, cap = (held, self.eval_bytes) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else (train, self.train_bytes)
            if len(target) < cap:
                try:
                    target += path.read_bytes() + b"\n"
                except OSError:
                    continue  # unreadable file: skip, the corpus is large
            if len(train) >= self.train_bytes and len(held) >= self.eval_bytes:
                break
        if len(train) < 16 * (self.context + 1) or len(held) < 2 * (self.context + 1):
            raise RuntimeError(f"text task: the standard library at {sysconfig.get_paths()['stdlib']} has too "
                               f"few bytes ({len(train)} train, {len(held)} held out)")
        self._train = torch.frombuffer(train[: self.train_bytes], dtype=torch.uint8).long()
        held_t = torch.frombuffer(held[: self.eval_bytes], dtype=torch.uint8).long()
        span = self.context + 1
        starts = torch.linspace(0, len(held_t) - span, self.eval_sequences).long()
        seqs = torch.stack([held_t[s: s + span] for s in starts.tolist()])
        self.eval_x, self.eval_y = seqs[:, :-1], seqs[:, 1:]
        self.train_size, self.eval_size = len(self._train), len(held_t)

    def tokens_per_batch(self, batch: int) -> int:
        return batch * self.context

    def batch(self, step: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number ``step``: ``batch`` sequences at offsets drawn from a (seed, step) generator."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self._train) - self.context - 1, (batch,), generator=gen)
        seqs = torch.stack([self._train[s: s + self.context + 1] for s in starts.tolist()])
        return seqs[:, :-1].to(device), seqs[:, 1:].to(device)

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device) -> float:
        total = 0.0
        for x, y in zip(self.eval_x.split(32), self.eval_y.split(32)):
            total += float(self.loss(model(x.to(device)), y.to(device))) * x.shape[0]
        return total / self.eval_x.shape[0]
