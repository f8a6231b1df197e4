import pytest

from einfx import Structure
from einfx.cli.demo import demo_policy
from einfx.cli.main import main


def test_demo_policy_is_btt_for_every_projection_and_excludes_nothing():
    policy = demo_policy()
    assert policy.default == Structure.btt(rank=1) and policy.exclude == () and policy.init == "project"
    assert policy.select("transformer.h.0.attn.c_attn", ("Conv1D",)).structure == Structure.btt(rank=1)
    assert policy.select("lm_head", ("Linear",)).structure == Structure.btt(rank=1)  # rejected later: tied


@pytest.mark.slow  # GPT-2-small width (d = 768) with 2 layers: about a minute on 2 cores
def test_demo_quick_prints_table_saving_and_verify_error(capsys, tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["name", "kind"]
    rows = [line for line in lines if line.startswith("transformer.h.")]
    assert len(rows) == 8 and all("structured" in r and "btt(rank=1)" in r for r in rows)
    head = next(line for line in lines if line.startswith("lm_head"))
    assert "kept" in head
    assert "tied or shared weight: 'lm_head.weight' is the same tensor as 'transformer.wte.weight'" in head
    assert "8 of 9 candidate layers structured" in out and "(traced with record)" in out
    assert "whole model parameters:" in out and "verify: max relative output error" in out
    # still the user's class, generating with its KV cache; saved and loaded back exactly
    assert "GPT2LMHeadModel.generate, greedy, 12 new tokens" in out
    generated = [line for line in out.splitlines() if line.startswith(("  dense ", "  optimized "))]
    assert len(generated) == 2 and all(len(line.split("]")[0].split(",")) == 12 for line in generated)
    assert "einfx.load gives a GPT2LMHeadModel with identical logits" in out

    # the ONNX part: both files written and verified, latency table with the speedup column
    assert (tmp_path / "dense.onnx").is_file() and (tmp_path / "optimized.onnx").is_file()
    assert "onnxruntime latency, batch 1 x 512 tokens" in out
    table = out[out.index("onnxruntime latency"):]
    assert "dense" in table and "optimized" in table and "x" in table.split("optimized")[-1]
