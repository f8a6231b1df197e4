"""Token blocking: eager CPU plans may run in chunks of tokens so that intermediates stay in cache."""

from dataclasses import replace

import pytest
import torch

import einfx
from einfx.planning import all_plans, execute
from einfx.planning.planner import BLOCK_GAIN, MIN_TOKEN_BLOCK, plan_layer
from einfx.planning.profile import default_profile
from einfx.structures import functional as Fn


def test_slow_memory_plans_large_layer_in_blocks_and_predicts_it_faster():
    sizes = einfx.Structure.btt(rank=1).resolve(4096, 4096)
    slow_dram = replace(default_profile("cpu"), memory_bandwidth=3e9)  # DRAM far slower than the cache
    plan = plan_layer(sizes, 512, "float32", slow_dram)
    assert plan.token_block >= MIN_TOKEN_BLOCK and 512 % plan.token_block == 0
    whole = plan_layer(sizes, plan.token_block, "float32", slow_dram)
    assert plan.flops == whole.flops // plan.token_block * 512 == 2 * 512 * sizes.macs_per_token("xab")
    whole_batch = min(p.time for p in all_plans(sizes, 512, "float32", slow_dram))
    assert plan.time < BLOCK_GAIN * whole_batch
    assert plan.time < plan.naive_time and "in chunks of" in plan.layout
    # exported graphs (onnxruntime profile) keep whole-batch plans
    ort = plan_layer(sizes, 512, "float32", slow_dram.with_backend("onnxruntime"))
    assert ort.token_block == 0


def test_default_cpu_profile_keeps_whole_batch_when_blocking_gains_little():
    # measured with scratch memory (bench/lowering.py): chunks of a d = 4096 BTT ran no faster than the batch
    sizes = einfx.Structure.btt(rank=1).resolve(4096, 4096)
    assert plan_layer(sizes, 512, "float32", default_profile("cpu")).token_block == 0


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
