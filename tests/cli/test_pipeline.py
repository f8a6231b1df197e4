"""The real per-model pipeline (optimize + ONNX export): measurement helpers, and end-to-end zoo conversions."""

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from einfx.cli.main import main
from einfx.cli.pipeline import count_flops, count_params, load_policy
from einfx.zoo import build_model, parse_spec
from einfx.errors import PolicyError

TINY_GPT = "hf:gpt2?n_embd=64&n_head=2&n_layer=2&n_positions=64&vocab_size=512"
POLICY = 'default: "btt:rank=1"\nmin_features: 32\nexclude: ["lm_head", "head", "fc"]\n'


def test_count_params_counts_tied_parameters_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_params(nn.ModuleList([emb, head])) == 40
    assert count_params(nn.Linear(4, 3)) == 15


def test_count_flops_is_twice_the_multiply_adds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert count_flops(model, (torch.randn(3, 8),)) == 2 * 3 * (8 * 16 + 16 * 4)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, bias=False)
    assert count_flops(conv, (torch.randn(1, 3, 6, 6),)) == 2 * 6 * 6 * 5 * 3 * 3 * 3


def test_load_policy_reads_the_file_and_names_it_on_error(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text(POLICY)
    assert load_policy(str(good)).min_features == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: btt\ncolour: blue\n")
    with pytest.raises(PolicyError, match="colour"):
        load_policy(str(bad))


def _check_converted(out, spec, tokens=16):
    folder = out / parse_spec(spec).slug
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "ok" and report["explain"]["rows"]
    assert report["export"]["max_rel_error"] <= 1e-4
    assert "Einsum" not in report["export"]["op_counts"] and report["export"]["op_counts"]["MatMul"] > 0
    assert report["params"]["after"] < report["params"]["before"]
    assert report["flops"]["after"] < report["flops"]["before"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # one file serves every batch size
        inputs = build_model(parse_spec(spec), tokens=tokens).example_inputs
        feed = {meta.name: x.expand(batch, *x.shape[1:]).numpy() for meta, x in zip(session.get_inputs(), inputs)}
        result = session.run(None, feed)[0]
        assert result.shape[0] == batch and np.isfinite(result).all()
    return report


def _published(out):
    return sorted(n for n in os.listdir(out) if not n.startswith("summary"))


@pytest.mark.slow
def test_convert_vision_zoo_models_end_to_end(tmp_path):
    """A torchvision and a timm model through the real pipeline; bad specs, weights and policy fail alone."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    (tmp_path / "bad.toml").write_text('default = "btt:rank=1"\nmin_features = "many"\n')
    (tmp_path / "corrupt.pt").write_bytes(b"not a pickle")
    vit = "timm:vit_tiny_patch16_224?depth=1&img_size=32"
    listing = tmp_path / "models.txt"
    listing.write_text(f"torchvision:resnet_nope\ncorrupt.pt@{vit}  # relative to the list file\n"
                       "timm:vit_tiny_patch16_224?depth=1&img_size=48 policy=bad.toml\n")
    good = ["torchvision:mobilenet_v3_small?num_classes=10", vit]
    out = tmp_path / "out"
    code = main(["convert", *good, "unknownzoo:x", "--list", str(listing), "--policy", str(policy),
                 "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    status = {m["spec"]: m for m in summary["models"]}
    assert code == 1
    assert summary["counts"] == {"ok": 2, "skipped": 0, "failed": 4}, {s: m["error"] for s, m in status.items()}
    assert status["unknownzoo:x"]["error"].startswith("ModelSpecError: model spec 'unknownzoo:x': unknown zoo")
    assert "close matches: resnet" in status["torchvision:resnet_nope"]["error"]
    assert "is corrupt or unreadable" in status[parse_spec(f"{tmp_path}/corrupt.pt@{vit}").canonical]["error"]
    bad = status["timm:vit_tiny_patch16_224?depth=1&img_size=48"]["error"]
    assert bad.startswith("PolicyError") and "bad.toml" in bad
    assert _published(out) == sorted(parse_spec(s).slug for s in good)
    for spec in good:
        _check_converted(out, spec)


@pytest.mark.slow
def test_convert_hf_model_and_local_weights_end_to_end(tmp_path):
    """A transformers config with random weights, and the same architecture from a local .safetensors file."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    built = build_model(parse_spec(TINY_GPT), tokens=16)
    weights = tmp_path / "gpt.safetensors"
    save_model(built.module, str(weights))
    good = [TINY_GPT, f"{weights}@{TINY_GPT}"]
    out = tmp_path / "out"
    code = main(["convert", *good, "--policy", str(policy), "--out", str(out), "--tokens", "16"])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, {m["spec"]: m["error"] for m in summary["models"]}
    assert _published(out) == sorted(parse_spec(s).slug for s in good)
    reports = [_check_converted(out, spec) for spec in good]
    assert reports[0]["params"] == reports[1]["params"]
