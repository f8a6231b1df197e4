import pytest
import torch
from safetensors.torch import save_model

from einfx.zoo import ModelSpec, build_model, parse_overrides, parse_spec
from einfx.errors import ModelSpecError

TINY_GPT = "hf:gpt2?n_layer=1&n_embd=32&n_head=2&vocab_size=100&n_positions=64"


def test_overrides_are_typed_and_sorted():
    spec = parse_spec("hf:gpt2?n_layer=2&resid_pdrop=0.5&scale_attn_weights=false&activation_function=relu")
    assert spec.overrides == (("activation_function", "relu"), ("n_layer", 2), ("resid_pdrop", 0.5),
                              ("scale_attn_weights", False))
    assert spec.canonical == "hf:gpt2?activation_function=relu&n_layer=2&resid_pdrop=0.5&scale_attn_weights=false"
    assert parse_spec(spec.canonical) == spec
    assert spec.slug == "hf-gpt2-activation_function=relu-n_layer=2-resid_pdrop=0.5-scale_attn_weights=false"


def test_equal_models_have_equal_canonical_specs():
    assert parse_spec("hf:gpt2?b=2&a=1").canonical == parse_spec(" hf:gpt2?a=1&b=2 ").canonical


def test_parse_overrides_rejects_bad_items():
    with pytest.raises(ModelSpecError, match="not key=value"):
        parse_overrides("n_layer", "x")
    with pytest.raises(ModelSpecError, match="given twice"):
        parse_overrides("a=1&a=2", "x")


@pytest.mark.parametrize("text, message", [
    ("zoo9:thing", "unknown zoo 'zoo9'; valid zoos: torchvision, timm, hf"),
    ("tim:vit_tiny_patch16_224", "did you mean 'timm'"),
    ("resnet18", "expected ZOO:NAME"),
    ("torchvision:", "model name '' is empty"),
    ("hf:gpt2?n_layer", "is not key=value"),
    ("missing.safetensors@torchvision:resnet18", "does not exist"),
])
def test_parse_errors(text, message):
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_spec(text)


def test_weights_file_needs_an_architecture(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ModelSpecError, match="needs an architecture, as PATH@SPEC or --arch SPEC"):
        parse_spec(str(path))
    spec = parse_spec(str(path), arch="torchvision:resnet18")
    assert spec.zoo == "file" and spec.arch == ModelSpec("torchvision", "resnet18")
    assert parse_spec(f"{path}@torchvision:resnet18") == spec
    with pytest.raises(ModelSpecError, match="must be a zoo spec"):
        parse_spec(f"{path}@{path}")


@pytest.mark.parametrize("text, message", [
    ("torchvision:resnet1", "unknown torchvision model 'resnet1'; close matches: resnet18"),
    ("timm:vit_tiny_patch16_22", "close matches: vit_tiny_patch16_224"),
    ("hf:gtp2", "unknown hf model 'gtp2'; close matches: gpt2"),
    ("hf:gpt2?n_layr=2", "unknown gpt2 config keys ['n_layr'] (close matches: {'n_layr': ['n_layer']})"),
    ("torchvision:resnet18?num_clases=3", "cannot build with overrides {'num_clases': 3}"),
])
def test_unknown_names_show_close_matches(text, message):
    with pytest.raises(ModelSpecError) as info:
        build_model(parse_spec(text))
    assert message in str(info.value)


def test_example_inputs_per_family():
    text = build_model(parse_spec(TINY_GPT), tokens=16)
    assert text.family == "text" and text.example_inputs[0].shape == (1, 16)
    assert text.example_inputs[0].dtype == torch.int64 and int(text.example_inputs[0].max()) < 100
    assert type(text.module).__name__ == "GPT2LMHeadModel" and not text.module.training
    bert = build_model(parse_spec("hf:bert?num_hidden_layers=1&hidden_size=32&num_attention_heads=2&"
                                  "intermediate_size=64&vocab_size=100"), tokens=8)
    assert type(bert.module).__name__ == "BertModel"  # an encoder gets its base model, not a causal LM head
    image = build_model(parse_spec("torchvision:resnet18?num_classes=10"))
    assert image.family == "image" and image.example_inputs[0].shape == (1, 3, 224, 224)
    assert image.module(*image.example_inputs).shape == (1, 10)
    timm_vit = build_model(parse_spec("timm:vit_tiny_patch16_224?depth=1&img_size=32"))
    assert timm_vit.example_inputs[0].shape == (1, 3, 32, 32)
    assert timm_vit.module(*timm_vit.example_inputs).shape == (1, 1000)
    vit = build_model(parse_spec("hf:vit?num_hidden_layers=1&hidden_size=32&num_attention_heads=2&"
                                 "intermediate_size=64&image_size=32&patch_size=8"))
    assert vit.family == "image" and vit.example_inputs[0].shape == (1, 3, 32, 32)


def test_tokens_beyond_positions_is_rejected():
    with pytest.raises(ModelSpecError, match="--tokens 65 exceeds the model's 64 positions"):
        build_model(parse_spec(TINY_GPT), tokens=65)


def _reference(tokens=8):
    torch.manual_seed(0)
    built = build_model(parse_spec(TINY_GPT), tokens)
    with torch.no_grad():
        return built.module, built.module(*built.example_inputs).logits


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_are_loaded_strictly(tmp_path, suffix):
    module, expected = _reference()
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_model(module, str(path))  # stores the tied LM head once
    else:
        torch.save({"state_dict": module.state_dict()}, path)
    built = build_model(parse_spec(f"{path}@{TINY_GPT}"), tokens=8)
    with torch.no_grad():
        torch.testing.assert_close(built.module(*built.example_inputs).logits, expected, rtol=0, atol=0)


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelSpecError, match="bad.safetensors' is corrupt or unreadable"):
        build_model(parse_spec(f"{path}@{TINY_GPT}"), tokens=8)
    pt = tmp_path / "bad.pt"
    pt.write_bytes(b"garbage" * 10)
    with pytest.raises(ModelSpecError, match="bad.pt' is corrupt or unreadable"):
        build_model(parse_spec(f"{pt}@{TINY_GPT}"), tokens=8)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"weights": torch.zeros(2), "callback": print}, path)  # a global that weights_only rejects
    with pytest.raises(ModelSpecError, match="corrupt or unreadable"):
        build_model(parse_spec(f"{path}@{TINY_GPT}"), tokens=8)


def test_weights_of_another_architecture(tmp_path):
    module, _ = _reference()
    path = tmp_path / "other.pt"
    state = module.state_dict()
    state["extra.weight"] = torch.zeros(1)
    state["transformer.wte.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(ModelSpecError) as info:
        build_model(parse_spec(f"{path}@{TINY_GPT}"), tokens=8)
    assert "1 unexpected ['extra.weight']" in str(info.value)
    assert "transformer.wte.weight: file (3, 3) vs model (100, 32)" in str(info.value)
