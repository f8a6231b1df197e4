"""Measured whole-graph passes (einfx.export.pass_choice): an optional pass that the runtime runs slower is
left out, noise within the margin keeps every pass, the kept graph is exact, the export reports the choice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import einfx
from einfx import Structure
from einfx.export.graph_passes import optimize_graph
from einfx.export.pass_choice import KEEP_MARGIN, choose_passes
from einfx.export.runtimes import load

from tests.export.test_graph_passes import _norm_graph, _ops, _random_graph, zoo_bert

X = np.random.default_rng(0).standard_normal((5, 4, 6)).astype(np.float32)


def _clock(seconds: dict):
    """A fake timer: each label's time as given (1.0 for labels not listed); records what it was asked."""
    asked = []

    def timer(fns):
        asked.append(sorted(fns))
        for fn in fns.values():
            fn()  # the runners do run
        return {k: seconds.get(k, 1.0) for k in fns}
    return timer, asked


def test_a_pass_the_runtime_runs_slower_is_left_out_and_the_graph_stays_exact():
    model = _random_graph(1)
    timer, asked = _clock({"all passes": 1.0, "without fuse_siblings": 0.8})
    graph, choice = choose_passes(model, "onnxruntime", {"x": X, "unused": X}, timer=timer)
    assert asked == [["all passes", "without fuse_siblings"]]  # sinking found nothing here: not timed
    assert choice.skipped == ("fuse_siblings",) and choice.counts["sibling matmuls fused"] == 0
    assert choice.counts["transpose pairs"] == 3 and _ops(graph)["MatMul"] == 3
    expected = load("onnxruntime", model)({"x": X})[0]
    np.testing.assert_allclose(load("onnxruntime", graph)({"x": X})[0], expected, rtol=1e-5)
    assert choice.to_dict() == {"runtime": "onnxruntime", "skipped": ["fuse_siblings"],
                                "times_ms": {"all passes": 1000.0, "without fuse_siblings": 800.0}, "shapes": {}}


def test_plain_norm_sums_stay_only_where_the_runtime_runs_them_faster():
    model = _norm_graph()
    x = {"x": np.random.default_rng(5).standard_normal((2, 3, 16)).astype(np.float32)}
    timer, asked = _clock({"all passes": 1.0, "without plain_norm_sums": 1.5})
    graph, choice = choose_passes(model, "onnxruntime", x, timer=timer)
    assert asked == [["all passes", "without plain_norm_sums"]]
    assert choice.skipped == () and _ops(graph)["Sum"] == 1 and choice.counts["norm sums kept plain"] == 1
    timer, _ = _clock({"all passes": 1.0, "without plain_norm_sums": 0.7})
    graph, choice = choose_passes(model, "onnxruntime", x, timer=timer)
    assert choice.skipped == ("plain_norm_sums",) and _ops(graph)["Sum"] == 0 and _ops(graph)["Add"] == 3


def test_a_gain_within_the_margin_keeps_every_pass():
    model = _random_graph(2)
    timer, _ = _clock({"all passes": 1.0, "without fuse_siblings": 1.0 / KEEP_MARGIN + 1e-3})
    graph, choice = choose_passes(model, "onnxruntime", {"x": X}, timer=timer)
    assert choice.skipped == () and choice.counts == optimize_graph(model)[1]
    assert _ops(graph)["MatMul"] == 1


def test_nothing_is_timed_when_no_optional_pass_applies():
    model = _random_graph(3, siblings=1)
    timer, asked = _clock({})
    graph, choice = choose_passes(model, "onnxruntime", {"x": X}, timer=timer)
    assert asked == [] and choice.times == {} and choice.skipped == ()


@pytest.mark.slow
def test_export_for_a_runtime_reports_the_passes_it_timed(tmp_path, monkeypatch):
    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path / "cache"))
    opt, example = zoo_bert(Structure.low_rank(rank=8), layers=1)
    rep = einfx.export.to_onnx(opt, example, tmp_path / "m.onnx", runtime="onnxruntime", tokens=96,
                               latency_repeats=0)
    choice = rep.pass_choice
    assert rep.verified and choice is not None and choice.runtime == "onnxruntime"
    assert set(choice.times) >= {"all passes", "without fuse_siblings"}
    assert rep.rewrites == choice.counts
    fused = rep.rewrites["sibling matmuls fused"] > 0
    assert fused == ("fuse_siblings" not in choice.skipped)
    assert "graph passes timed in onnxruntime" in str(rep)
    assert onnx.load(str(tmp_path / "m.onnx")).graph.node  # the kept graph is the file written


def test_deploy_feeds_repeat_the_batch_to_the_deployment_rows():
    from einfx.export.onnx_export import deploy_feeds

    ids = torch.arange(32).reshape(2, 16)
    axes = {0: {0: "batch", 1: "sequence"}, 1: {0: "batch", 1: "sequence"}}
    feeds = deploy_feeds((ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], axes, 100, "float32")
    assert feeds["input_ids"].shape == (8, 16) and (feeds["input_ids"][6:] == ids.numpy()).all()
    features = deploy_feeds((torch.randn(4, 8),), ["x"], {0: {0: "batch"}}, 10, "float16")
    assert features["x"].shape == (12, 8) and features["x"].dtype == np.float16
    image = torch.randn(1, 3, 8, 8)  # rows per image unknown: the example as it is
    assert deploy_feeds((image,), ["pixels"], {0: {0: "batch"}}, 512, "float32")["pixels"].shape == (1, 3, 8, 8)
    assert deploy_feeds((ids,), ["input_ids"], {}, 512, "float32")["input_ids"].shape == (2, 16)  # static batch
