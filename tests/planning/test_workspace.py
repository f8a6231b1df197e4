"""Scratch memory: eager CPU inference keeps a plan's intermediates in per-thread buffers, never its output."""

import threading

import pytest
import torch

import einfx
from einfx.planning import execute, plan_layer, workspace
from einfx.planning.plan import _scratch_values, uses_scratch
from einfx.planning.profile import default_profile
from einfx.structures import functional as Fn


@pytest.fixture(autouse=True)
def _fresh_buffers():
    workspace.release()
    yield
    workspace.release()


def _layer(d_in=96, d_out=80, rank=2, bias=True):
    torch.manual_seed(0)
    return einfx.EinsumLinear(d_in, d_out, einfx.Structure.btt(rank=rank), bias=bias)


def _buffers():
    return dict(getattr(workspace._local, "buffers", {}))


def test_scratch_run_is_bitwise_the_allocating_run_and_matches_the_reference():
    layer = _layer()
    x = torch.randn(64, 96)
    plan = plan_layer(layer.sizes, 64, "float32", default_profile("cpu"))
    assert _scratch_values(plan), "a BTT plan has intermediates that can live in scratch memory"
    with torch.enable_grad():
        allocating = execute(plan, x, layer.cores())  # cores require grad: no scratch
    assert not _buffers()
    with torch.no_grad():
        first = execute(plan, x, layer.cores())  # sizes the buffer
        second = execute(plan, x, layer.cores())  # runs inside it
    assert _buffers(), "the scratch buffer was kept for the next run"
    assert torch.equal(first, allocating.detach()) and torch.equal(second, allocating.detach())
    ref = Fn.reference(x.double(), layer.A.double(), layer.B.double(), layer.sizes)
    assert ((second.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_output_is_fresh_and_not_overwritten_by_the_next_run():
    layer = _layer()
    plan = plan_layer(layer.sizes, 32, "float32", default_profile("cpu"))
    x1, x2 = torch.randn(32, 96), torch.randn(32, 96)
    with torch.no_grad():
        execute(plan, x1, layer.cores())
        y1 = execute(plan, x1, layer.cores())
        kept = y1.clone()
        y2 = execute(plan, x2, layer.cores())
    buf = next(iter(_buffers().values()))
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    for y in (y1, y2):
        assert not lo <= y.data_ptr() < hi, "the plan output must not live in scratch memory"
    assert torch.equal(y1, kept)
    assert not torch.equal(y1, y2)


def test_layer_forward_adds_bias_in_place_only_without_autograd():
    layer = _layer()
    x = torch.randn(4, 16, 96)
    y_grad = layer(x)
    assert y_grad.requires_grad and y_grad.grad_fn is not None
    with torch.no_grad():
        layer(x)
        y = layer(x)
    assert torch.equal(y, y_grad.detach())
    with torch.inference_mode():
        y_inf = layer(x)
    assert torch.equal(y_inf, y_grad.detach())
    # buffers made in inference mode are kept apart: a later no_grad run may write its own
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("case, expected", [
    ("no_grad", True), ("grad_input", False), ("grad_cores", False), ("grad_disabled_cores", True),
])
def test_uses_scratch_only_when_no_graph_is_recorded(case, expected):
    layer = _layer()
    x = torch.randn(8, 96, requires_grad=case == "grad_input")
    cores = layer.cores()
    if case == "grad_disabled_cores":
        cores = {k: v.detach() for k, v in cores.items()}
    if case == "no_grad":
        with torch.no_grad():
            assert uses_scratch(x, cores) is expected
    else:
        assert uses_scratch(x, cores) is expected


def test_tensor_subclasses_and_non_cpu_tensors_allocate_normally():
    layer = _layer()

    class Tagged(torch.Tensor):
        pass

    with torch.no_grad():
        assert not uses_scratch(torch.randn(8, 96).as_subclass(Tagged), layer.cores())
        assert not uses_scratch(torch.randn(8, 96, device="meta"), layer.cores())


def test_runs_larger_than_max_bytes_keep_no_buffer(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_BYTES", 1024)
    layer = _layer()
    plan = plan_layer(layer.sizes, 64, "float32", default_profile("cpu"))
    x = torch.randn(64, 96)
    with torch.no_grad():
        y = execute(plan, x, layer.cores())
        y_again = execute(plan, x, layer.cores())
    assert not _buffers()
    assert torch.equal(y, y_again)


def test_threads_have_their_own_buffers_and_correct_results():
    layer = _layer(rank=1)
    plan = plan_layer(layer.sizes, 128, "float32", default_profile("cpu"))
    inputs = [torch.randn(128, 96) for _ in range(4)]
    with torch.no_grad():
        expected = [Fn.contract(x, layer.A, layer.B, layer.sizes) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    results[i] = execute(plan, inputs[i], layer.cores())
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, want in enumerate(expected):
        assert ((results[i] - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("d", [256, 4096])
def test_one_token_output_owns_its_memory(d):
    # with one token the output permute moves a size-1 dimension: the view of scratch memory is contiguous
    layer = _layer(d, d, rank=1)
    x1, x2 = torch.randn(1, d), torch.randn(1, d)
    with torch.no_grad():
        layer(x1)
        y1 = layer(x1)
        kept = y1.clone()
        layer(x2)
    assert torch.equal(y1, kept)
    for buf in _buffers().values():
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
        assert not lo <= y1.data_ptr() < hi
