import io

import pytest
import torch
from torch import fx, nn

import einfx
from einfx import EinsumLinear, Policy, Structure
from einfx.errors import PolicyError, TraceError

from _models import FormsMLP, MHANet, TinyTransformer, gpt2, ids


def _rel(a, b):
    return float((a - b).detach().norm() / a.detach().norm())


def _call_modules(gm):
    """Names of the structured layers that the model calls (graph nodes, or the module tree)."""
    mods = dict(gm.named_modules())
    if not isinstance(gm, fx.GraphModule):
        return {name for name, m in mods.items() if isinstance(m, EinsumLinear)}
    return {n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], EinsumLinear)}


def test_dense_policy_is_exact_and_keeps_names():
    torch.manual_seed(0)
    model, x = FormsMLP(), torch.randn(5, 64)
    gm = einfx.optimize(model, Policy(default=Structure.dense()), (x,), verify=True)
    assert isinstance(gm, fx.GraphModule)
    assert _rel(model(x), gm(x)) < 1e-5
    assert gm.einfx_report.verify_error < 1e-5
    assert _call_modules(gm) == {"fc1", "w2", "w3", "w4"}  # the tied head stays as it was
    assert isinstance(gm.get_submodule("head"), nn.Linear)
    # the input model is untouched
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.w2, nn.Parameter)


def test_btt_at_full_rank_is_exact_on_gpt2_and_keeps_the_output_structure():
    model, x = gpt2(), ids()
    gm = einfx.optimize(model, Policy(default=Structure.btt(rank=8)), (x,), verify=True)
    ref, out = model(x), gm(x)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    assert _rel(ref.logits, out.logits) < 1e-5
    assert gm.einfx_report.verify_error < 1e-5
    names = _call_modules(gm)
    assert "transformer.h.0.attn.c_attn" in names and len(names) == 8
    layer = gm.get_submodule("transformer.h.1.mlp.c_proj")
    assert layer.structure == Structure.btt(rank=8) and (layer.in_features, layer.out_features) == (256, 64)
    rows = {r.name: r for r in gm.einfx_report.rows}
    assert rows["lm_head"].decision == "kept" and rows["lm_head"].reason.startswith("tied or shared weight")


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_decomposition_is_exact(batch_first):
    torch.manual_seed(0)
    model = MHANet(batch_first=batch_first).eval()
    x = torch.randn(2, 5, 64) if batch_first else torch.randn(5, 2, 64)
    gm = einfx.optimize(model, Policy(default=Structure.btt(rank=8)), (x,))
    assert _call_modules(gm) == {"attn.in_proj", "attn.out_proj", "fc"}
    assert (gm.get_submodule("attn.in_proj").in_features, gm.get_submodule("attn.in_proj").out_features) == (64, 192)
    assert _rel(model(x), gm(x)) < 1e-5
    # only the out projection selected: the fused input projection stays dense inside the decomposition
    gm = einfx.optimize(model, Policy(rules=[einfx.Rule("*.out_proj", Structure.dense())]), (x,))
    assert _call_modules(gm) == {"attn.out_proj"}
    assert _rel(model(x), gm(x)) < 1e-5


def test_training_gradients_reach_the_cores():
    torch.manual_seed(0)
    model, x = TinyTransformer(), ids(vocab=50)
    gm = einfx.optimize(model, Policy(default=Structure.btt(rank=2), init="random"), (x,))
    gm.train()
    loss = gm(x).logsumexp(-1).mean()
    loss.backward()
    layers = [m for m in gm.modules() if isinstance(m, EinsumLinear)]
    assert len(layers) == 13
    for layer in layers:
        for core in layer.cores().values():
            assert core.grad is not None and core.grad.abs().sum() > 0
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    before = layers[0].A.detach().clone()
    opt.step()
    assert not torch.equal(before, layers[0].A)


def test_state_dict_round_trip_through_torch_save(tmp_path):
    torch.manual_seed(0)
    model, x = TinyTransformer(), ids(vocab=50)
    policy = Policy(default=Structure.btt(rank=2))
    gm = einfx.optimize(model, policy, (x,))
    torch.save(gm.state_dict(), tmp_path / "sd.pt")
    fresh = einfx.optimize(model, Policy(default=Structure.btt(rank=2), init="random"), (x,))
    assert _rel(gm(x), fresh(x)) > 1e-3
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(gm(x), fresh(x))


