"""Plans compiled to straight-line code: same results as the step interpreter, clear errors, picklable plans."""

import dataclasses
import pickle

import pytest
import torch

import einfx
from einfx.errors import PlanError
from einfx.planning import all_plans, execute, plan_layer
from einfx.planning.codegen import compiled
from einfx.planning.plan import Plan, Step, apply_step
from einfx.planning.profile import default_profile


def _interpret(plan, x, cores):
    env = {"x": x, **cores}
    for st in plan.steps:
        env[st.out] = apply_step(st, [env[i] for i in st.inputs], env)
    return env[plan.output]


@pytest.mark.parametrize("structure", [einfx.Structure.btt(rank=2), einfx.Structure.kronecker(),
                                       einfx.Structure.low_rank(rank=8), einfx.Structure.tensor_train(rank=2)])
def test_every_candidate_compiles_to_the_interpreters_result(structure):
    torch.manual_seed(0)
    layer = einfx.EinsumLinear(72, 60, structure, bias=False)
    x = torch.randn(3, 8, 72)
    cores = {k: v.detach() for k, v in layer.cores().items()}
    plans = all_plans(layer.sizes, 24, "float32", default_profile("cpu", threads=1))
    for plan in plans:
        want = _interpret(plan, x, cores)
        got = execute(plan, x.clone().requires_grad_(), cores)  # autograd: fresh allocations
        assert got.requires_grad and torch.equal(got.detach(), want), plan.layout
        with torch.no_grad():
            assert torch.equal(execute(plan, x, cores), want), plan.layout  # scratch memory


def test_batched_matmuls_become_bmm_and_code_is_cached_per_scratch_set():
    sizes = einfx.Structure.btt(rank=1).resolve(1024, 1024)
    plan = plan_layer(sizes, 512, "float32", default_profile("cpu", threads=1))
    plain, again = compiled(plan), compiled(plan)
    assert plain is again
    names = plain.__code__.co_names
    assert "bmm" in names and "matmul" not in names
    assert compiled(plan, frozenset({"v6"})) is not plain


def test_step_reading_a_later_value_is_a_plan_error():
    steps = (Step("reshape", "v1", ("v2",), (-1, 4)), Step("reshape", "v2", ("x",), (-1, 4)))
    base = plan_layer(einfx.Structure.btt(rank=1).resolve(16, 16), 4)
    bad = dataclasses.replace(base, steps=steps, output="v2")
    with pytest.raises(PlanError, match=r"reads 'v2', which no earlier step wrote; available: \['x'\]"):
        execute(bad, torch.randn(4, 16), {})


def test_missing_core_names_the_core_and_the_given_ones():
    layer = einfx.EinsumLinear(16, 16, einfx.Structure.btt(rank=1))
    plan = plan_layer(layer.sizes, 4)
    with pytest.raises(PlanError, match=r"reads core 'B', which was not given; given: \['A'\]"):
        execute(plan, torch.randn(4, 16), {"A": layer.A.detach()})


def test_plans_pickle_without_their_compiled_code():
    layer = einfx.EinsumLinear(32, 32, einfx.Structure.btt(rank=2))
    plan = plan_layer(layer.sizes, 8)
    x = torch.randn(8, 32)
    with torch.no_grad():
        y = execute(plan, x, layer.cores())
    clone = pickle.loads(pickle.dumps(plan))
    assert isinstance(clone, Plan) and clone == plan
    assert "_einfx_compiled" not in clone.__dict__
    with torch.no_grad():
        assert torch.equal(execute(clone, x, layer.cores()), y)


def test_layer_memoizes_plans_per_token_count_threads_and_order():
    layer = einfx.EinsumLinear(64, 64, einfx.Structure.btt(rank=2)).eval()
    x = torch.randn(10, 64)
    with torch.no_grad():
        y = layer(x)
        layer(torch.randn(3, 64))
        assert len(layer.__dict__["_einfx_plans"]) == 2
        layer.set_order("xba")
        y_pinned = layer(x)
        assert len(layer.__dict__["_einfx_plans"]) == 3
        assert {p.order for p in layer.__dict__["_einfx_plans"].values()} >= {"xba"}
    assert torch.allclose(y, y_pinned, atol=1e-5, rtol=1e-5)
    assert "_einfx_plans" not in layer.state_dict()


def test_outputs_are_contiguous_and_bias_is_added_in_place_or_differentiably():
    torch.manual_seed(0)
    layer = einfx.EinsumLinear(256, 256, einfx.Structure.btt(rank=1))
    x = torch.randn(64, 256)
    # the φεN→Nφε output relayout merges into a 2-D transpose view: the compiled plan copies it
    plan = next(p for p in all_plans(layer.sizes, 64, "float32", default_profile("cpu", threads=1))
                if p.layout.endswith("| φ·ε·N; copy φεN→Nφε"))
    assert ".contiguous" not in str(plan.steps) and "contiguous" in compiled(plan).__code__.co_names
    want = x.double() @ layer.to_dense().double().T + layer.bias.double()
    with torch.no_grad():
        got = execute(plan, x, layer.cores(), layer.bias)
    assert got.is_contiguous() and ((got.double() - want).norm() / want.norm()).item() < 1e-6
    y = execute(plan, x, layer.cores(), layer.bias)
    y.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((256,), 64.0))


@pytest.mark.parametrize("d_in, d_out, structure", [(97, 101, einfx.Structure.btt(rank=2)),
                                                    (64, 48, einfx.Structure.low_rank(rank=4)),
                                                    (128, 128, einfx.Structure.kronecker())])
def test_every_plan_output_is_contiguous(d_in, d_out, structure):
    layer = einfx.EinsumLinear(d_in, d_out, structure)
    x = torch.randn(2, 8, d_in)
    with torch.no_grad():
        for plan in all_plans(layer.sizes, 16, "float32", default_profile("cpu", threads=1)):
            y = execute(plan, x, layer.cores(), layer.bias)
            assert y.shape == (2, 8, d_out) and y.is_contiguous(), plan.layout
