import math

import pytest

from einfx import Structure
from einfx.errors import ShapeError, StructureError
from einfx.structures.structure import KINDS


@pytest.mark.parametrize(
    "structure, d_in, d_out, expected",
    [
        (Structure.btt(rank=1), 1024, 1024, dict(alpha=32, gamma=32, epsilon=32, phi=32, rho=1)),
        (Structure.btt(rank=4), 768, 3072, dict(alpha=32, gamma=24, epsilon=64, phi=48, rho=4)),
        (Structure.kronecker(), 1024, 1024, dict(alpha=32, beta=32, delta=32, epsilon=32)),
        (Structure.tensor_train(rank=3), 768, 768, dict(alpha=32, beta=24, delta=32, epsilon=24, rho=3)),
        (Structure.low_rank(rank=16), 768, 3072, dict(alpha=768, epsilon=3072, rho=16)),
        (Structure.low_rank(rank_frac=0.25), 1024, 512, dict(alpha=1024, epsilon=512, rho=128)),
        (Structure.monarch(), 4096, 4096, dict(alpha=64, gamma=64, epsilon=64, phi=64, rho=1)),
    ],
)
def test_named_structures_resolve_to_exact_sizes(structure, d_in, d_out, expected):
    sizes = structure.resolve(d_in, d_out)
    got = {k: v for k, v in sizes.as_dict().items() if v != 1}
    assert got == {k: v for k, v in expected.items() if v != 1}
    assert sizes.in_padded == d_in and sizes.out_padded == d_out


@pytest.mark.parametrize("d_in, d_out", [(768, 3072), (3072, 768), (1000, 10), (50257, 768), (97, 61), (1009, 1009)])
@pytest.mark.parametrize("structure", [Structure.btt(), Structure.kronecker(), Structure.tensor_train(2)])
def test_awkward_sizes_pad_within_tolerance(structure, d_in, d_out):
    sizes = structure.resolve(d_in, d_out)
    pad_in, pad_out = sizes.padding
    assert 0 <= pad_in <= structure.tolerance and 0 <= pad_out <= structure.tolerance
    assert sizes.in_padded >= d_in and sizes.out_padded >= d_out
    # the two factors of each side stay near sqrt(d): within a factor d**0.3 of it
    for n, (p, q) in ((d_in, (sizes.alpha, sizes.gamma * sizes.beta)), (d_out, (sizes.epsilon, sizes.phi * sizes.delta))):
        assert abs(math.log(p) - math.log(q)) <= 0.6 * math.log(n) + 1e-9


def test_exact_factorization_preferred_over_padding():
    # 3072 = 64 x 48 exactly; a padded 58 x 53 would sit closer to sqrt(3072) but wastes work
    sizes = Structure.btt().resolve(3072, 3072)
    assert (sizes.alpha, sizes.gamma) == (64, 48) and sizes.in_padded == 3072


def test_prime_dimension_is_padded_not_degenerate():
    sizes = Structure.btt().resolve(1009, 1009)
    assert sizes.alpha > 1 and sizes.gamma > 1
    assert 1009 < sizes.in_padded <= 1009 * 1.15


def test_padding_over_tolerance_is_refused_with_values():
    with pytest.raises(ShapeError) as err:
        Structure.btt().resolve(5, 5, layer="blocks.0.fc")
    msg = str(err.value)
    assert "'blocks.0.fc'" in msg and "5" in msg and "tolerance 0.15" in msg


def test_rank_above_maximum_is_refused():
    with pytest.raises(ShapeError, match=r"rank 40 exceeds the largest useful rank 32 .*valid ranks: 1..32"):
        Structure.btt(rank=40).resolve(1024, 1024)
    with pytest.raises(ShapeError, match=r"valid ranks: 1..10"):
        Structure.low_rank(rank=11).resolve(10, 20)


def test_unknown_structure_lists_valid_names():
    with pytest.raises(StructureError) as err:
        Structure.from_dict("butterfly")
    assert "butterfly" in str(err.value)
    for kind in ("dense", "low_rank", "kronecker", "tensor_train", "btt", "monarch"):
        assert kind in str(err.value)
    with pytest.raises(StructureError, match="valid: " + ", ".join(KINDS)):
        Structure("butterfly")


