"""einfx.distill: lowers the error against the teacher, resumes exactly after a kill, stops where told, refuses
students that cannot match, trains under DistributedDataParallel."""

import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import einfx
from einfx import Policy, Structure
from einfx.rewriter.distill import DistillError

from _dist import free_port
from _models import bert, ids

distill_module = importlib.import_module("einfx.rewriter.distill")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()


def _data(batches: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 32, generator=g),) for _ in range(batches)]


def _student(teacher):
    return einfx.optimize(teacher, Policy(default=Structure.btt(rank=1)), example_inputs=_data(1)[0])


def test_distill_lowers_the_error_within_a_few_steps():
    teacher = _mlp()
    student = _student(teacher)
    report = einfx.distill(student, teacher, _data(), steps=40, lr=3e-3, progress=False, eval_every=20)
    assert isinstance(report, einfx.DistillReport) and report.steps == 40 and report.stopped == "steps"
    assert report.after.rel_error < 0.9 * report.before.rel_error
    assert report.after.cosine > report.before.cosine
    assert [c.step for c in report.history] == [20, 40]
    assert report.train_batches == 11 and report.held_out_batches == 1  # the last tenth is held out
    assert report.layers == ("0", "2")
    assert "distilled 40 steps" in str(report) and report.to_dict()["stopped"] == "steps"
    # the teacher is untouched and the student really is the trained one
    assert einfx.fidelity(teacher, student, _data()[-1:]).rel_error == pytest.approx(report.after.rel_error)
    assert all(p.requires_grad for p in teacher.parameters())  # as it was before


