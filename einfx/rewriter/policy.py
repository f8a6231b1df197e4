"""`Policy` and `Rule`: which linear layers to structure, and how.

The policy language follows HF PEFT: names are matched in full, by exact name, shell glob (``*``, ``?``,
``[...]``) or regular expression (prefix ``re:``). Precedence, highest first (documented and tested, in the
spirit of torch.ao's QConfigMapping):

1. ``exclude``: a layer whose name matches any exclude pattern is never touched;
2. a rule whose pattern is the layer's exact name;
3. the first rule (in order) whose glob or regex pattern matches the name;
4. the first rule whose ``module_type`` matches the class of the module that owns the weight;
5. ``default`` (``None``: layers no rule selects are left dense).

``min_features`` rejects layers with ``min(d_in, d_out)`` below it; ``budget`` asks the planner
(`einfx.rewriter.budget`) to choose per-layer ranks so that the matched layers together cost a fraction of
their dense FLOPs or parameters.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from einfx.errors import EinfxError, PolicyError
from einfx.structures.structure import Structure

__all__ = ["Policy", "Rule", "Budget", "Selection", "INITS", "BUDGET_METRICS", "FALLBACKS", "format_unmatched"]

INITS = ("project", "random")
FIT_OBJECTIVES = ("output", "layer")
BUDGET_METRICS = ("flops", "params")
FALLBACKS = ("none", "module")
_POLICY_KEYS = ("default", "rules", "exclude", "min_features", "init", "budget", "fallback", "fold_to_dense",
                "candidates", "fit_objective")
_RULE_KEYS = ("pattern", "structure", "module_type")
_GLOB_CHARS = set("*?[")


def _structure(value: Any, where: str) -> Structure:
    try:
        return Structure.from_dict(value)
    except EinfxError as exc:
        raise PolicyError(f"{where}: {exc}") from exc


def _candidates(value: Any) -> tuple:
    """The search candidates as given (names, mappings or Structures), each checked to be a structure."""
    if isinstance(value, (str, Mapping, Structure)):
        value = (value,)
    try:
        items = tuple(value or ())
    except TypeError:
        raise PolicyError(f"policy candidates must be a list of structures, got {value!r}") from None
    for i, item in enumerate(items):
        s = _structure(item, f"candidate #{i}")
        if s.kind in ("dense", "btt_moe"):
            raise PolicyError(f"candidate #{i} {s.name!r}: dense is always a search candidate and btt_moe is not "
                              "fitted to pretrained weights; valid: low_rank, btt, monarch, tensor_train, kronecker, "
                              "theta")
    return items


def _is_exact(pattern: str) -> bool:
    return not pattern.startswith("re:") and not (_GLOB_CHARS & set(pattern))


def _compile(pattern: str, where: str) -> re.Pattern:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise PolicyError(f"{where}: invalid regular expression {pattern[3:]!r}: {exc}") from exc
    return re.compile(fnmatch.translate(pattern))


def _matches(pattern: str, name: str) -> bool:
    return _compile(pattern, "pattern").fullmatch(name) is not None


@dataclass(frozen=True)
class Rule:
    """Give layers a structure by name (exact, glob or ``re:`` regex, full match) or by module class name.

    Args:
        pattern: layer name pattern; ``None`` for a rule by ``module_type`` only.
        structure: a `Structure` or anything `Structure.from_dict` accepts ("btt:rank=2", a dict).
        module_type: class name of the module that owns the weight ("Linear", "Conv1D", ...); a class
            also matches its subclasses.
    """

    pattern: str | None = None
    structure: Any = None
    module_type: str | None = None

    def __post_init__(self):
        if self.pattern is None and self.module_type is None:
            raise PolicyError("a rule needs a 'pattern' or a 'module_type' (or both)")
        if self.pattern is not None:
            if not isinstance(self.pattern, str) or not self.pattern:
                raise PolicyError(f"rule pattern must be a non-empty string, got {self.pattern!r}")
            _compile(self.pattern, f"rule {self.pattern!r}")
        if self.module_type is not None and not isinstance(self.module_type, str):
            object.__setattr__(self, "module_type", getattr(self.module_type, "__name__", str(self.module_type)))
        if self.structure is None:
            raise PolicyError(f"rule {self.pattern or self.module_type!r} has no structure")
        object.__setattr__(self, "structure", _structure(self.structure, f"rule {self.pattern or self.module_type!r}"))

    @property
    def exact(self) -> bool:
        return self.pattern is not None and _is_exact(self.pattern)

    def matches_name(self, name: str) -> bool:
        return self.pattern is not None and _matches(self.pattern, name)

    def matches_type(self, type_names: Sequence[str]) -> bool:
        return self.module_type is not None and self.module_type in type_names

    def describe(self) -> str:
        parts = [f"pattern {self.pattern!r}"] if self.pattern is not None else []
        if self.module_type is not None:
            parts.append(f"module_type {self.module_type!r}")
        return "rule " + " and ".join(parts)

    def to_dict(self) -> dict:
        out: dict = {"structure": self.structure.to_dict()}
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.module_type is not None:
            out["module_type"] = self.module_type
        return out


@dataclass(frozen=True)
class Budget:
    """Total cost of the matched layers as a ``fraction`` of their dense cost in ``metric``."""

    fraction: float
    metric: str = "flops"

    def __post_init__(self):
        if self.metric not in BUDGET_METRICS:
            raise PolicyError(f"budget metric {self.metric!r} is unknown; valid: {', '.join(BUDGET_METRICS)}")
        try:
            value = float(self.fraction)
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"budget fraction must be a number in (0, 1], got {self.fraction!r}") from exc
        if not 0.0 < value <= 1.0:
            raise PolicyError(f"budget fraction must be in (0, 1], got {value}")
        object.__setattr__(self, "fraction", value)

    @classmethod
    def from_value(cls, value: Any) -> "Budget | None":
        """Accept a Budget, ``None``, a number (FLOPs fraction), ``{"flops": f}``, ``{"params": f}`` or
        ``{"fraction": f, "metric": m}``."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(float(value))
        if isinstance(value, Mapping):
            keys = set(value)
            if keys <= {"fraction", "metric"} and "fraction" in keys:
                return cls(value["fraction"], value.get("metric", "flops"))
            if len(keys) == 1 and keys <= set(BUDGET_METRICS):
                (metric, fraction), = value.items()
                return cls(fraction, metric)
        raise PolicyError(
            f"budget {value!r} is not understood; valid forms: 0.3, {{'flops': 0.3}}, {{'params': 0.3}}, "
            "{'fraction': 0.3, 'metric': 'flops'|'params'}"
        )

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "metric": self.metric}


