import math

import pytest
import torch
from torch import nn

import einfx
from einfx import EinsumLinear, Structure
from einfx.errors import StructureError
from einfx.structures.init import core_fans, lr_multipliers, spectral_std


def test_fans_follow_spec():
    s = Structure.btt(rank=2).resolve(1024, 1024)
    assert core_fans(s) == {"A": (32, 32 * 2), "B": (32 * 2, 32)}
    k = Structure.tensor_train(rank=3).resolve(768, 768)   # α32 β24 δ32 ε24
    assert core_fans(k) == {"A": (32, 32 * 3), "B": (24 * 3, 24)}


@pytest.mark.parametrize("structure", [Structure.btt(rank=2), Structure.kronecker(), Structure.low_rank(rank=64),
                                       Structure.dense()], ids=lambda s: s.name)
def test_spectral_init_std(structure):
    torch.manual_seed(0)
    layer = EinsumLinear(1024, 1024, structure)
    for name, (fi, fo) in core_fans(layer.sizes).items():
        core = layer.cores()[name]
        expected = math.sqrt(min(fi, fo)) / fi
        assert core.std().item() == pytest.approx(expected, rel=0.05)
        assert abs(core.mean().item()) < 0.05 * expected + 3 * expected / math.sqrt(core.numel())
    assert spectral_std(64, 32) == pytest.approx(math.sqrt(32) / 64)


def test_lr_multipliers_adam_and_sgd():
    s = Structure.btt(rank=2).resolve(1024, 512)       # α32 γ32 | ε32 φ16 | ρ2
    fans = core_fans(s)
    adam = lr_multipliers(s, "adam")
    assert adam == {"A": (1024 / fans["A"][0]) / 2, "B": (1024 / fans["B"][0]) / 2}
    sgd = lr_multipliers(s, "sgd")
    assert sgd["A"] == pytest.approx((fans["A"][1] / fans["A"][0]) / (512 / 1024) / 2)
    assert sgd["B"] == pytest.approx((fans["B"][1] / fans["B"][0]) / (512 / 1024) / 2)
    assert lr_multipliers(Structure.dense().resolve(8, 8)) == {"weight": 1.0}


def test_param_groups_cover_every_parameter_once():
    model = nn.Sequential(EinsumLinear(256, 256, Structure.btt(rank=1)), nn.ReLU(), nn.Linear(256, 10),
                          EinsumLinear(10, 64, Structure.low_rank(rank=4)))
    groups = einfx.param_groups(model, lr=1e-3)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    assert lr_of["0.A"] == pytest.approx(1e-3 * (256 / 16) / 2)
    assert lr_of["0.B"] == pytest.approx(1e-3 * (256 / 16) / 2)
    assert lr_of["3.A"] == pytest.approx(1e-3 * (10 / 10) / 2)
    assert lr_of["3.B"] == pytest.approx(1e-3 * (10 / 4) / 2)
    for name in ("0.bias", "2.weight", "2.bias", "3.bias"):
        assert lr_of[name] == 1e-3
    opt = torch.optim.AdamW(groups)
    assert len(opt.param_groups) == len(groups)


def test_param_groups_unknown_optimizer():
    with pytest.raises(StructureError, match="unknown optimizer kind 'lion'; valid: adam, sgd"):
        einfx.param_groups(nn.Linear(2, 2), lr=0.1, optimizer="lion")
