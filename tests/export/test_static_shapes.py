"""Compiling for one static shape (einfx.export.runtimes.load(shapes=...)) and exporting for a deployment shape
(to_onnx(deploy_shape=...)): the same outputs as the dynamic graph, the shape really fixed, bad shapes refused
with the reason, the optional passes timed at that shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import einfx
from einfx import Structure
from einfx.errors import ExportError
from einfx.export.onnx_export import shaped_feeds
from einfx.export.pass_choice import choose_passes
from einfx.export.runtimes import RUNTIMES, available, load

from tests.export.test_graph_passes import _random_graph, zoo_bert

X = np.random.default_rng(1).standard_normal((5, 4, 6)).astype(np.float32)
INSTALLED = [r for r in RUNTIMES if available(r)]


@pytest.mark.parametrize("runtime", INSTALLED)
def test_a_static_compile_gives_the_dynamic_outputs_and_refuses_other_shapes(runtime):
    model = _random_graph(4)
    want = load(runtime, model)({"x": X})[0]
    static = load(runtime, model, shapes={"x": (5, 4, 6)})
    np.testing.assert_allclose(static({"x": X})[0], want, rtol=1e-5)
    with pytest.raises(Exception):
        static({"x": X[:3]})  # compiled for 5 rows only


def test_onnxruntime_takes_the_sizes_as_overrides_of_the_named_axes():
    import onnxruntime as ort

    from einfx.export.runtimes import _dim_overrides, _graph_inputs

    model = _random_graph(4)
    assert _dim_overrides(_graph_inputs(model), {"x": (5, 4, 6)}) == {"n": 5}
    opts = ort.SessionOptions()
    opts.add_free_dimension_override_by_name("n", 5)
    assert ort.InferenceSession(model.SerializeToString(), opts).get_inputs()[0].shape == [5, 4, 6]


@pytest.mark.parametrize("shapes, reason", [
    ({"y": (5, 4, 6)}, "not an input of the model; inputs: x"),
    ({"x": (5, 4)}, "does not fit its declared shape ['n', 4, 6]"),
    ({"x": (5, 3, 6)}, "static shape (5, 3, 6) for input 'x' does not fit"),
    ({"x": (0, 4, 6)}, "does not fit"),
])
def test_static_shapes_that_do_not_fit_the_model_are_refused(shapes, reason):
    with pytest.raises(ExportError) as err:
        load("onnxruntime", _random_graph(4), shapes=shapes)
    assert reason in str(err.value)


def test_one_axis_given_two_sizes_is_refused():
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 16]) for n in ("ids", "mask")]
    graph = helper.make_graph([helper.make_node("Add", ["ids", "mask"], ["y"])], "two", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match="axis 'batch' two sizes, 8 and 4 \\(input 'mask'\\)"):
        load("onnxruntime", model, shapes={"ids": (8, 16), "mask": (4, 16)})


def test_pass_choice_records_the_static_shape_it_compiled_for():
    def timer(fns):
        for fn in fns.values():
            fn()
        return {k: 1.0 for k in fns}

    graph, choice = choose_passes(_random_graph(1), "onnxruntime", {"x": X, "unused": X}, timer=timer, static=True)
    assert choice.shapes == {"x": (5, 4, 6)} and choice.to_dict()["shapes"] == {"x": [5, 4, 6]}
    _, dynamic = choose_passes(_random_graph(1), "onnxruntime", {"x": X}, timer=timer)
    assert dynamic.shapes == {}


def test_shaped_feeds_tile_the_example_along_batch_and_sequence():
    ids = torch.arange(10).reshape(2, 5)
    axes = {0: {0: "batch", 1: "sequence"}, 1: {0: "batch", 1: "sequence"}}
    feeds = shaped_feeds((ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], axes, (3, 12), "float32")
    want = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1], [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6],
                     [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]])
    np.testing.assert_array_equal(feeds["input_ids"], want)
    assert feeds["attention_mask"].shape == (3, 12)
    shorter = shaped_feeds((ids,), ["input_ids"], axes, (1, 3), "float32")["input_ids"]
    np.testing.assert_array_equal(shorter, [[0, 1, 2]])
    image = torch.randn(2, 3, 4, 4)  # a batch axis only: the other dims as they are
    assert shaped_feeds((image,), ["pixels"], {0: {0: "batch"}}, (5,), "float16")["pixels"].shape == (5, 3, 4, 4)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(deploy_shape=(4, 24)), "give runtime= too"),
    (dict(runtime="onnxruntime", deploy_shape=(4, 0)), "positive ints, got (4, 0)"),
    (dict(runtime="onnxruntime", deploy_shape=(4, 24, 2)), "(batch,) or (batch, sequence)"),
    (dict(runtime="onnxruntime", deploy_shape=(4, 24), dynamic_sequence=False), "has a dynamic sequence axis"),
    (dict(runtime="onnxruntime", deploy_shape=(4,), dynamic_batch=False), "no input has a dynamic batch axis"),
])
def test_deploy_shapes_that_cannot_be_met_are_refused(tmp_path, kwargs, reason):
    layer = torch.nn.Sequential(einfx.EinsumLinear(16, 16, Structure.btt(rank=1)))
    with pytest.raises(ExportError) as err:
        if "dynamic_sequence" in kwargs:
            ids_model = torch.nn.Embedding(10, 16)
            einfx.export.to_onnx(ids_model, torch.zeros(2, 5, dtype=torch.long), tmp_path / "m.onnx", **kwargs)
        else:
            einfx.export.to_onnx(layer, torch.randn(2, 16), tmp_path / "m.onnx", **kwargs)
    assert reason in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_export_for_a_deployment_shape_tunes_and_times_at_that_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path / "cache"))
    opt, example = zoo_bert(Structure.btt(rank=2), layers=1)
    rep = einfx.export.to_onnx(opt, example, tmp_path / "m.onnx", runtime="onnxruntime", deploy_shape=(3, 20),
                               latency_repeats=0)
    assert rep.verified and rep.pass_choice.shapes == {"input_ids": (3, 20), "attention_mask": (3, 20)}
    assert rep.tuned and all(t.signature.endswith(" tokens=60") for t in rep.tuned.values())  # 3 x 20 rows
    ids = torch.randint(0, 100, (3, 20))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 20), np.int64)}
    with torch.no_grad():
        want = opt(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.numpy()
    got = load("onnxruntime", str(tmp_path / "m.onnx"), shapes={k: v.shape for k, v in feeds.items()})(feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
