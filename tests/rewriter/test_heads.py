"""Feature groups (attention heads) read from the model, and the factorizations they ask for."""

import sys
from pathlib import Path

import onnx
import pytest

import einfx
from einfx import Policy, Structure
from einfx.export.tune import TuningCache
from einfx.rewriter.detect import detect
from einfx.rewriter.trace import capture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hf_zoo import BY_NAME  # noqa: E402

BERT = BY_NAME["bert"]  # hidden 64: 4 heads of 16
WANT = {"encoder.layer.0.attention.self.query": (1, 4), "encoder.layer.0.attention.self.key": (1, 4),
        "encoder.layer.0.attention.self.value": (1, 4), "encoder.layer.0.attention.output.dense": (4, 1),
        "encoder.layer.0.intermediate.dense": (1, 1), "encoder.layer.0.output.dense": (1, 1)}


def test_recording_sees_the_head_split_and_merge_and_the_sizes_follow():
    model = einfx.optimize(BERT.build(), Policy(default=Structure.btt(rank=1), fold_to_dense=False),
                           example_kwargs=BERT.inputs())
    for name, groups in WANT.items():
        layer = model.get_submodule(name)
        assert layer.structure.groups == groups, name
        plain = Structure.btt(rank=1).resolve(layer.in_features, layer.out_features)
        assert (layer.sizes.gamma, layer.sizes.phi) == (groups[0] if groups[0] > 1 else plain.gamma,
                                                        groups[1] if groups[1] > 1 else plain.phi), name


def test_the_exported_graph_shows_the_same_groups():
    cap = capture(BERT.build(), None, BERT.inputs(), frontends=("export",))
    found = {c.name: c.groups for c in detect(cap.module, None)}
    assert {name: found[name] for name in WANT} == WANT


@pytest.mark.parametrize("runtime", [None, "onnxruntime"])
def test_head_aligned_layers_export_with_merged_relayouts_exactly(runtime, tmp_path):
    """q and v write (heads, tokens, head dim) and split their heads with one Transpose (a Reshape once
    attention runs heads first), k writes (heads, head dim, tokens) for its (b, h, d, t) split; outputs match
    torch within the export's tolerance, also with the plans measured in onnxruntime."""
    model = einfx.optimize(BERT.build(), Policy(default=Structure.btt(rank=1), fold_to_dense=False),
                           example_kwargs=BERT.inputs())
    tuning = TuningCache(runtime, 1, path=tmp_path / "tuning.json") if runtime else None
    r = einfx.export.to_onnx(model, BERT.inputs(), tmp_path / "m.onnx", latency_repeats=0, runtime=runtime,
                             tokens=16, threads=1, tuning=tuning)
    assert r.verified, [str(c) for c in r.checks]
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    if runtime is None:  # tuned plans are timing winners (a layer may fold to dense), so only the planned count
        assert r.rewrites["relayouts merged"] >= 3 * 2  # q, k, v of both layers
        # with the heads first, q's and v's splits become Reshapes (both layers)
        assert r.rewrites["attention transposes removed by heads first"] >= 2 * 2
