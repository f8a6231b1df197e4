import math

import pytest

from einfx import Structure, taxonomy
from einfx.structures.taxonomy import theta_taxonomy

D = 1024


@pytest.mark.parametrize(
    "structure, expected",
    [
        (Structure.dense(), (0.0, 1.0, 1.0)),
        (Structure.low_rank(rank=32), (0.0, 0.5, 0.5)),         # rank d^0.5
        (Structure.low_rank(rank=4), (0.0, 0.2, 0.2)),          # rank d^0.2
        (Structure.kronecker(), (0.5, 1.0, 0.5)),
        (Structure.monarch(), (0.0, 1.0, 0.5)),
        (Structure.btt(rank=1), (0.0, 1.0, 0.5)),
        (Structure.btt(rank=4), (0.0, 1.0, 0.7)),               # BTT rank d^t: ν = ½ + t
        (Structure.btt(rank=32), (0.0, 1.0, 1.0)),
        (Structure.tensor_train(rank=2), (0.5, 1.0, 0.6)),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_spec_taxonomy_table(structure, expected):
    t = taxonomy(structure, D, D)
    assert (t.omega, t.psi, t.nu) == pytest.approx(expected, abs=1e-12)


def test_exact_values_from_sizes():
    # Monarch at d = 4096: 64 blocks of 64x64 on each side. params = MACs = 2·64^3 per token.
    t = taxonomy(Structure.monarch(), 4096, 4096)
    assert t.omega_exact == pytest.approx(0.0, abs=1e-12)
    assert t.psi_exact == pytest.approx(1.0)
    assert t.nu_exact == pytest.approx(math.log(2 * 64**3) / math.log(4096) - 1)
    # Kronecker at 1024: params 2·32², MACs 2·32³ → ω = log(32)/log(1024) = ½ exactly
    k = taxonomy(Structure.kronecker(), 1024, 1024)
    assert k.omega_exact == pytest.approx(0.5)
    # low rank r: rank bound r
    lr = taxonomy(Structure.low_rank(rank=16), 1024, 1024)
    assert lr.psi_exact == pytest.approx(math.log(16) / math.log(1024))


def test_theta_formulas_match_spec_definitions():
    theta = (0.4, 0.3, 0.3, 0.2, 0.5, 0.3, 0.1)
    a, b, g, d, e, f, r = theta
    assert theta_taxonomy(theta) == pytest.approx((min(a + d, b + e) - min(a, e), min(1, 2 + r - a - e), 1 + r - min(a, e)))


def test_rectangular_uses_geometric_mean_dimension():
    t = taxonomy(Structure.dense(), 768, 3072)
    assert (t.omega_exact, t.psi_exact, t.nu_exact) == pytest.approx(
        (0.0, math.log(768) / math.log(math.sqrt(768 * 3072)), 1.0))