@pytest.mark.parametrize(
    "theta, pattern",
    [
        ((0.5, 0.2, 0.2, 0, 1, 0, 0), r"θα \+ θβ \+ θγ must equal 1, got .* = 0.9"),
        ((1, 0, 0, 0.5, 0.6, 0, 0), r"θδ \+ θε \+ θφ must equal 1"),
        ((0.2, 0.8, 0, 0.5, 0.5, 0, 0), r"redundant θ: min\(θα, θε\) = 0.2 < min\(θβ, θδ\) = 0.5"),
        ((0.5, 0, 0.5, 0, 0.5, 0.5, 0.7), r"degenerate θ: θρ = 0.7 > min\(θα, θε\) = 0.5"),
        ((1.2, -0.2, 0, 0, 1, 0, 0), r"θα = 1.2 is outside \[0, 1\]"),
        ((0.5, 0.5), r"θ must have 7 entries"),
    ],
)
def test_invalid_theta_is_rejected_with_reason(theta, pattern):
    with pytest.raises(StructureError, match=pattern):
        Structure.from_theta(theta)


def test_bad_arguments():
    with pytest.raises(StructureError, match="rank must be a positive integer, got 0"):
        Structure.btt(rank=0)
    with pytest.raises(StructureError, match="give rank or rank_frac, not both"):
        Structure.low_rank(rank=2, rank_frac=0.5)
    with pytest.raises(StructureError, match=r"k must be an integer in 1..experts = 1..4, got 5"):
        Structure.btt_moe(experts=4, k=5)
    with pytest.raises(StructureError, match="experts must be an integer >= 1, got 0"):
        Structure.btt_moe(experts=0, k=1)
    with pytest.raises(ShapeError, match="d_in must be a positive integer, got 0"):
        Structure.btt().resolve(0, 4)


@pytest.mark.parametrize(
    "spec",
    [Structure.btt(rank=3), Structure.low_rank(rank_frac=0.5), Structure.from_theta((0.5, 0, 0.5, 0, 0.5, 0.5, 0.25)),
     Structure.monarch(), Structure.btt_moe(experts=4, k=1), Structure.kronecker(tolerance=0.05)],
)
def test_dict_round_trip(spec):
    assert Structure.from_dict(spec.to_dict()) == spec


def test_string_spec():
    assert Structure.from_dict("btt:rank=2") == Structure.btt(rank=2)
    assert Structure.from_dict("low_rank:rank_frac=0.5") == Structure.low_rank(rank_frac=0.5)
    with pytest.raises(StructureError, match="expected key=value"):
        Structure.from_dict("btt:2")


def test_an_outer_group_count_sets_the_outermost_size_when_it_divides_within_reach():
    from einfx.structures.factorize import factor_side

    btt_out = (0.0, 0.5, 0.5)  # θ (δ, ε, φ) of BTT's output side; φ is the outermost index
    assert factor_side(384, btt_out, 0.15)[:2] == ((1, 24, 16), 384)
    assert factor_side(384, btt_out, 0.15, 12)[0] == (1, 32, 12)  # 12 heads of 32
    assert factor_side(768, btt_out, 0.15, 12)[0] == (1, 64, 12)
    assert factor_side(384, btt_out, 0.15, 5)[0] == (1, 24, 16)     # does not divide: ignored
    assert factor_side(384, btt_out, 0.15, 192)[0] == (1, 24, 16)   # 192 x 2 is another structure: ignored
    assert factor_side(384, (1.0, 0.0, 0.0), 0.15, 12)[0] == (384, 1, 1)  # one active slot: nothing to align


def test_groups_change_the_sizes_only_and_survive_a_round_trip():
    plain, grouped = Structure.btt(rank=2), Structure.btt(rank=2).grouped((12, 12))
    assert grouped.groups == (12, 12) and grouped.name == plain.name
    assert plain.resolve(384, 384).describe() == "α24 γ16 | ε24 φ16 | ρ2"
    assert grouped.resolve(384, 384).describe() == "α32 γ12 | ε32 φ12 | ρ2"
    assert Structure.from_dict(grouped.to_dict()) == grouped and "groups" not in plain.to_dict()
    assert Structure.low_rank().grouped((12, 12)) == Structure.low_rank()  # no factored side
    assert grouped.grouped((4, 4)) is grouped  # groups already named are kept
    with pytest.raises(StructureError, match=r"groups must be two positive integers \(input, output\), got \(0, 12\)"):
        Structure.btt(groups=(0, 12))
