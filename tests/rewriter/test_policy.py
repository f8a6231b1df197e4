import pytest

from einfx import Policy, Rule, Structure
from einfx.errors import PolicyError
from einfx.rewriter.policy import Budget

BTT, LR, KRON, TT = Structure.btt(rank=2), Structure.low_rank(rank=4), Structure.kronecker(), Structure.tensor_train()


def test_precedence_exclude_exact_pattern_type_default():
    policy = Policy(
        default=Structure.monarch(),
        rules=[Rule(structure=TT, module_type="Conv1D"), Rule("h.*.attn.*", LR), Rule("h.*", KRON),
               Rule("h.0.attn.c_attn", BTT)],
        exclude=["h.1.attn.c_attn"],
    )
    # exclude wins over an exact name rule and patterns
    assert policy.select("h.1.attn.c_attn", ("Conv1D",)).structure is None
    assert "exclude pattern 'h.1.attn.c_attn'" in policy.select("h.1.attn.c_attn").reason
    # an exact name wins over earlier patterns and module types
    sel = policy.select("h.0.attn.c_attn", ("Conv1D",))
    assert sel.structure == BTT and sel.reason.startswith("exact-name")
    # the first matching pattern wins (both "h.*.attn.*" and "h.*" match)
    sel = policy.select("h.0.attn.c_proj", ("Conv1D",))
    assert sel.structure == LR and "h.*.attn.*" in sel.reason
    # a pattern wins over a module type, a module type over the default
    assert policy.select("h.3.mlp", ("Conv1D",)).structure == KRON
    assert policy.select("lm_head", ("Conv1D",)).structure == TT
    sel = policy.select("lm_head", ("Linear",))
    assert sel.structure == Structure.monarch() and sel.reason == "policy default"


def test_regex_and_glob_match_the_full_name():
    policy = Policy(rules=[Rule(r"re:.*\.(q|v)_proj", LR), Rule("*.mlp.*", BTT)])
    assert policy.select("model.layers.0.self_attn.q_proj").structure == LR
    assert policy.select("model.layers.0.self_attn.k_proj").structure is None  # no default: kept
    assert policy.select("model.layers.0.self_attn.q_proj_extra").structure is None  # full match only
    assert policy.select("a.mlp.up").structure == BTT
    assert "no rule matches" in policy.select("a.b").reason


def test_module_type_matches_subclasses_by_mro_names():
    policy = Policy(rules=[Rule(structure=BTT, module_type="Linear")])
    assert policy.select("x.out_proj", ("NonDynamicallyQuantizableLinear", "Linear")).structure == BTT


def test_from_dict_rejects_unknown_keys_and_names():
    with pytest.raises(PolicyError, match=r"unknown policy keys \['rulez'\]; valid: default, rules, exclude"):
        Policy.from_dict({"rulez": []})
    with pytest.raises(PolicyError, match=r"rule #0: unknown keys \['structur'\]; valid: pattern, structure"):
        Policy.from_dict({"rules": [{"pattern": "a", "structur": "btt"}]})
    with pytest.raises(PolicyError, match="unknown structure 'bttt'; valid: dense, low_rank"):
        Policy(default="bttt")
    with pytest.raises(PolicyError, match="init 'svd' is unknown; valid: project, random"):
        Policy(init="svd")
    with pytest.raises(PolicyError, match="budget metric 'time' is unknown; valid: flops, params"):
        Policy(budget={"fraction": 0.5, "metric": "time"})
    with pytest.raises(PolicyError, match="invalid regular expression"):
        Rule("re:(", BTT)
    with pytest.raises(PolicyError, match="needs a 'pattern' or a 'module_type'"):
        Rule(structure=BTT)
    with pytest.raises(PolicyError, match="min_features must be an integer >= 0"):
        Policy(min_features=-1)


def test_budget_forms():
    assert Policy(budget=0.3).budget == Budget(0.3, "flops")
    assert Policy(budget={"params": 0.5}).budget == Budget(0.5, "params")
    with pytest.raises(PolicyError, match=r"must be in \(0, 1\]"):
        Budget(1.5)


YAML = """
default: btt:rank=2
rules:
  - pattern: "*.attn.*"
    structure: {kind: low_rank, rank_frac: 0.25}
  - module_type: Conv1D
    structure: monarch
exclude: [lm_head]
min_features: 128
init: random
budget: {flops: 0.4}
"""

TOML = """
default = "btt:rank=2"
exclude = ["lm_head"]
min_features = 128
init = "random"
budget = {flops = 0.4}

[[rules]]
pattern = "*.attn.*"
structure = {kind = "low_rank", rank_frac = 0.25}

[[rules]]
module_type = "Conv1D"
structure = "monarch"
"""


def test_from_file_yaml_and_toml_give_the_same_policy(tmp_path):
    (tmp_path / "p.yaml").write_text(YAML)
    (tmp_path / "p.toml").write_text(TOML)
    a, b = Policy.from_file(tmp_path / "p.yaml"), Policy.from_file(tmp_path / "p.toml")
    assert a == b
    assert a == Policy(default=Structure.btt(rank=2),
                       rules=[Rule("*.attn.*", Structure.low_rank(rank_frac=0.25)),
                              Rule(structure=Structure.monarch(), module_type="Conv1D")],
                       exclude=["lm_head"], min_features=128, init="random", budget=0.4)
    assert Policy.from_dict(a.to_dict()) == a


def test_from_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: btt\nbogus: 1\n")
    with pytest.raises(PolicyError, match=r"bad.yaml.*unknown policy keys \['bogus'\]"):
        Policy.from_file(bad)
    (tmp_path / "p.ini").write_text("default = btt")
    with pytest.raises(PolicyError, match=r"unknown extension '.ini'; valid: .yaml, .yml, .toml, .json"):
        Policy.from_file(tmp_path / "p.ini")
    with pytest.raises(PolicyError, match="cannot read policy file .*missing.yaml"):
        Policy.from_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.toml"
    broken.write_text("default = [")
    with pytest.raises(PolicyError, match="broken.toml' is not valid TOML"):
        Policy.from_file(broken)
