from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from einfx import Policy, Rule, Structure
from einfx.rewriter import capture, detect, explain
from einfx.rewriter.detect import detect_modules

from _models import FormsMLP, TinyTransformer, bert, gpt2, ids, llama


def _kinds(model, example):
    cap = capture(model, example)
    found = detect(cap.module, model)
    return cap.frontend, found, Counter(c.kind for c in found)


def test_hand_written_mlp_every_form():
    frontend, found, kinds = _kinds(FormsMLP(), (torch.randn(3, 64),))
    assert frontend == "fx"
    by = {c.name: c for c in found}
    assert list(by) == ["fc1", "w2", "w3", "w4", "head"]
    assert kinds == Counter({"Linear": 2, "matmul": 3})
    assert (by["w2"].d_in, by["w2"].d_out, by["w2"].transposed) == (128, 64, True)   # x @ P
    assert (by["w3"].d_in, by["w3"].d_out, by["w3"].transposed) == (64, 64, False)   # x @ P.t()
    assert by["w4"].bias == "b4" and not by["w4"].transposed                         # F.linear(x, P, b)
    assert by["head"].objection.startswith("tied or shared weight: 'head.weight' is the same tensor as 'emb.weight'")
    assert [c.name for c in found if c.objection is None] == ["fc1", "w2", "w3", "w4"]


def test_small_transformer():
    frontend, found, kinds = _kinds(TinyTransformer(), (ids(vocab=50),))
    assert frontend == "fx" and kinds == Counter({"Linear": 13})
    assert all(c.objection is None for c in found)


@pytest.mark.parametrize("build, frontend, kinds, rejected", [
    (gpt2, "export", {"Conv1D": 8, "Linear": 1}, {"lm_head": "tied or shared weight"}),
    (bert, "export", {"Linear": 13}, {}),
    (llama, "export", {"Linear": 15}, {}),
])
def test_transformers_models(build, frontend, kinds, rejected):
    model = build()
    got_frontend, found, got = _kinds(model, (ids(),))
    assert got_frontend == frontend and got == Counter(kinds)
    assert {c.name: c.objection.split(":")[0] for c in found if c.objection} == rejected
    if build is gpt2:
        c_attn = next(c for c in found if c.name == "transformer.h.0.attn.c_attn")
        assert (c_attn.d_in, c_attn.d_out, c_attn.transposed, c_attn.shape) == (64, 192, True, (64, 192))


def test_hf_fx_front_end_reason_is_recorded():
    cap = capture(gpt2(), (ids(),))
    assert set(cap.reasons) == {"fx", "hf_fx"}
    assert "transformers.utils.fx was removed" in cap.reasons["hf_fx"] or "hf" in cap.reasons["hf_fx"]


@pytest.mark.slow
def test_torchvision_and_timm_models():
    import timm
    import torchvision

    x = (torch.randn(1, 3, 224, 224),)
    cases = [
        (torchvision.models.resnet18(), {"Linear": 1}),
        (torchvision.models.vit_b_16(), {"fused projection": 12, "Linear": 37}),
        (timm.create_model("vit_tiny_patch16_224", pretrained=False), {"Linear": 49}),
        (timm.create_model("mixer_s16_224", pretrained=False), {"Linear": 33}),
    ]
    for model, kinds in cases:
        frontend, found, got = _kinds(model.eval(), x)
        assert frontend == "fx" and got == Counter(kinds), type(model).__name__
        assert all(c.objection is None for c in found)
    vit = dict((c.name, c) for c in _kinds(cases[1][0], x)[1])
    qkv = vit["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert (qkv.d_in, qkv.d_out, qkv.site) == (768, 2304, "mha")


# -- rejection reasons ---------------------------------------------------------------------------------
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))
        self.experts = nn.Parameter(torch.randn(4, 64, 64))
        self.lin = nn.Linear(64, 64)
        self.left = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):                       # x: (4, 8, 64)
        h = F.linear(x, self.w) + self.w.sum()  # weight used elsewhere
        h = torch.matmul(h, self.experts)       # non-2-D weight
        h = self.lin(self.lin(h))               # module called twice
        return torch.matmul(self.left, h)       # the parameter is the left operand


def test_detection_objections():
    model = Shared()
    found = {c.name: c for c in detect(capture(model, None).module, model)}
    assert found["w"].objection.startswith("weight used elsewhere: 'w' feeds 2 graph nodes")
    assert found["experts"].objection == ("non-2-D weight: 'experts' has shape (4, 64, 64); einfx structures "
                                          "2-D weights")
    assert found["lin"].objection.startswith("weight used elsewhere: module 'lin' is called 2 times")
    assert "is the left operand" in found["left"].objection


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.masked = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x, mem, mask):
        y, _ = self.attn(x, mem, mem, need_weights=False)
        z, _ = self.masked(y, y, y, attn_mask=mask, need_weights=False)
        return z


def test_attention_objections():
    model = CrossAttention()
    found = {c.name: c for c in detect(capture(model, None).module, model)}
    assert set(found) == {"attn.in_proj", "attn.out_proj", "masked.in_proj", "masked.out_proj"}
    assert found["attn.in_proj"].kind == "fused projection"
    assert found["attn.in_proj"].objection.startswith("cross-attention: query, key and value are different tensors")
    assert found["attn.out_proj"].objection == found["attn.in_proj"].objection
    assert "attention masks" in found["masked.in_proj"].objection


def test_policy_level_rejections_in_explain():
    model = FormsMLP()
    policy = Policy(default=Structure.btt(rank=1),
                    rules=[Rule("w3", Structure.low_rank(rank=100))],
                    exclude=["w4"], min_features=100)
    rep = explain(model, policy, (torch.randn(3, 64),))
    reasons = {r.name: r.reason for r in rep.rows}
    assert reasons["w4"] == "excluded by policy (exclude pattern 'w4')"
    assert reasons["w2"] == "below min_features: min(d_in, d_out) = 64 < 100"
    assert reasons["head"].startswith("tied or shared weight")
    policy = Policy(default=Structure.btt(rank=1), rules=[Rule("w3", Structure.low_rank(rank=100))])
    rows = {r.name: r for r in explain(model, policy, (torch.randn(3, 64),)).rows}
    reasons = {name: r.reason for name, r in rows.items()}
    assert reasons["w3"].startswith("shape impossible for low_rank(rank=100) (exact-name rule pattern 'w3'): "
                                    "layer 'w3': low_rank rank 100 exceeds min(d_in, d_out) = 64")
    assert rows["w3"].decision == "kept" and rows["fc1"].decision == "structured"


def test_module_fallback_detection_lists_linear_and_conv1d():
    model = gpt2()
    found = detect_modules(model)
    assert Counter(c.kind for c in found) == Counter({"Conv1D": 8, "Linear": 1})
    assert next(c for c in found if c.name == "lm_head").objection.startswith("tied or shared weight")
