"""`einfx.passes.base.run_passes`: lint after each pass, name the failing pass, keep the original error."""

import pytest
import torch
from torch import fx, nn

from einfx.errors import PassError
from einfx.passes import PassResult, run_passes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def relu_to_gelu(gm: fx.GraphModule) -> PassResult:
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.relu:
            node.target = torch.nn.functional.gelu
            n += 1
    return PassResult(gm, n > 0, {"replaced": n})


def broken(gm: fx.GraphModule) -> PassResult:
    raise KeyError("boom")


def dangling(gm: fx.GraphModule) -> PassResult:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        gm.graph.call_function(torch.relu, (out.args[0],))  # used before it is defined: lint fails
    return PassResult(gm, True)


def test_passes_run_in_order_and_report_stats():
    gm = fx.symbolic_trace(Net())
    x = torch.randn(2, 4)
    result = run_passes(gm, [relu_to_gelu, relu_to_gelu])
    assert result.changed and result.stats == {"relu_to_gelu": {"replaced": 0}}
    assert torch.allclose(result.graph_module(x), torch.nn.functional.gelu(gm.fc(x)))


def test_failing_pass_is_named_and_the_cause_kept():
    with pytest.raises(PassError, match="pass 'broken' failed: KeyError: 'boom'") as info:
        run_passes(fx.symbolic_trace(Net()), [relu_to_gelu, broken])
    assert isinstance(info.value.__cause__, KeyError)


def test_invalid_graph_is_caught_by_lint():
    with pytest.raises(PassError, match="pass 'dangling' left an invalid graph") as info:
        run_passes(fx.symbolic_trace(Net()), [dangling])
    assert info.value.__cause__ is not None


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(PassError, match="pass '<lambda>' returned Net, expected a PassResult"):
        run_passes(fx.symbolic_trace(Net()), [lambda gm: gm])
