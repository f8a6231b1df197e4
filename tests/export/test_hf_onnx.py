"""ONNX export of Hugging Face models as users call them: their input names, dynamic batch and sequence axes,
the main output only (no past key values), parity at two other (batch, sequence) shapes."""

import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

import einfx
from einfx import Policy, Structure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rewriter"))
from _hf_zoo import ZOO  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("entry", ZOO, ids=lambda z: z.name)
def test_hf_model_exports_with_its_names_and_dynamic_axes(entry, tmp_path):
    model = entry.build()
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=2), fold_to_dense=False),
                         example_kwargs=entry.inputs(full=False))
    example = entry.inputs(batch=2, length=8, full=True)
    r = einfx.export.to_onnx(out, example, tmp_path / "m.onnx", latency_repeats=0)
    assert r.input_names == tuple(example)
    main = "last_hidden_state" if entry.kind in ("encoder", "image") else "logits"
    assert r.output_names == (main,)  # no cache, no pooler: the main output
    for name, x in example.items():
        want = {0: "batch"}
        if not x.is_floating_point():
            want[1] = "decoder_sequence" if name.startswith("decoder_") else "sequence"
        assert r.dynamic_axes[name] == want
    shapes = {c.input_shapes for c in r.checks}
    assert len(r.checks) == 3 and len(shapes) == 3 and r.verified, [str(c) for c in r.checks]
    assert "Einsum" not in r.op_counts and r.op_counts.get("MatMul", 0) > 0
    # the file serves a shape none of the checks used, through the names a tokenizer produces
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    call = entry.inputs(batch=5, length=3, seed=9, full=True)
    got = session.run(None, {k: v.numpy() for k, v in call.items()})[0]
    with torch.no_grad():
        ref = out(**call)[main].numpy()
    assert got.shape == ref.shape and abs(got - ref).max() <= 1e-4 * abs(ref).max()
