"""Measured planning: the winner per signature, dense when dense is faster, the cache and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import einfx
from einfx import EinsumLinear, Structure
from einfx.export.runtimes import RUNTIMES, available
from einfx.export.tune import TuningCache, TuningCacheError, signature, tune_layer, tune_model

INSTALLED = [r for r in RUNTIMES if available(r)]


class FakeClock:
    """A timer that says dense takes ``dense`` seconds and every plan ``plan`` seconds; counts its calls."""

    def __init__(self, dense: float, plan: float):
        self.dense, self.plan, self.calls = dense, plan, 0

    def __call__(self, fns):
        self.calls += 1
        for fn in fns.values():
            fn()  # the graphs really run: a broken candidate fails here
        plans = [k for k in fns if k != "dense"]
        return {"dense": self.dense} | {k: self.plan * (1 + 0.01 * i) for i, k in enumerate(plans)}


def _layer(d=64, structure=None, seed=0):
    torch.manual_seed(seed)
    return EinsumLinear(d, d, structure or Structure.btt(rank=1)).eval()


@pytest.fixture
def cache_path(tmp_path):
    return tmp_path / "tuning.json"


def test_dense_wins_when_dense_is_measured_faster(cache_path):
    clock = FakeClock(dense=1e-4, plan=2e-4)
    tuned = tune_layer(_layer(), "onnxruntime", 32, timer=clock, cache=TuningCache("onnxruntime", 1, path=cache_path))
    assert tuned.winner == "dense" and tuned.dense and tuned.speedup == 1.0
    assert tuned.plan is not None  # the best structured plan is still known (for layers that may not fold)


def test_a_plan_wins_only_past_the_margin():
    layer = _layer()
    assert tune_layer(layer, "onnxruntime", 32, timer=FakeClock(dense=1.0, plan=0.99)).dense  # 1% is noise
    tuned = tune_layer(layer, "onnxruntime", 32, timer=FakeClock(dense=1.0, plan=0.5))
    assert not tuned.dense and tuned.winner == tuned.best_structured and tuned.speedup == pytest.approx(2.0)


@pytest.mark.parametrize("runtime", INSTALLED)
def test_really_measured_dense_beats_a_structure_that_costs_more(runtime):
    """A constructed case: a full-rank low-rank layer does 2x dense's FLOPs in two GEMMs; dense must win."""
    layer = _layer(256, Structure.low_rank(rank=256))
    assert tune_layer(layer, runtime, 256, threads=1).dense


def test_cached_per_signature_and_tuned_once_per_signature(cache_path):
    model = nn.Sequential(_layer(seed=1), nn.GELU(), _layer(seed=2), nn.GELU(), EinsumLinear(64, 32, Structure.btt(rank=1)))
    clock = FakeClock(dense=2.0, plan=1.0)
    cache = TuningCache("onnxruntime", 1, path=cache_path)
    results = {}
    for name, layer in model.named_children():
        if isinstance(layer, EinsumLinear):
            results[name] = tune_layer(layer, "onnxruntime", 16, cache=cache, timer=clock)
    assert clock.calls == 2  # two signatures: 64x64 (twice) and 64x32
    assert results["2"].cached and not results["0"].cached
    cache.save()
    again = TuningCache("onnxruntime", 1, path=cache_path)
    hit = tune_layer(model[0], "onnxruntime", 16, cache=again, timer=clock)
    assert clock.calls == 2 and hit.cached and hit.plan.steps == results["0"].plan.steps
    assert set(json.loads(cache_path.read_text())["entries"]) == {signature(model[0], 16), signature(model[4], 16)}