def test_distill_a_transformer_with_dict_batches_and_padding():
    teacher = bert().eval()
    batches = []
    for i in range(6):
        x = ids(batch=2, length=10, seed=i)
        mask = torch.ones_like(x)
        mask[1, 7:] = 0
        batches.append({"input_ids": x, "attention_mask": mask})
    student = einfx.optimize(teacher, Policy(default=Structure.low_rank(rank_frac=0.25)), example_kwargs=batches[0])
    # random token ids carry nothing to generalize from: the held-out batches are training batches here
    report = einfx.distill(student, teacher, batches, held_out=batches[4:], steps=20, lr=3e-4, progress=False,
                           layer_weight=0.0)  # the model's output alone
    assert report.after.rel_error < report.before.rel_error and report.held_out_batches == 2
    assert report.layers == ()
    # by default only what the conversion changed is trained; the rest is the teacher's, gradients back on
    emb = student.embeddings.word_embeddings.weight
    assert torch.equal(emb, teacher.embeddings.word_embeddings.weight) and emb.requires_grad
    everything = einfx.optimize(teacher, Policy(default=Structure.low_rank(rank_frac=0.25)), example_kwargs=batches[0])
    einfx.distill(everything, teacher, batches, held_out=batches[4:], steps=3, lr=3e-4, progress=False,
                  trainable="all")
    assert not torch.equal(everything.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    with pytest.raises(DistillError, match="trainable 'some' is unknown; valid: structured, all"):
        einfx.distill(everything, teacher, batches, steps=1, progress=False, trainable="some")


def test_resume_after_a_kill_gives_the_same_state(tmp_path, monkeypatch):
    teacher = _mlp()
    data = _data()
    uninterrupted = _student(teacher)
    einfx.distill(uninterrupted, teacher, data, steps=9, lr=3e-3, progress=False, checkpoint=tmp_path / "a.pt",
                  checkpoint_every=2, seed=3)

    killed = _student(teacher)
    schedule = distill_module._schedule

    def dies_at_step_five(step, *args):
        if step == 5:
            raise KeyboardInterrupt  # the process is killed before step 5 is taken
        return schedule(step, *args)

    monkeypatch.setattr(distill_module, "_schedule", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        einfx.distill(killed, teacher, data, steps=9, lr=3e-3, progress=False, checkpoint=tmp_path / "b.pt",
                      checkpoint_every=2, seed=3)
    monkeypatch.setattr(distill_module, "_schedule", schedule)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # only whole checkpoints are left
    resumed = _student(teacher)  # a fresh process: the same conversion, then the checkpoint
    report = einfx.distill(resumed, teacher, data, steps=9, lr=3e-3, progress=False, checkpoint=tmp_path / "b.pt",
                           checkpoint_every=2, seed=3, resume=True)
    assert report.resumed_from == 4 and report.steps == 9
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_stops_at_target_and_at_time_budget():
    teacher = _mlp()
    report = einfx.distill(_student(teacher), teacher, _data(), steps=500, lr=3e-3, target_cosine=0.0,
                           eval_every=5, progress=False)
    assert report.stopped == "target reached" and report.steps == 5
    report = einfx.distill(_student(teacher), teacher, _data(), time_budget_s=0.3, lr=3e-3, progress=False)
    assert report.stopped == "time budget" and report.seconds < 10
    report = einfx.distill(_student(teacher), teacher, _data(), epochs=2, lr=3e-3, progress=False)
    assert report.stopped == "epochs" and report.steps == 22


@pytest.mark.parametrize("precision, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_mixed_precision_runs_the_forward_passes_at_that_dtype_and_still_learns(tmp_path, precision, dtype):
    teacher = _mlp()
    student = _student(teacher)
    seen = []
    hook = teacher[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    report = einfx.distill(student, teacher, _data(), steps=40, lr=3e-3, progress=False, eval_every=20,
                           precision=precision, checkpoint=tmp_path / "c.pt")
    hook.remove()
    assert dtype in seen and torch.float32 in seen  # training steps at the dtype, held-out fidelity in float32
    assert report.precision == precision and report.to_dict()["precision"] == precision
    assert report.after.rel_error < 0.9 * report.before.rel_error
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the weights stay float32
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ("scaler" in state) == (precision == "float16")
    with pytest.raises(DistillError, match="precision 'int8' is unknown; valid: float32, bfloat16, float16"):
        einfx.distill(student, teacher, _data(), steps=1, progress=False, precision="int8")


def test_refuses_students_that_cannot_match():
    teacher = _mlp()
    other = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    with pytest.raises(DistillError, match=r"student's main output 'output' has shape \(16, 16\) but the "
                                           r"teacher's 'output' has \(16, 32\)"):
        einfx.distill(other, teacher, _data(), steps=1, progress=False)
    with pytest.raises(DistillError, match="at least two batches when held_out is not given"):
        einfx.distill(_student(teacher), teacher, _data(1), steps=1, progress=False)
    with pytest.raises(DistillError, match="steps must be a non-negative integer"):
        einfx.distill(_student(teacher), teacher, _data(), steps=-1, progress=False)


def test_learning_rate_schedule():
    schedule = distill_module._schedule
    assert [schedule(s, None, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]  # warm-up, then constant
    assert schedule(4, 14, 4) == pytest.approx(1.0) and schedule(14, 14, 4) == pytest.approx(0.1)
    assert schedule(9, 14, 4) == pytest.approx(0.55)                                 # cosine over the steps
    assert schedule(9, None, 4, 0.5) == pytest.approx(0.55)                          # or over the time budget
    assert schedule(9, None, 4, 1.3) == pytest.approx(0.1)


def test_unreadable_checkpoint_is_an_error(tmp_path):
    teacher = _mlp()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DistillError, match="bad.pt' cannot be read"):
        einfx.distill(_student(teacher), teacher, _data(), steps=1, checkpoint=bad, resume=True, progress=False)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        teacher = _mlp()
        student = _student(teacher)
        report = einfx.distill(student, teacher, _data(), steps=6, lr=3e-3, progress=False)
        flat = torch.cat([p.detach().flatten() for p in student.parameters()])
        torch.save({"flat": flat, "world": report.world_size}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_keeps_the_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert a["world"] == b["world"] == 2
    assert torch.equal(a["flat"], b["flat"])  # gradients were averaged: each rank saw other batches
    teacher = _mlp()
    alone = _student(teacher)
    einfx.distill(alone, teacher, _data(), steps=6, lr=3e-3, progress=False)
    assert not torch.equal(torch.cat([p.detach().flatten() for p in alone.parameters()]), a["flat"])
