"""``einfx convert --data FILE`` and local Hugging Face folders as MODEL specs: batches from text lines (the
model's own tokenizer, or bytes for a tokenizer-less zoo model) or a safetensors file, fidelity in report.json,
summary.md and the chart."""

import json

import pytest
import torch
from safetensors.torch import save_file

from einfx.cli.data import read_data
from einfx.cli.main import main
from einfx.errors import ModelSpecError
from einfx.zoo import build_model, parse_spec

TINY_BERT = "hf:bert?hidden_size=64&num_attention_heads=2&num_hidden_layers=1&intermediate_size=128&vocab_size=64"
POLICY = 'default: "low_rank:rank_frac=0.25"\nmin_features: 32\n'
WORDS = ["the", "model", "layer", "a", "is", "of", "structured", "matrix", "fast", "slow", "data", "text"]


def _folder(tmp_path):
    """A local Hugging Face folder as the MiniLM package ships one: config, safetensors weights, tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=128,
                        vocab_size=len(WORDS) + 5, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)  # safetensors by default
    return folder


def _lines(tmp_path, n=12):
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(n))
                    + "\n\n")
    return path


def test_a_local_folder_is_a_model_spec_with_its_tokenizer(tmp_path):
    folder = _folder(tmp_path)
    spec = parse_spec(str(folder))
    assert spec.zoo == "folder" and spec.canonical == str(folder.resolve()) and spec.slug == "folder-tiny-bert"
    built = build_model(spec, tokens=16)
    assert type(built.module).__name__ == "BertModel" and not built.module.training
    assert built.tokenizer is not None and built.info["tokenizer"] == "BertTokenizer"
    data = read_data(str(_lines(tmp_path)), built, tokens=16, batch_size=5)
    assert len(data) == 3 and data.examples == 12 and "BertTokenizer" in data.how
    assert set(data[0]) >= {"input_ids", "attention_mask"} and data[0]["input_ids"][0, 0] == 2  # [CLS]
    with pytest.raises(ModelSpecError, match="the folder has no config.json"):
        parse_spec(str(tmp_path))


def test_text_lines_are_batched_by_length(tmp_path):
    # lines of 1 and 6 words alternate; batched in file order every batch would pad the short ones to 6 words
    folder = _folder(tmp_path)
    built = build_model(parse_spec(str(folder)), tokens=16)
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join("data" if i % 2 else "the model layer is fast text" for i in range(8)))
    data = read_data(str(path), built, tokens=16, batch_size=4)
    assert [tuple(b["input_ids"].shape) for b in data] == [(4, 3), (4, 8)]  # [CLS] ... [SEP]: no padding at all
    assert all(bool(b["attention_mask"].all()) for b in data) and data.examples == 8


def test_text_without_a_tokenizer_becomes_bytes_and_tensors_are_split(tmp_path):
    built = build_model(parse_spec(TINY_BERT), tokens=8)
    data = read_data(str(_lines(tmp_path, 3)), built, tokens=8)
    ids, mask = data[0]["input_ids"], data[0]["attention_mask"]
    first = list("the model layer".encode())[:8]
    assert ids[0].tolist() == [b % 64 for b in first] and mask[0].tolist() == [1] * 8
    assert "UTF-8 bytes" in data.how
    path = tmp_path / "inputs.safetensors"
    save_file({"input_ids": torch.arange(40).reshape(10, 4) % 64, "attention_mask": torch.ones(10, 4, dtype=torch.long)},
              str(path))
    data = read_data(str(path), built, batch_size=4)
    assert [len(b["input_ids"]) for b in data] == [4, 4, 2] and data.examples == 10
    positional = tmp_path / "positional.safetensors"
    save_file({"1": torch.zeros(3, 2), "0": torch.ones(3, 5)}, str(positional))
    first = read_data(str(positional), built)[0]
    assert isinstance(first, tuple) and first[0].shape == (3, 5) and first[1].shape == (3, 2)


def test_bad_data_files_are_named(tmp_path):
    built = build_model(parse_spec(TINY_BERT), tokens=8)
    with pytest.raises(ModelSpecError, match="no such file"):
        read_data(str(tmp_path / "missing.txt"), built)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ModelSpecError, match="empty.txt': the file has no non-empty lines"):
        read_data(str(empty), built)
    ragged = tmp_path / "ragged.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, str(ragged))
    with pytest.raises(ModelSpecError, match=r"same first \(example\) axis; got a: \(3, 2\), b: \(4, 2\)"):
        read_data(str(ragged), built)
    image = build_model(parse_spec("torchvision:resnet18"))
    with pytest.raises(ModelSpecError, match="text lines need a text model"):
        read_data(str(_lines(tmp_path)), image)


@pytest.mark.slow
def test_convert_with_data_writes_the_fidelity_everywhere(tmp_path):
    folder = _folder(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = tmp_path / "out"
    code = main(["convert", str(folder), "--policy", str(policy), "--out", str(out), "--tokens", "16",
                 "--data", str(_lines(tmp_path))])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, {m["spec"]: m["error"] for m in summary["models"]}
    report = json.loads((out / "folder-tiny-bert" / "report.json").read_text())
    fid = report["fidelity"]
    assert fid["examples"] == 12 and fid["output"] == "last_hidden_state" and 0 < fid["cosine"] <= 1
    assert report["data"]["batches"] == 2 and "BertTokenizer" in report["data"]["how"]
    assert report["explain"]["fidelity"] == fid
    assert any("fitted to the original's outputs" in r["reason"] for r in report["explain"]["rows"])
    assert summary["models"][0]["cosine"] == pytest.approx(fid["cosine"])
    assert f"{fid['cosine']:.4f}" in (out / "summary.md").read_text()
    assert (out / "summary.png").stat().st_size > 0
    # without data every report says that fidelity was not measured
    out2 = tmp_path / "out2"
    assert main(["convert", str(folder), "--policy", str(policy), "--out", str(out2), "--tokens", "16"]) == 0
    report = json.loads((out2 / "folder-tiny-bert" / "report.json").read_text())
    assert report["fidelity"].startswith("not measured")
    assert "not measured (no --data)" in (out2 / "summary.md").read_text()
    assert main(["convert", str(folder), "--policy", str(policy), "--out", str(out2), "--data",
                 str(tmp_path / "nope.txt")]) == 2


def _convert_for(tmp_path, monkeypatch, *options) -> dict:
    """Convert the local tiny BERT folder with ``options`` (a tuning cache of its own); report.json's export."""
    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path / "cache"))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = tmp_path / "out"
    code = main(["convert", str(_folder(tmp_path)), "--policy", str(policy), "--out", str(out), "--tokens", "16",
                 *options])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, {m["spec"]: m["error"] for m in summary["models"]}
    return json.loads((out / "folder-tiny-bert" / "report.json").read_text())["export"]