def test_state_dict_round_trip_gpt2_export_graph():
    model, x = gpt2(), ids()
    gm = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), (x,))
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh = einfx.optimize(model, Policy(default=Structure.btt(rank=2), init="random"), (x,))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(gm(x).logits, fresh(x).logits)


@pytest.mark.slow  # about a minute on 2 cores, most of it compiling
def test_runs_under_torch_compile():
    torch.manual_seed(0)
    model, x = TinyTransformer(), ids(vocab=50)
    gm = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), (x,))
    compiled = torch.compile(gm, backend="aot_eager")
    out = compiled(x)
    assert _rel(gm(x), out) < 1e-5
    out.sum().backward()
    assert gm.get_submodule("blocks.0.attn.q").A.grad is not None


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: no tracer can capture it
            return self.fc(x)
        return -self.fc(x)


def test_without_example_inputs_an_untraceable_model_says_what_to_pass():
    with pytest.raises(TraceError) as info:
        einfx.optimize(Branchy(), Policy(default=Structure.dense()))
    err = info.value
    assert set(err.reasons) == {"fx"}
    assert "TraceError: symbolically traced variables cannot be used as inputs to control flow" in err.reasons["fx"]
    text = str(err)
    assert text.startswith("could not trace Branchy without example inputs: torch.fx failed")
    assert text.endswith("or set the policy's fallback='module' to replace its nn.Linear/Conv1D modules by name.")


def test_data_dependent_control_flow_is_recorded_and_keeps_the_class():
    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(2, 64)
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=8)), (x,), verify=True)
    assert type(out) is Branchy and isinstance(out.fc, EinsumLinear)
    assert out.einfx_report.frontend == "record" and out.einfx_report.verify_error < 1e-5
    assert _rel(model(-x), out(-x)) < 1e-5  # the other branch too


def test_model_that_raises_on_its_example_inputs():
    with pytest.raises(TraceError, match=r"Branchy raised on the example inputs.*RuntimeError: mat1 and mat2"):
        einfx.optimize(Branchy(), Policy(default=Structure.dense()), (torch.randn(2, 63),))


def test_module_fallback_replaces_modules_in_place():
    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(2, 64)
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=8), fallback="module"))
    assert not isinstance(out, fx.GraphModule) and isinstance(out.fc, EinsumLinear)
    rep = out.einfx_report
    assert rep.frontend == "module" and set(rep.trace_failures) == {"fx"}
    assert _rel(model(x), out(x)) < 1e-5


def test_policy_as_dict_or_file_and_verify_needs_inputs(tmp_path):
    model, x = FormsMLP(), torch.randn(2, 64)
    (tmp_path / "p.yaml").write_text("default: dense\nexclude: [w2]\n")
    for policy in ({"default": "dense", "exclude": ["w2"]}, str(tmp_path / "p.yaml")):
        assert _call_modules(einfx.optimize(model, policy, (x,))) == {"fc1", "w3", "w4"}
    with pytest.raises(PolicyError, match="verify=True needs example_inputs"):
        einfx.optimize(model, Policy(default=Structure.dense()), verify=True)


def test_budget_end_to_end_is_met_and_reported():
    torch.manual_seed(0)
    model, x = TinyTransformer(), ids(vocab=50)
    policy = Policy(default=Structure.low_rank(), exclude=["out"], budget={"flops": 0.4})
    gm = einfx.optimize(model, policy, (x,))
    rep = gm.einfx_report
    assert rep.budget["metric"] == "flops" and rep.budget["target"] == 0.4
    done = rep.structured
    achieved = sum(r.flops_after for r in done) / sum(r.flops_before for r in done)
    assert achieved == pytest.approx(rep.budget["achieved"]) and 0.98 * 0.4 <= achieved <= 0.4
    ranks = {m.structure.rank for m in gm.modules() if isinstance(m, EinsumLinear)}
    assert len(ranks) > 1  # the planner chose per-layer ranks
    assert "budget: flops target 0.4 of dense, achieved" in str(rep)


class MHAWeights(nn.Module):
    def __init__(self, average: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4)
        self.average = average

    def forward(self, x):
        return self.attn(x, x, x, average_attn_weights=self.average)


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_are_returned_like_multihead_attention(average):
    torch.manual_seed(0)
    model, x = MHAWeights(average).eval(), torch.randn(5, 2, 64)
    gm = einfx.optimize(model, Policy(default=Structure.dense()), (x,))
    (y0, w0), (y1, w1) = model(x), gm(x)
    assert w0.shape == w1.shape and _rel(w0, w1) < 1e-5 and _rel(y0, y1) < 1e-5
