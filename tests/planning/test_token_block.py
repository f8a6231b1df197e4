"""Token blocking: eager CPU plans may run in chunks of tokens so that intermediates stay in cache."""

from dataclasses import replace

import pytest
import torch

import einfx
from einfx.planning import execute
from einfx.planning.planner import MIN_TOKEN_BLOCK, plan_layer
from einfx.planning.profile import default_profile
from einfx.structures import functional as Fn


def test_large_layer_many_tokens_is_planned_in_blocks_and_predicted_faster():
    sizes = einfx.Structure.btt(rank=1).resolve(4096, 4096)
    plan = plan_layer(sizes, 512, "float32", default_profile("cpu"))
    assert plan.token_block >= MIN_TOKEN_BLOCK and 512 % plan.token_block == 0
    whole = plan_layer(sizes, plan.token_block, "float32", default_profile("cpu"))
    assert plan.flops == whole.flops // plan.token_block * 512 == 2 * 512 * sizes.macs_per_token("xab")
    assert plan.time < plan.naive_time and "in chunks of" in plan.layout
    # exported graphs (onnxruntime profile) keep whole-batch plans
    ort = plan_layer(sizes, 512, "float32", default_profile("cpu").with_backend("onnxruntime"))
    assert ort.token_block == 0


@pytest.mark.parametrize("tokens, block", [(100, 16), (64, 32), (37, 8)])
def test_blocked_execution_equals_reference_forward_and_backward(tokens, block):
    torch.manual_seed(0)
    layer = einfx.EinsumLinear(96, 80, einfx.Structure.btt(rank=2), bias=False)
    base = plan_layer(layer.sizes, block, "float32", default_profile("cpu"))
    plan = replace(base, token_block=block)
    x = torch.randn(tokens // 4 + 1, 4, 96, requires_grad=True) if tokens % 4 else torch.randn(tokens, 96,
                                                                                                 requires_grad=True)
    y = execute(plan, x, layer.cores())
    ref = Fn.reference(x.double(), layer.A.double(), layer.B.double(), layer.sizes)
    assert y.shape == ref.shape
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.A), g)
    ref_grads = torch.autograd.grad(Fn.contract(x, layer.A, layer.B, layer.sizes), (x, layer.A), g)
    for got, want in zip(grads, ref_grads):
        assert ((got - want).norm() / want.norm()).item() < 1e-5
