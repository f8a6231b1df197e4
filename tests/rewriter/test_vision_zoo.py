"""torchvision and timm models through optimize: every linear has a row, the class stays where it can."""

import pytest
import torch
from torch import fx, nn

import einfx
from einfx import EinsumLinear, Policy, Structure


def _expected_rows(model):
    """Every nn.Linear by name, and the fused input projection of every nn.MultiheadAttention."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return names | {f"{n}.in_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _models():
    import timm
    import torchvision

    return [
        ("resnet18", lambda: torchvision.models.resnet18(), 224),
        ("vit_b_16", lambda: torchvision.models.vit_b_16(), 224),
        ("vit_tiny_patch16_224", lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False), 224),
        ("mixer_s16_224", lambda: timm.create_model("mixer_s16_224", pretrained=False), 224),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name, build, size", _models(), ids=lambda v: v if isinstance(v, str) else "")
def test_vision_models_keep_their_class_and_every_linear_has_a_row(name, build, size):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, size, size)
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=1), init="random"), (x,))
    assert type(out) is type(model)
    rows = out.einfx_report.rows
    assert {r.name for r in rows} == _expected_rows(model) and all(r.structured for r in rows)
    assert sum(isinstance(m, EinsumLinear) for m in out.modules()) == len(rows)
    out.train()
    out.eval()
    with torch.no_grad():
        y = out(torch.randn(3, 3, size, size))
    assert y.shape == (3, 1000) and torch.isfinite(y).all()


@pytest.mark.slow
def test_swin_attention_weights_read_inside_an_opaque_function_are_structured():
    """torchvision's swin passes qkv.weight and proj.weight into shifted_window_attention, which torch.fx keeps
    opaque; the recorder sees the F.linear inside, and torch.export rewrites it."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    x = torch.randn(1, 3, 224, 224)
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=1), init="random"), (x,))
    rows = {r.name: r for r in out.einfx_report.rows}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(rows) == linears and len(linears) == 52
    assert all(r.structured for r in rows.values())
    assert rows["features.1.0.attn.qkv"].kind == "Linear" and rows["features.1.0.attn.proj"].structured
    assert isinstance(out, fx.GraphModule) and out.einfx_report.frontend == "record+export"
    assert out.eval() is out and not out.training
    with torch.no_grad():
        y = out(torch.randn(2, 3, 224, 224))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
