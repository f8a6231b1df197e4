"""Tests of bench/scaling.py and bench/scaling_lib: fits, FLOP accounting, verdicts, the --quick run."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import einfx  # noqa: E402
from einfx.moe import BTTMoELinear, MoEFeedForward  # noqa: E402
from einfx.structures.init import lr_multipliers  # noqa: E402
from scaling_lib.fit import common_loss, compute_multiplier, fit_power_law, frontier  # noqa: E402
from scaling_lib.models import GPT, MLP, VARIANTS, variant  # noqa: E402
from scaling_lib.plan import TaskScale  # noqa: E402
from scaling_lib.tasks import HELD_OUT_EVERY, RegressionTask, TextTask, stdlib_corpus  # noqa: E402
from scaling_lib.train import forward_flops, optimizer_groups, train_flops_per_step  # noqa: E402
from scaling_lib.verdict import summarize, verdicts  # noqa: E402


def _law(c, a, b, floor):
    return a * np.power(c, -b) + floor


# -- frontier and power law ---------------------------------------------------------------------------
def test_frontier_keeps_exactly_the_lower_envelope():
    rng = np.random.default_rng(0)
    c_opt = np.geomspace(1e9, 1e13, 12)
    l_opt = _law(c_opt, 40.0, 0.2, 0.5)
    # dominated points: more compute than some envelope point for a higher loss
    c_bad = c_opt * rng.uniform(1.0, 3.0, size=c_opt.size)
    l_bad = _law(c_bad, 40.0, 0.2, 0.5) * rng.uniform(1.05, 1.5, size=c_opt.size)
    l_bad = np.maximum(l_bad, l_opt * 1.01)
    c_all, l_all = np.concatenate([c_bad, c_opt]), np.concatenate([l_bad, l_opt])
    perm = rng.permutation(c_all.size)
    f = frontier(c_all[perm], l_all[perm])
    assert f.compute == tuple(c_opt)
    assert f.loss == tuple(l_opt)


def test_frontier_rejects_bad_input():
    with pytest.raises(ValueError, match="equal, non-zero length"):
        frontier([], [])
    with pytest.raises(ValueError, match="positive"):
        frontier([1.0, -2.0], [1.0, 0.5])


@pytest.mark.parametrize("a,b,floor", [(40.0, 0.2, 0.5), (3e3, 0.35, 1.7), (12.0, 0.1, 0.0)])
def test_power_law_fit_recovers_exact_parameters(a, b, floor):
    c = np.geomspace(1e9, 1e14, 15)
    fit = fit_power_law(c, _law(c, a, b, floor))
    assert fit.b == pytest.approx(b, rel=1e-3)
    assert fit.c == pytest.approx(floor, rel=1e-3, abs=1e-4)
    assert fit.a == pytest.approx(a, rel=1e-2)
    assert fit.rmse_log < 1e-4
    assert fit.compute_for(float(_law(1e12, a, b, floor))) == pytest.approx(1e12, rel=1e-2)


def test_power_law_fit_is_robust_to_noise():
    rng = np.random.default_rng(1)
    c = np.geomspace(1e9, 1e15, 25)
    loss = _law(c, 40.0, 0.2, 0.5) * np.exp(rng.normal(0, 0.005, c.size))
    fit = fit_power_law(c, loss)
    assert fit.b == pytest.approx(0.2, rel=0.1)
    assert fit.c == pytest.approx(0.5, rel=0.1)
    assert fit.rmse_log < 0.01


def test_power_law_fit_rejects_too_few_or_increasing_points():
    with pytest.raises(ValueError, match=">= 3 points"):
        fit_power_law([1e9, 1e10], [2.0, 1.0])
    with pytest.raises(ValueError, match="does not decrease"):
        fit_power_law([1e9, 1e10, 1e11], [1.0, 2.0, 3.0])


def test_compute_multiplier_of_a_shifted_curve():
    c = np.geomspace(1e9, 1e14, 60)
    ref = frontier(c, _law(c, 40.0, 0.2, 0.5))
    # the other curve reaches every loss with 3× less compute: L_other(C) = L_ref(3C)
    other = frontier(c, _law(3 * c, 40.0, 0.2, 0.5))
    m = compute_multiplier(ref, other)
    assert m.loss == pytest.approx(min(ref.loss))
    assert m.value == pytest.approx(3.0, rel=0.01)
    slower = compute_multiplier(ref, frontier(c * 2, _law(c, 40.0, 0.2, 0.5)))
    assert slower.value == pytest.approx(0.5, rel=0.01)


def test_compute_multiplier_is_none_without_a_common_loss():
    c = np.geomspace(1e9, 1e10, 5)
    high = frontier(c, [5.0, 4.5, 4.0, 3.8, 3.6])
    low = frontier(c, [3.0, 2.5, 2.0, 1.9, 1.8])
    assert common_loss(high, low) is None
    assert compute_multiplier(high, low) is None


# -- verdicts -----------------------------------------------------------------------------------------
def _points(shift):
    c = np.geomspace(1e9, 1e13, 20)
    return [(float(x), float(_law(x * shift, 40.0, 0.2, 0.5))) for x in c]


def test_verdicts_follow_the_measured_multipliers():
    shifts = {"dense": 1.0, "kronecker": 0.5, "tensor_train": 0.6, "low_rank": 0.7, "btt": 1.5, "monarch": 0.95,
              "btt_moe": 2.0, "moe": 3.0}
    s = summarize({v: _points(k) for v, k in shifts.items()})
    for v, k in shifts.items():
        if v != "dense":
            assert s[v].multiplier == pytest.approx(k, rel=0.02), v
            assert s[v].source == "frontier"
    outcome = {row.claim.split(" (")[0].split(" scales")[0]: row.outcome for row in verdicts(s)}
    # BTT-MoE beats dense (2×) but not the standard MoE (3×): half of a two-part claim
    assert list(outcome.values()) == ["holds", "holds", "holds", "partly"]
    evidence = verdicts(s)[3].evidence
    assert f"btt_moe: {s['btt_moe'].multiplier:.2f}×" in evidence and f"moe: {s['moe'].multiplier:.2f}×" in evidence
    shifts.update(kronecker=1.2, tensor_train=0.8, low_rank=1.3, btt=0.7, monarch=0.5, btt_moe=0.9)
    rows = verdicts(summarize({v: _points(k) for v, k in shifts.items()}))
    assert [r.outcome for r in rows] == ["partly", "does not hold", "does not hold", "does not hold"]


def test_verdicts_say_inconclusive_when_a_structure_is_missing():
    s = summarize({"dense": _points(1.0), "btt": _points(2.0)})
    rows = verdicts(s)
    assert rows[0].outcome == "inconclusive"
    assert rows[2].outcome.startswith("holds") is False and "some n/a" in rows[2].outcome


# -- FLOP accounting ----------------------------------------------------------------------------------
def _expected_layer_flops(m, tokens):
    if isinstance(m, BTTMoELinear):  # k active experts + the gate, from the sizes
        s = m.sizes
        return 2 * tokens * (s.macs_per_token("xab") // m.experts * m.k + m.in_features * m.experts)
    return m.cost(tokens).flops


def _run_flops(model, x) -> tuple[int, int]:
    """(FLOPs torch counts for a forward pass, Σ cost(tokens) of the layers + extra matmuls), BTT-MoE on
    its masked path (matmuls only; the sparse path reduces with mul + sum, which the counter skips)."""
    for m in model.modules():
        if isinstance(m, BTTMoELinear):
            m.set_path("masked")
    tokens = x.numel() if x.dtype == torch.long else x.shape[0]
    with FlopCounterMode(display=False) as counter:
        model(x)
    costs = sum(m.cost(tokens).flops for m in model.modules() if isinstance(m, (einfx.EinsumLinear, MoEFeedForward)))
    return counter.get_total_flops(), costs + model.extra_flops(tokens)


@pytest.mark.parametrize("name", [v.name for v in VARIANTS])
def test_mlp_step_flops_equal_three_times_the_layers_cost(name):
    torch.manual_seed(0)
    model = MLP(16, 8, 64, 2, variant(name))
    tokens = 32
    layers = [m for m in model.modules() if isinstance(m, (einfx.EinsumLinear, MoEFeedForward))]
    assert len(layers) == (4 if name == "moe" else 6)
    expected = sum(_expected_layer_flops(m, tokens) for m in layers)
    assert train_flops_per_step(model, tokens) == 3 * expected
    # independent check that cost() is what torch runs
    counted, costs = _run_flops(model, torch.randn(tokens, 16))
    assert counted == costs


@pytest.mark.parametrize("name", ["dense", "btt", "btt_moe", "moe"])
def test_gpt_flops_add_attention_matmuls(name):
    torch.manual_seed(0)
    width, layers, context, batch = 64, 2, 16, 3
    model = GPT(width, layers, context, variant(name))
    tokens = batch * context
    linear = sum(_expected_layer_flops(m, tokens) for m in model.modules()
                 if isinstance(m, (einfx.EinsumLinear, MoEFeedForward)))
    attention = layers * 2 * (2 * batch * context * context * width)  # QKᵀ and AV
    assert forward_flops(model, tokens) == linear + attention
    assert train_flops_per_step(model, tokens) == 3 * (linear + attention)
    counted, costs = _run_flops(model, torch.randint(0, 256, (batch, context)))
    assert counted == costs


def test_optimizer_groups_apply_mup_width_scaling_and_core_multipliers():
    model = MLP(16, 8, 128, 1, variant("btt"))
    lr, base = 1e-2, 32
    groups = optimizer_groups(model, lr, width=128, base_width=base)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert sorted(lr_of) == sorted(n for n, _ in model.named_parameters())
    hidden = lr * base / 128
    up = model.ffns[0][0]
    mults = lr_multipliers(up.sizes)
    assert lr_of["ffns.0.0.A"] == pytest.approx(hidden * mults["A"])
    assert lr_of["ffns.0.0.B"] == pytest.approx(hidden * mults["B"])
    assert lr_of["out.weight"] == pytest.approx(hidden)
    for n in ("inp.weight", "inp.bias", "ffns.0.0.bias", "norms.0.weight"):
        assert lr_of[n] == pytest.approx(lr), n


# -- tasks and run planning --------------------------------------------------------------------------
def test_text_task_holds_out_whole_files():
    task = TextTask(context=16, train_bytes=64 << 10, eval_bytes=16 << 10, eval_sequences=8)
    files = stdlib_corpus()
    held = b"".join(f.read_bytes() + b"\n" for i, f in enumerate(files[:40 * HELD_OUT_EVERY])
                    if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
    train = b"".join(f.read_bytes() + b"\n" for i, f in enumerate(files[:40 * HELD_OUT_EVERY])
                     if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
    for x, y in zip(task.eval_x, task.eval_y):
        assert bytes(x.tolist()) in held
        assert torch.equal(x[1:], y[:-1])
    x, y = task.batch(step=3, batch=4, device="cpu")
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert all(bytes(row.tolist()) in train for row in x)
    assert torch.equal(task.batch(3, 4, "cpu")[0], x)  # batches are a function of the step


def test_planned_runs_widen_only_cheaper_structures_within_the_dense_flop_range():
    import scaling

    task = RegressionTask(teacher_width=8, train_samples=16, eval_samples=8)
    scale = TaskScale(widths=(32, 64), extra_widths=(128, 1024), depth=1, batch=4, checkpoints=(1,), lr=1e-3,
                      warmup=1, no_extra=("btt_moe",))
    runs = scaling.planned_runs(task, "regression", scale, VARIANTS)
    widths = {v.name: [w for u, w in runs if u.name == v.name] for v in VARIANTS}
    assert widths["dense"] == widths["moe"] == widths["btt_moe"] == [32, 64]
    cap = forward_flops(MLP(16, 8, 64, 1, variant("dense")), 1)
    for name in ("kronecker", "monarch", "btt", "low_rank", "tensor_train"):
        assert widths[name][:2] == [32, 64]
        for w in widths[name][2:]:
            assert forward_flops(MLP(16, 8, w, 1, variant(name)), 1) <= cap
    assert 128 in widths["kronecker"] and 1024 not in widths["btt"]
    assert 128 not in widths["low_rank"]  # rank d/4 at d = 128 costs more than dense at 64


# -- the --quick run ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_run_writes_all_outputs(tmp_path, capsys):
    import scaling

    torch.set_num_threads(1)
    assert scaling.main(["--quick", "--out", str(tmp_path)]) == 0
    for task in ("regression", "text"):
        record = json.loads((tmp_path / f"scaling_{task}_quick.json").read_text())
        assert record["mode"] == "quick"
        assert {row["variant"] for row in record["structures"]} == {v.name for v in VARIANTS}
        assert len(record["verdicts"]) == 4
        for run in record["runs"]:
            assert [p["flops"] for p in run["points"]] == [p["step"] * run["flops_per_step"] for p in run["points"]]
            assert all(math.isfinite(p["loss"]) for p in run["points"])
        md = (tmp_path / f"scaling_{task}_quick.md").read_text()
        assert "Smoke run" in md and "## Verdicts (measured here)" in md and "BTT-MoE beats dense" in md
        assert (tmp_path / f"scaling_{task}_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    assert "verdicts (smoke run, no claims)" in capsys.readouterr().out
