import io
import random

import pytest
import torch
from torch import nn

from einfx import EinsumLinear, Structure
from einfx.errors import ShapeError, StructureError, WeightError
from einfx.structures import functional as Fn

NAMED = [
    Structure.dense(), Structure.low_rank(rank=3), Structure.low_rank(rank_frac=0.5), Structure.kronecker(),
    Structure.tensor_train(rank=2), Structure.btt(rank=1), Structure.btt(rank=3), Structure.monarch(),
]
SHAPES = [(64, 64), (48, 96), (96, 40), (97, 61), (100, 10)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_layer(layer, x):
    """Forward (float32) equals the float64 7-index einsum on the same cores and x @ W.T + b."""
    y = layer(x)
    cores = {k: v.detach().double() for k, v in layer.cores().items()}
    xd, bias = x.double(), layer.bias.detach().double()
    if layer.sizes.dense:
        ref = xd @ cores["weight"].T + bias
    else:
        ref = Fn.reference(xd, cores["A"], cores["B"], layer.sizes) + bias
    assert _rel(y.double(), ref) < 1e-5
    dense = xd @ layer.to_dense().double().T + bias
    assert _rel(y.double(), dense) < 1e-5
    assert y.shape == (*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("structure", NAMED, ids=lambda s: s.name)
@pytest.mark.parametrize("d_in, d_out", SHAPES)
def test_named_forward_matches_reference_and_dense(structure, d_in, d_out):
    torch.manual_seed(0)
    layer = EinsumLinear(d_in, d_out, structure)
    with torch.no_grad():
        layer.bias.normal_()
    _check_layer(layer, torch.randn(3, 5, d_in))


def _random_theta(r: random.Random):
    while True:
        a, b, g = (r.random() for _ in range(3))
        d, e, f = (r.random() for _ in range(3))
        zero_in, zero_out = r.sample(range(3), r.randint(0, 2)), r.sample(range(3), r.randint(0, 2))
        ins, outs = [a, b, g], [d, e, f]
        for i in zero_in:
            ins[i] = 0.0
        for i in zero_out:
            outs[i] = 0.0
        if sum(ins) == 0 or sum(outs) == 0:
            continue
        ins = [v / sum(ins) for v in ins]
        outs = [v / sum(outs) for v in outs]
        rho = r.random() * min(ins[0], outs[1])
        theta = (*ins, *outs, rho)
        try:
            return Structure.from_theta(theta)
        except StructureError:
            continue


def test_random_theta_forward_matches_reference():
    r = random.Random(7)
    checked = padded = rectangular = 0
    while checked < 200:
        s = _random_theta(r)
        d_in, d_out = r.randint(6, 90), r.randint(6, 90)
        try:
            layer = EinsumLinear(d_in, d_out, s)
        except ShapeError:
            continue
        with torch.no_grad():
            layer.bias.normal_()
        for order in ("xab", "xba") if checked % 4 else ("xab", "xba", "fold"):
            layer.set_order(order)
            _check_layer(layer, torch.randn(2, 3, d_in))
        checked += 1
        padded += layer.sizes.in_padded != d_in or layer.sizes.out_padded != d_out
        rectangular += d_in != d_out
    assert padded >= 20 and rectangular >= 150


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("structure", [Structure.btt(rank=2), Structure.kronecker(), Structure.low_rank(rank=8)],
                         ids=lambda s: s.name)
def test_half_precision_forward(structure, dtype):
    torch.manual_seed(1)
    layer = EinsumLinear(96, 64, structure)
    x = torch.randn(4, 96)
    ref = layer(x)
    half = EinsumLinear(96, 64, structure, dtype=dtype)
    half.load_state_dict(layer.state_dict())
    y = half(x.to(dtype))
    assert y.dtype == dtype
    assert _rel(y.float(), ref) < 2e-2


@pytest.mark.parametrize("structure", NAMED + [Structure.from_theta((0.4, 0.3, 0.3, 0.3, 0.4, 0.3, 0.2))],
                         ids=lambda s: s.name)
def test_gradcheck_float64(structure):
    torch.manual_seed(2)
    layer = EinsumLinear(12, 12, structure, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(inp, *ps):
        return torch.func.functional_call(layer, {n: p for (n, _), p in zip(layer.named_parameters(), ps)}, (inp,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_state_dict_round_trip_through_torch_save():
    torch.manual_seed(3)
    layer = EinsumLinear(64, 48, Structure.btt(rank=2))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = EinsumLinear(64, 48, Structure.btt(rank=2))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"A", "B", "bias"}


def test_cost_is_exact():
    layer = EinsumLinear(1024, 1024, Structure.btt(rank=2))
    # A: (φ=32, ρ=2, γ=32, α=32), B: (φ=32, ε=32, ρ=2, γ=32); bias 1024
    assert layer.cost(1).params == 32 * 2 * 32 * 32 * 2 + 1024
    assert sum(p.numel() for p in layer.parameters()) == layer.cost().params
    # x·A: 32·2·32·32 per token; ·B: 32·32·2·32 per token
    assert layer.cost(tokens=10).flops == 2 * 10 * (65536 + 65536)
    layer.set_order("fold")
    assert layer.cost(tokens=10).flops == 2 * 32 * 2 * 32 * 32 * 32 + 2 * 10 * 1024 * 1024
    dense = EinsumLinear(30, 20, Structure.dense(), bias=False)
    assert dense.cost(7) == type(dense.cost(7))(params=600, flops=2 * 7 * 600)


def test_from_linear_random_keeps_device_dtype_bias():
    lin = nn.Linear(64, 32).to(torch.float64)
    layer = EinsumLinear.from_linear(lin, Structure.btt(rank=2), init="random", name="fc")
    assert layer.A.dtype == torch.float64 and layer.A.device == lin.weight.device
    assert torch.equal(layer.bias, lin.bias)
    assert layer.projection_error is None
    nobias = EinsumLinear.from_linear(nn.Linear(64, 32, bias=False), Structure.kronecker(), init="random")
    assert nobias.bias is None


def test_zero_init_last_core():
    layer = EinsumLinear(64, 64, Structure.btt(rank=1), zero_init_last=True)
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) > 0
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), layer.bias.expand(3, 64))


@pytest.mark.parametrize("bad, what", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weight_is_refused(bad, what):
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight[3, 4] = bad
        lin.weight[5, 5] = bad
    with pytest.raises(WeightError) as err:
        EinsumLinear.from_linear(lin, Structure.btt(), name="blocks.3.mlp")
    msg = str(err.value)
    assert "'blocks.3.mlp'" in msg and "2 non-finite" in msg and what in msg


def test_non_2d_weight_is_refused():
    with pytest.raises(WeightError, match=r"'conv': weight must be 2-D \(d_out, d_in\), got shape \(4, 3, 3, 3\)"):
        EinsumLinear.from_weight(torch.randn(4, 3, 3, 3), None, Structure.btt(), name="conv")


def test_bad_init_and_input_width():
    with pytest.raises(ValueError, match="unknown init 'svd'; valid: project, random"):
        EinsumLinear.from_linear(nn.Linear(16, 16), Structure.btt(), init="svd")
    layer = EinsumLinear(16, 16, Structure.btt(), name="fc1")
    with pytest.raises(ShapeError, match="fc1: input has 15 features .* expected d_in = 16"):
        layer(torch.randn(2, 15))