@pytest.mark.slow
def test_convert_for_a_runtime_tunes_and_verifies_there(tmp_path, monkeypatch):
    export = _convert_for(tmp_path, monkeypatch, "--runtime", "openvino")
    assert export["runtime"] == "openvino" and export["passes"][0].startswith("tune[openvino")
    assert export["tuned"] and all(v.startswith("openvino: ") for v in export["tuned"].values())
    assert (tmp_path / "cache" / "tuning-openvino-cpu-v1.json").exists()


@pytest.mark.slow
def test_convert_for_a_deployment_shape_tunes_and_times_the_passes_there(tmp_path, monkeypatch):
    export = _convert_for(tmp_path, monkeypatch, "--runtime", "onnxruntime", "--deploy-shape", "3x20")
    assert export["deploy_shape"] == [3, 20] and export["passes"][0] == "tune[onnxruntime, 60 tokens]"
    shapes = export["graph_pass_choice"]["shapes"]  # the optional passes timed compiled for 3 x 20
    assert shapes and all(v == [3, 20] for v in shapes.values())


@pytest.mark.parametrize("argv, message", [
    (["--deploy-shape", "8x128"], "--deploy-shape 8x128: give --runtime too"),
    (["--runtime", "openvino", "--deploy-shape", "8x0"], "--deploy-shape '8x0': expected BATCHxSEQUENCE"),
    (["--runtime", "openvino", "--deploy-shape", "8x128x2"], "expected BATCHxSEQUENCE or BATCH"),
])
def test_a_bad_deploy_shape_is_a_usage_error(tmp_path, capsys, argv, message):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    assert main(["convert", TINY_BERT, "--policy", str(policy), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
