"""The BTT-MoE path cost model: FLOPs grow with E on the masked path and with k on the sparse/grouped ones."""

import dataclasses

import pytest

from einfx.moe.cost import CPU_PROFILE, NOMINAL_TOKENS, PATHS, STATIC_PATHS, PathProfile, choose_path, path_costs
from einfx.structures.sizes import Sizes


def _sizes(experts):
    return Sizes(1024, 1024, alpha=32, gamma=32, epsilon=32, phi=32, rho=experts)


def test_sparse_flops_grow_with_k_and_masked_with_e():
    per_expert = 32 * 32 * 32 + 32 * 32 * 32  # x·A then ·B for one rank-1 expert
    for experts in (2, 8, 32):
        for k in (1, 2):
            c = path_costs(_sizes(experts), k, tokens=100)
            assert c["masked"].flops == 2 * 100 * experts * per_expert
            assert c["sparse"].flops == 2 * 100 * k * per_expert


def test_choice_follows_the_estimated_times():
    s = _sizes(16)
    for tokens in (1, 32, 4096):
        c = path_costs(s, 2, tokens)
        assert choose_path(s, 2, tokens) == min(PATHS, key=lambda p: c[p].seconds)
        assert choose_path(s, 2, tokens, static=True) == min(STATIC_PATHS, key=lambda p: c[p].seconds)
    assert choose_path(s, 2, None) == choose_path(s, 2, NOMINAL_TOKENS, static=True)


def test_choice_moves_with_the_device_profile_and_k():
    s = _sizes(32)
    fast_gather = PathProfile(gemm_flops=1e9, matvec_flops=1e12, bandwidth=1e15)
    slow_gather = PathProfile(gemm_flops=1e15, matvec_flops=1e6, bandwidth=1e9)
    assert choose_path(s, 2, 512, profile=fast_gather, static=True) == "sparse"
    assert choose_path(s, 2, 512, profile=slow_gather, static=True) == "masked"
    # with k = E the sparse and grouped paths do the same FLOPs and move more bytes: never chosen
    assert choose_path(s, 32, 512, profile=CPU_PROFILE) == "masked"
    assert choose_path(s, 32, 512, profile=dataclasses.replace(CPU_PROFILE, matvec_flops=CPU_PROFILE.gemm_flops)) \
        == "masked"


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_bytes_scale_with_the_element_size(dtype_bytes):
    c4 = path_costs(_sizes(8), 2, 64, dtype_bytes=4)
    c = path_costs(_sizes(8), 2, 64, dtype_bytes=dtype_bytes)
    for path in ("masked", "sparse"):
        assert c[path].bytes * 4 == c4[path].bytes * dtype_bytes



def test_sparse_wins_for_few_tokens_and_many_experts_and_loses_for_many_tokens():
    # the masked path reads and permutes all E experts' cores; the sparse path only k slices per token
    s = _sizes(32)
    assert choose_path(s, 2, 1) == "sparse"
    assert choose_path(s, 2, 4096, static=True) == "masked"
    assert choose_path(s, 2, 4096) == "grouped"  # eager: FLOPs grow with k and the work stays GEMM-shaped
    c1 = path_costs(s, 2, 1)
    core = 32 * 32 * 32 + 32 * 32 * 32  # one expert's slices of A and B
    assert c1["masked"].bytes > 3 * 4 * 32 * core  # all 32 experts' cores, float32, permuted and read
    assert c1["sparse"].bytes <= 4 * 4 * 2 * core + 4 * 4 * 2 * 32 * 32 + 4 * 2048  # 2 slices, intermediates, x, y
