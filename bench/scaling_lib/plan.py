"""Scale presets of the study (quick smoke run, default 2-core CPU run, larger CUDA run) and the choice of
widths per structure.

Structures that cost fewer FLOPs per token than dense also train at wider widths (``extra_widths``), as
in the paper, so that their frontiers reach the losses dense reaches; a width is used only while the
model's forward FLOPs per token stay within those of the widest dense model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TaskScale", "PRESETS", "preset"]


@dataclass(frozen=True)
class TaskScale:
    """Everything that sets the size (and so the run time) of one task.

    Attributes:
        widths: widths of every structure (dense and standard MoE use only these).
        extra_widths: further widths for structures cheaper than dense (see the module docstring).
        depth: FFN blocks (regression MLP) or transformer layers (text GPT).
        batch: samples (regression) or sequences (text) per step.
        checkpoints: step counts evaluated in every run (the largest is the run length).
        lr: Adam learning rate at ``widths[0]`` (μP-scaled beyond, see scaling_lib.train).
        warmup: linear warmup steps.
        task_args: keyword arguments of the task (data sizes, teacher size, context length).
        no_extra: structures kept to ``widths`` for the time budget (their wall time per FLOP is high on CPU).
    """

    widths: tuple[int, ...]
    extra_widths: tuple[int, ...]
    depth: int
    batch: int
    checkpoints: tuple[int, ...]
    lr: float
    warmup: int
    task_args: dict = field(default_factory=dict)
    no_extra: tuple[str, ...] = ()


PRESETS: dict[str, dict[str, TaskScale]] = {
    "quick": {
        "regression": TaskScale(widths=(32, 64), extra_widths=(128,), depth=1, batch=64, checkpoints=(10, 20, 40),
                                lr=3e-3, warmup=5, task_args={"teacher_width": 128, "train_samples": 64 * 40,
                                                              "eval_samples": 512}),
        "text": TaskScale(widths=(32, 64), extra_widths=(128,), depth=1, batch=8, checkpoints=(10, 20, 40),
                          lr=3e-3, warmup=5, task_args={"context": 32, "train_bytes": 256 << 10,
                                                        "eval_bytes": 64 << 10, "eval_sequences": 32}),
    },
    "default": {
        "regression": TaskScale(widths=(64, 128, 256, 512), extra_widths=(1024, 2048), depth=2, batch=128,
                                checkpoints=(125, 250, 500, 1000, 2000), lr=3e-3, warmup=50,
                                task_args={"teacher_width": 1024, "train_samples": 128 * 2000}),
        # BTT-MoE's masked path runs ~4× slower per step than BTT on one core: kept to the dense widths
        "text": TaskScale(widths=(64, 128, 256), extra_widths=(512,), depth=2, batch=16,
                          checkpoints=(75, 150, 300, 600), lr=3e-3, warmup=40,
                          task_args={"context": 64, "train_bytes": 8 << 20}, no_extra=("btt_moe",)),
    },
    "cuda": {
        "regression": TaskScale(widths=(128, 256, 512, 1024), extra_widths=(2048, 4096), depth=3, batch=1024,
                                checkpoints=(500, 1000, 2000, 4000), lr=3e-3, warmup=200,
                                task_args={"teacher_width": 2048, "train_samples": 1024 * 4000}),
        "text": TaskScale(widths=(128, 256, 512), extra_widths=(1024,), depth=4, batch=64,
                          checkpoints=(500, 1000, 2000, 4000), lr=3e-3, warmup=200,
                          task_args={"context": 256, "train_bytes": 32 << 20}),
    },
}


def preset(mode: str, task: str) -> TaskScale:
    """The scale of ``task`` in ``mode``; ValueError naming the valid options otherwise."""
    if mode not in PRESETS:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(PRESETS)}")
    if task not in PRESETS[mode]:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(PRESETS[mode])}")
    return PRESETS[mode][task]