@dataclass(frozen=True)
class Selection:
    """What the policy says about one layer: a structure (or ``None``) and the reason in words."""

    structure: Structure | None
    reason: str


@dataclass(frozen=True)
class Policy:
    """Which layers to structure and how; see the module docstring for the precedence.

    Args:
        default: structure for layers no rule selects (``None``: leave them dense).
        rules: `Rule` objects, or dicts with keys pattern / structure / module_type.
        exclude: name patterns that are never touched (exact, glob or ``re:``); exclusion always wins.
        min_features: layers with min(d_in, d_out) below this are left dense.
        init: ``"project"`` (fit the cores to the pretrained weight) or ``"random"`` (μP init).
        budget: a `Budget`, a FLOPs fraction, or a dict (see `Budget.from_value`).
        fallback: ``"module"`` allows replacing modules in place when no tracer captures the model;
            ``"none"`` raises `TraceError` instead.
        fold_to_dense: for inference (ONNX export), a structured layer whose best plan the cost model predicts
            slower than dense becomes an exact dense layer; ``False`` forbids that.
        candidates: what the search (a ``budget`` with ``data=`` and ``init="project"``) may choose per layer
            besides keeping it dense: family names ("btt", or a mapping without a rank) are tried at several
            ranks, a `Structure` or a spec with a rank exactly as given; empty: low_rank, btt, monarch,
            tensor_train and kronecker. The structure a layer's rule or ``default`` gives is the search's
            starting point and one more candidate, not a restriction.
        fit_objective: with ``data=`` and ``init="project"``, what each layer's fit and the search's errors
            minimize: ``"output"`` (default), the layer's output error as the model's main output sees it
            (weighed by E[JᵀJ], `einfx.rewriter.sensitivity`; one backward pass per calibration batch; a layer
            writing into a residual sum is fitted to the original's sum, `einfx.rewriter.residual`), or
            ``"layer"``, the layer's own output error.
    """

    default: Any = None
    rules: Sequence[Any] = ()
    exclude: Sequence[str] = ()
    min_features: int = 0
    init: str = "project"
    budget: Any = None
    fallback: str = "none"
    fold_to_dense: bool = True
    candidates: Sequence[Any] = ()
    fit_objective: str = "output"

    def __post_init__(self):
        if self.default is not None:
            object.__setattr__(self, "default", _structure(self.default, "policy default"))
        if isinstance(self.rules, (str, Mapping, Rule)):
            raise PolicyError(f"policy rules must be a list of rules, got {self.rules!r}")
        rules = []
        for i, rule in enumerate(self.rules):
            if isinstance(rule, Mapping):
                unknown = sorted(set(rule) - set(_RULE_KEYS))
                if unknown:
                    raise PolicyError(f"rule #{i}: unknown keys {unknown}; valid: {', '.join(_RULE_KEYS)}")
                rule = Rule(**rule)
            if not isinstance(rule, Rule):
                raise PolicyError(f"rule #{i} must be an einfx.Rule or a dict, got {rule!r}")
            rules.append(rule)
        object.__setattr__(self, "rules", tuple(rules))
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        for pattern in exclude:
            if not isinstance(pattern, str) or not pattern:
                raise PolicyError(f"exclude entries must be non-empty strings, got {pattern!r}")
            _compile(pattern, f"exclude {pattern!r}")
        object.__setattr__(self, "exclude", exclude)
        if not isinstance(self.min_features, int) or isinstance(self.min_features, bool) or self.min_features < 0:
            raise PolicyError(f"min_features must be an integer >= 0, got {self.min_features!r}")
        if self.init not in INITS:
            raise PolicyError(f"init {self.init!r} is unknown; valid: {', '.join(INITS)}")
        if self.fit_objective not in FIT_OBJECTIVES:
            raise PolicyError(f"fit_objective {self.fit_objective!r} is unknown; valid: {', '.join(FIT_OBJECTIVES)}")
        if self.fallback not in FALLBACKS:
            raise PolicyError(f"fallback {self.fallback!r} is unknown; valid: {', '.join(FALLBACKS)}")
        if not isinstance(self.fold_to_dense, bool):
            raise PolicyError(f"fold_to_dense must be true or false, got {self.fold_to_dense!r}")
        object.__setattr__(self, "budget", Budget.from_value(self.budget))
        object.__setattr__(self, "candidates", _candidates(self.candidates))

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping) -> "Policy":
        """Build from a mapping with the keys of the constructor; unknown keys raise `PolicyError`."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy is a mapping of {', '.join(_POLICY_KEYS)}; got {type(data).__name__}")
        unknown = sorted(set(data) - set(_POLICY_KEYS))
        if unknown:
            raise PolicyError(f"unknown policy keys {unknown}; valid: {', '.join(_POLICY_KEYS)}")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Policy":
        """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) policy file."""
        path = os.fspath(path)
        suffix = os.path.splitext(path)[1].lower()
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path!r}: {exc}") from exc
        try:
            if suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(raw.decode("utf-8")) or {}
            elif suffix == ".toml":
                import tomllib

                data = tomllib.loads(raw.decode("utf-8"))
            elif suffix == ".json":
                data = json.loads(raw.decode("utf-8"))
            else:
                raise PolicyError(f"policy file {path!r}: unknown extension {suffix!r}; "
                                  "valid: .yaml, .yml, .toml, .json")
        except PolicyError:
            raise
        except Exception as exc:  # parser errors differ per format; report them uniformly
            raise PolicyError(f"policy file {path!r} is not valid {suffix[1:].upper()}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except PolicyError as exc:
            raise PolicyError(f"policy file {path!r}: {exc}") from exc

    def to_dict(self) -> dict:
        return {
            "default": self.default.to_dict() if self.default is not None else None,
            "rules": [r.to_dict() for r in self.rules],
            "exclude": list(self.exclude),
            "min_features": self.min_features,
            "init": self.init,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "fallback": self.fallback,
            "fold_to_dense": self.fold_to_dense,
            "candidates": [c.to_dict() if isinstance(c, Structure) else c for c in self.candidates],
            "fit_objective": self.fit_objective,
        }

    # -- feedback -------------------------------------------------------------------------------------
    def unmatched(self, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Each rule pattern and exclude pattern that matches none of ``names`` -> up to 3 closest names.

        A rule by ``module_type`` only is not checked (a type rule shared across model families is normal).
        """
        import difflib

        names = list(names)
        out: dict[str, tuple[str, ...]] = {}
        patterns = [(f"rule {r.pattern!r}", r.pattern) for r in self.rules if r.pattern is not None]
        patterns += [(f"exclude {p!r}", p) for p in self.exclude]
        for label, pattern in patterns:
            if not any(_matches(pattern, n) for n in names):
                plain = pattern[3:] if pattern.startswith("re:") else pattern
                out[label] = tuple(difflib.get_close_matches(plain, names, n=3, cutoff=0.3))
        return out

    # -- resolution -----------------------------------------------------------------------------------
    def select(self, name: str, type_names: Sequence[str] = ()) -> Selection:
        """Apply the precedence to one layer name and the class names (MRO) of its owning module."""
        for pattern in self.exclude:
            if _matches(pattern, name):
                return Selection(None, f"excluded by policy (exclude pattern {pattern!r})")
        for rule in self.rules:
            if rule.exact and rule.pattern == name and (rule.module_type is None or rule.matches_type(type_names)):
                return Selection(rule.structure, f"exact-name {rule.describe()}")
        for rule in self.rules:
            if not rule.exact and rule.matches_name(name) and (
                    rule.module_type is None or rule.matches_type(type_names)):
                return Selection(rule.structure, f"first matching {rule.describe()}")
        for rule in self.rules:
            if rule.pattern is None and rule.matches_type(type_names):
                return Selection(rule.structure, f"{rule.describe()}")
        if self.default is not None:
            return Selection(self.default, "policy default")
        return Selection(None, "excluded by policy (no rule matches and the policy has no default)")


def format_unmatched(unmatched: Mapping[str, Sequence[str]]) -> str:
    """One line per unmatched pattern, with the closest layer names."""
    lines = []
    for what, close in unmatched.items():
        hint = f"; closest layer names: {', '.join(map(repr, close))}" if close else ""
        lines.append(f"policy {what} matches no layer of the model{hint}")
    return "\n".join(lines)
