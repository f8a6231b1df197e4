"""End to end: GPT-2 (small config) and torchvision vit_b_16 with BTT on every projection, exported and
verified in onnxruntime at several batch/sequence sizes; the dense-vs-optimized demo table."""

import copy
import os

import pytest
import torch
from export_zoo import replace_projections, structured, tiny_gpt2, vit_b_16

import einfx
from einfx.export import demo_latency, to_onnx

BTT = einfx.Structure.btt(rank=1)


@pytest.mark.slow
def test_gpt2_btt_parity_at_several_sizes(tmp_path):
    # a batch of 1 in the example must not freeze the batch axis at 1 in the graph
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    model = structured(tiny_gpt2(), BTT, (ids,))
    assert sum(isinstance(m, einfx.EinsumLinear) for m in model.modules()) == 8  # 4 projections x 2 blocks
    report = to_onnx(model, (ids,), tmp_path / "gpt2.onnx", dynamic_axes={"input_ids": {1: "seq"}}, latency_repeats=0)
    assert report.verified and report.max_rel_error <= 1e-4
    assert [c.input_shapes[0] for c in report.checks] == [(1, 16), (2, 8), (3, 15)]
    assert "Einsum" not in report.op_counts


@pytest.mark.slow
def test_gpt2_optimize_export(tmp_path):
    # einfx.optimize captures HF models with dynamic batch and sequence axes: one file serves every size
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    gm = structured(tiny_gpt2(), BTT, (ids,))
    report = to_onnx(gm, (ids,), tmp_path / "gpt2_opt.onnx", dynamic_axes={"input_ids": {1: "seq"}},
                     latency_repeats=0)
    assert report.verified and report.max_rel_error <= 1e-4 and "Einsum" not in report.op_counts
    assert len({c.input_shapes[0] for c in report.checks}) == 3


@pytest.mark.slow
def test_vit_b_16_btt_parity_at_several_batch_sizes(tmp_path):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model = structured(vit_b_16(), BTT, (x,))
    # per block: the fused (3d, d) input projection, out_proj and the 2 MLP layers
    assert sum(isinstance(m, einfx.EinsumLinear) for m in model.modules()) == 12 * 4
    report = to_onnx(model, (x,), tmp_path / "vit.onnx", latency_repeats=0)
    assert report.verified and report.max_rel_error <= 1e-4
    assert [c.input_shapes[0][0] for c in report.checks] == [2, 1, 4]
    assert "Einsum" not in report.op_counts


def test_demo_latency_writes_both_files_and_a_table(tmp_path):
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).eval()
    x = torch.randn(1, 64, 256)
    optimized = structured(copy.deepcopy(dense), BTT, (x,))
    table, reports = demo_latency(dense, optimized, (x,), tmp_path / "demo", rounds=2, repeats=2)
    assert set(reports) == {"dense", "optimized"} and all(r.verified for r in reports.values())
    assert sorted(os.listdir(tmp_path / "demo")) == ["dense.onnx", "optimized.onnx"]
    lines = table.splitlines()
    assert lines[0].startswith("onnxruntime:")
    assert lines[3].split()[0] == "dense" and lines[3].split()[-2] == "1.00x"
    assert lines[4].split()[0] == "optimized" and float(lines[4].split()[-2].rstrip("x")) > 0
    assert reports["optimized"].total_bytes < reports["dense"].total_bytes
