"""Top-k semantics (ties included), routing weights, the load-balancing loss against a hand computation."""

import math

import pytest
import torch

from einfx.errors import StructureError
from einfx.moe.routing import load_balancing_loss, route, scatter_weights, topk_lowest_index


def _brute_topk(row, k):
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


@pytest.mark.parametrize("experts,k", [(4, 1), (4, 2), (8, 3), (16, 16)])
def test_topk_matches_brute_force_with_many_ties(experts, k):
    g = torch.Generator().manual_seed(experts * 10 + k)
    # integer-valued logits in a small range: most rows contain ties
    logits = torch.randint(-2, 3, (200, experts), generator=g).float()
    values, indices = topk_lowest_index(logits, k)
    for row, idx, val in zip(logits.tolist(), indices.tolist(), values.tolist()):
        want = _brute_topk(row, k)
        assert idx == want
        assert val == [row[e] for e in want]


def test_all_equal_logits_select_the_lowest_indices():
    # a zero gate gives all-equal logits; torch.topk on CPU would not return 0..k-1 here
    for experts in (2, 4, 8, 64):
        _, idx = topk_lowest_index(torch.zeros(37, experts), 2)
        assert idx.tolist() == [[0, 1]] * 37


def test_partial_tie_example():
    _, idx = topk_lowest_index(torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]]), 3)
    assert idx.tolist() == [[1, 2, 4]]
    _, idx = topk_lowest_index(torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]]), 4)
    assert idx.tolist() == [[1, 2, 4, 0]]


def test_route_softmax_over_selected_only_and_scatter():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    r = route(logits, 2)
    assert r.indices.tolist() == [[1, 3], [0, 1]]
    e3, e2 = math.exp(3.0), math.exp(2.0)
    torch.testing.assert_close(r.weights[0], torch.tensor([e3 / (e3 + e2), e2 / (e3 + e2)]))
    torch.testing.assert_close(r.weights[1], torch.tensor([0.5, 0.5]))
    dense = r.dense_weights()
    torch.testing.assert_close(dense, torch.tensor([[0.0, e3 / (e3 + e2), 0.0, e2 / (e3 + e2)],
                                                    [0.5, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(scatter_weights(r.indices, r.weights, 4), dense)


def test_bad_k_is_rejected_with_the_valid_range():
    with pytest.raises(StructureError, match=r"1\.\.experts = 1\.\.4, got 5"):
        topk_lowest_index(torch.zeros(2, 4), 5)
    with pytest.raises(StructureError, match="got 0"):
        route(torch.zeros(2, 4), 0)


def test_load_balancing_loss_against_hand_computation():
    rows = [[1.0, 0.0, -1.0], [0.2, 0.3, 2.0], [-0.5, 1.5, 0.0], [0.0, 0.0, 0.0]]
    k = 2
    experts = 3
    # by hand, with math only
    probs = []
    for row in rows:
        z = sum(math.exp(v) for v in row)
        probs.append([math.exp(v) / z for v in row])
    p_sum = [sum(p[e] for p in probs) for e in range(experts)]
    p_bar = [v / sum(p_sum) for v in p_sum]
    counts = [0] * experts
    for row in rows:
        for e in _brute_topk(row, k):
            counts[e] += 1
    f_bar = [c / sum(counts) for c in counts]
    switch = experts * sum(p * f for p, f in zip(p_bar, f_bar))
    z_loss = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    expected = switch + 0.1 * z_loss

    logits = torch.tensor(rows, dtype=torch.float64)
    r = route(logits, k)
    got = load_balancing_loss(r.logits, r.indices)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_balanced_routing_gives_switch_term_one():
    # zero logits: p̄ uniform, so the switch term is E · Σ_e (1/E) f̄_e = 1 whatever f̄ is; the z-loss is log(E)²
    logits = torch.zeros(10, 4)
    r = route(logits, 2)
    assert load_balancing_loss(r.logits, r.indices).item() == pytest.approx(1 + 0.1 * math.log(4) ** 2)


def _imbalance(logits, k):
    r = route(logits, k)
    counts = r.dense_weights().gt(0).float().sum(0)
    f = counts / counts.sum()
    return (f - 1.0 / logits.shape[-1]).abs().sum().item()


def test_minimizing_the_aux_loss_lowers_routing_imbalance():
    torch.manual_seed(0)
    experts, k, d = 8, 2, 16
    x = torch.randn(512, d)
    gate = torch.randn(experts, d) * 0.1
    gate[0] += 1.0 * x.mean(0) / x.mean(0).norm()  # skew towards experts 0 and 1
    gate[1] += 0.8 * x.mean(0) / x.mean(0).norm()
    gate[:, 0] += torch.linspace(2.0, 0.0, experts)  # plus a feature that favours low indices
    x[:, 0] = x[:, 0].abs() + 1.0
    gate.requires_grad_(True)
    before = _imbalance(x @ gate.detach().t(), k)
    opt = torch.optim.Adam([gate], lr=0.05)
    for _ in range(150):
        logits = x @ gate.t()
        r = route(logits, k)
        loss = load_balancing_loss(r.logits, r.indices)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _imbalance(x @ gate.detach().t(), k)
    assert before > 1.0  # clearly imbalanced to start with (a total-variation distance of at most 2)
    assert after < 0.35 * before