def test_tune_model_folds_the_dense_winners_exactly(cache_path):
    torch.manual_seed(0)
    model = nn.Sequential(_layer(seed=1), nn.GELU(), _layer(seed=2))
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = model(x)
    clock = FakeClock(dense=1e-4, plan=1.0)
    cache = TuningCache("onnxruntime", 1, path=cache_path)
    for layer in (model[0], model[2]):
        tune_layer(layer, "onnxruntime", 16, cache=cache, timer=clock)
    tuned = tune_model(model, "onnxruntime", 16, cache=cache, keep=("2",))
    assert type(model[0]) is nn.Linear  # dense won: folded
    assert isinstance(model[2], EinsumLinear) and model[2].export_plan == tuned["2"].plan  # kept by policy
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_foreign_cache_is_refused_or_ignored_when_asked(cache_path):
    cache = TuningCache("onnxruntime", 1, path=cache_path)
    tune_layer(_layer(), "onnxruntime", 16, cache=cache, timer=FakeClock(2.0, 1.0))
    cache.save()
    data = json.loads(cache_path.read_text())
    data["id"]["version"] = "0.0.1"
    cache_path.write_text(json.dumps(data))
    with pytest.raises(TuningCacheError, match=r"measured elsewhere \(version: '0.0.1' here '[0-9.]+'\)"):
        TuningCache("onnxruntime", 1, path=cache_path)
    with pytest.raises(TuningCacheError, match="threads: 1 here 2"):
        TuningCache("onnxruntime", 2, path=cache_path)
    ignored = TuningCache("onnxruntime", 1, path=cache_path, stale="ignore")
    assert ignored.entries == {}
    ignored.save()  # re-tuned here: the file is replaced by one measured on this host
    assert TuningCache("onnxruntime", 1, path=cache_path).entries == {}


def test_an_unreadable_cache_is_refused_with_its_path(cache_path):
    cache_path.write_text("{not json")
    with pytest.raises(TuningCacheError, match=f"tuning cache {cache_path} is unreadable"):
        TuningCache("onnxruntime", 1, path=cache_path)
    assert TuningCache("onnxruntime", 1, path=cache_path, stale="ignore").entries == {}


@pytest.mark.slow
@pytest.mark.parametrize("runtime", INSTALLED)
def test_to_onnx_for_a_runtime_tunes_folds_and_verifies_there(runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    policy = einfx.Policy(rules=[{"pattern": "0", "structure": Structure.btt(rank=1)},
                                 {"pattern": "2", "structure": Structure.low_rank(rank=256)},
                                 {"pattern": "4", "structure": Structure.low_rank(rank=8)}])
    opt = einfx.optimize(model, policy, example_inputs=(torch.randn(4, 256),))
    report = einfx.export.to_onnx(opt, torch.randn(4, 256), tmp_path / "m.onnx", runtime=runtime, tokens=256,
                                  threads=1, latency_repeats=0)
    assert report.verified and report.runtime == runtime
    assert report.tuned["2"].dense  # twice dense's FLOPs: folded where it is deployed
    assert (tmp_path / "cache" / f"tuning-{runtime}-cpu-v1.json").exists()
    if runtime == "openvino":
        assert any(c.where == "openvino" for c in report.checks)
    assert f"tuned for {runtime}" in str(report)


class _Functional(nn.Module):
    """Linear computations that read raw parameters (F.linear, x @ W.T): optimize returns a GraphModule."""

    def __init__(self, d=128):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2 * d, d) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(d, 2 * d) / d ** 0.5)

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, self.w1)), self.w2)


@pytest.mark.slow
def test_to_onnx_for_a_runtime_lowers_a_graph_module_with_the_measured_plans(tmp_path, monkeypatch):
    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    opt = einfx.optimize(_Functional(), einfx.Policy(default=Structure.btt(rank=1)), example_inputs=(x,))
    assert isinstance(opt, torch.fx.GraphModule)
    report = einfx.export.to_onnx(opt, x, tmp_path / "g.onnx", runtime="onnxruntime", tokens=128, threads=1,
                                  latency_repeats=0)
    assert report.verified and len(report.tuned) == 2
    assert report.passes[0] == "tune[onnxruntime, 128 tokens]"
    cache = TuningCache("onnxruntime", 1)
    assert {t.signature for t in report.tuned.values()} <= set(cache.entries)


def test_calibrate_with_a_runtime_tunes_the_model_ahead_of_time(tmp_path, monkeypatch):
    import einfx.export.calibrate as cal
    from einfx.errors import ExportError
    from einfx.planning.profile import default_profile

    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cal, "calibrate_profile", lambda device, save, path: default_profile("cpu"))
    model = nn.Sequential(_layer(seed=1), nn.GELU(), _layer(seed=2))
    before = [type(m) for m in model]
    profile = einfx.calibrate(runtime="onnxruntime", model=model, tokens=16, threads=1)
    assert profile.device == "cpu" and [type(m) for m in model] == before  # the model is not modified
    entries = TuningCache("onnxruntime", 1).entries
    assert list(entries) == [signature(model[0], 16)]
    with pytest.raises(ExportError, match="pass model="):
        einfx.calibrate(runtime="openvino")
    with pytest.raises(ExportError, match="give runtime='onnxruntime' or runtime='openvino'"):
        einfx.calibrate(model=model)
