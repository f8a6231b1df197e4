"""einfx.save / einfx.load: round trips, and every bad folder gets an error naming the file."""

import json
import os

import pytest
import torch
from torch import nn

import einfx
from einfx import EinsumLinear, Policy, Structure
from einfx.errors import SavedModelError
from einfx.rewriter.attention import FusedSelfAttention

from _models import MHANet, TinyTransformer, bert, ids


def _btt(model, x):
    return einfx.optimize(model, Policy(default=Structure.btt(rank=2)), (x,))


def test_plain_model_round_trip_needs_a_fresh_instance(tmp_path):
    torch.manual_seed(0)
    model, x = TinyTransformer(), ids(vocab=50)
    out = _btt(model, x)
    folder = einfx.save(out, tmp_path / "m")
    assert sorted(os.listdir(folder)) == ["einfx.json", "model.safetensors"]
    info = json.loads((tmp_path / "m" / "einfx.json").read_text())
    assert info["base"] == {"kind": "instance", "class": "_models.TinyTransformer"}
    assert info["modules"]["blocks.0.attn.q"]["structure"] == {"kind": "btt", "rank": 2}
    with pytest.raises(SavedModelError, match=r"was saved from a _models.TinyTransformer that einfx cannot rebuild "
                                              r"by itself; pass model=<a fresh instance of that class>"):
        einfx.load(folder)
    back = einfx.load(folder, model=TinyTransformer())
    assert torch.equal(back(x), out(x)) and isinstance(back.blocks[1].mlp.up, EinsumLinear)


def test_attention_decomposition_round_trip(tmp_path):
    torch.manual_seed(0)
    model, x = MHANet().eval(), torch.randn(2, 5, 64)
    out = einfx.optimize(model, Policy(rules=[einfx.Rule("*.out_proj", Structure.btt(rank=4))]), (x,))
    back = einfx.load(einfx.save(out, tmp_path / "m"), model=MHANet())
    assert isinstance(back.attn, FusedSelfAttention) and isinstance(back.attn.in_proj, nn.Linear)
    assert isinstance(back.attn.out_proj, EinsumLinear) and torch.equal(back(x), out(x))


def test_zoo_spec_base_rebuilds_by_itself(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    out = einfx.optimize(model, Policy(default=Structure.low_rank(rank=4)), (x,))
    back = einfx.load(einfx.save(out, tmp_path / "m", base="torchvision:resnet18?num_classes=10"))
    assert type(back) is type(model) and torch.equal(back(x), out(x))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = bert()
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), example_kwargs={"input_ids": ids()})
    return einfx.save(out, tmp_path / "bert")


def test_corrupt_weights_file(saved):
    path = os.path.join(saved, "model.safetensors")
    with open(path, "wb") as fh:
        fh.write(b"\x00not a safetensors file")
    with pytest.raises(SavedModelError, match=f"the weights file {path} is corrupt or unreadable"):
        einfx.load(saved)


def test_missing_weights_file(saved):
    os.remove(os.path.join(saved, "model.safetensors"))
    with pytest.raises(SavedModelError, match="the weights file .*model.safetensors is missing"):
        einfx.load(saved)


def _edit_manifest(folder, edit):
    path = os.path.join(folder, "config.json")
    config = json.loads(open(path).read())
    edit(config)
    with open(path, "w") as fh:
        json.dump(config, fh)
    return path


def test_manifest_that_does_not_match_the_weights(saved):
    def shrink(config):
        layer = config["einfx"]["modules"]["encoder.layer.0.intermediate.dense"]
        layer["structure"] = {"kind": "btt", "rank": 1}

    _edit_manifest(saved, shrink)
    with pytest.raises(SavedModelError, match=r"model.safetensors does not match the rebuilt BertModel: wrong shapes "
                                              r"encoder.layer.0.intermediate.dense.A"):
        einfx.load(saved)


def test_manifest_naming_a_module_the_base_lacks(saved):
    path = _edit_manifest(saved, lambda c: c["einfx"]["modules"].update(
        {"encoder.layer.9.output.dense": {"type": "EinsumLinear", "structure": "btt", "d_in": 8, "d_out": 8,
                                          "bias": True}}))
    with pytest.raises(SavedModelError, match=f"{path}: module 'encoder.layer.9.output.dense' does not exist in the "
                                              "base model BertModel"):
        einfx.load(saved)


def test_bad_versions_and_plain_folders(saved, tmp_path):
    _edit_manifest(saved, lambda c: c["einfx"].update(version=99))
    with pytest.raises(SavedModelError, match="has format version 99; this einfx reads version 1"):
        einfx.load(saved)
    _edit_manifest(saved, lambda c: c.pop("einfx"))
    with pytest.raises(SavedModelError, match="has no 'einfx' entry: the folder holds a plain Hugging Face model"):
        einfx.load(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SavedModelError, match="has neither einfx.json nor config.json"):
        einfx.load(tmp_path / "empty")
    with pytest.raises(SavedModelError, match="is not a folder"):
        einfx.load(tmp_path / "nothing-here")


def test_save_never_overwrites_a_folder_that_is_not_a_saved_model(tmp_path):
    model, x = TinyTransformer(), ids(vocab=50)
    out = _btt(model, x)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(SavedModelError, match="exists and is not a saved model folder"):
        einfx.save(out, tmp_path / "photos")
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["photos"]
    with pytest.raises(SavedModelError, match="folder .* does not exist"):
        einfx.save(out, tmp_path / "no" / "such" / "dir")
    first = einfx.save(out, tmp_path / "m")
    again = einfx.save(out, tmp_path / "m")  # a saved model folder is replaced whole
    assert first == again and sorted(os.listdir(tmp_path)) == ["m", "photos"]
