"""Parity helpers: the relative error, the other sizes tried, and the generated inputs."""

import math

import pytest
import torch

from einfx.errors import ExportError
from einfx.export.verify import alternate_sizes, input_variants, rel_error


def test_rel_error_is_max_abs_diff_over_max_reference_magnitude():
    want = [torch.tensor([1.0, -4.0]), torch.tensor([[2.0]])]
    got = [torch.tensor([1.5, -4.0]), torch.tensor([[1.0]])]
    assert rel_error(got, want) == pytest.approx(1.0 / 4.0)
    assert rel_error(want, want) == 0.0
    assert rel_error([torch.tensor([math.nan])], [torch.tensor([1.0])]) == math.inf


def test_rel_error_refuses_mismatched_outputs():
    with pytest.raises(ExportError, match=r"returned 1 output\(s\), torch returned 2"):
        rel_error([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ExportError, match=r"output 0: ONNX shape \(3,\) differs from torch shape \(2,\)"):
        rel_error([torch.zeros(3)], [torch.zeros(2)])


@pytest.mark.parametrize("size, is_batch, expected", [
    (2, True, (1, 4)), (1, True, (2, 3)), (16, False, (8, 15)), (2, False, (1, 3)), (1, False, (2, 2)),
])
def test_alternate_sizes(size, is_batch, expected):
    assert alternate_sizes(size, is_batch) == expected


def test_input_variants_share_sizes_by_name_and_follow_the_example():
    ids = torch.randint(5, 9, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.bool)
    feats = torch.randn(2, 16, 8) * 3 + 10
    axes = {0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}, 2: {0: "batch", 1: "seq"}}
    variants = input_variants((ids, mask, feats), axes)
    assert [tuple(v[0].shape) for v in variants] == [(1, 8), (4, 15)]
    for v_ids, v_mask, v_feats in variants:
        assert v_mask.shape == v_ids.shape == v_feats.shape[:2] and bool(v_mask.all())
        assert v_ids.dtype == torch.int64 and 5 <= int(v_ids.min()) and int(v_ids.max()) <= 8
        assert abs(v_feats.mean().item() - 10) < 1.5 and v_feats.shape[2] == 8
    assert input_variants((ids,), {}) == []
