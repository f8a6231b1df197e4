"""`Structure`: a point (or a named family) in the θ space of two-core einsum layers, and its resolution
to integer sizes for a concrete (d_in, d_out). SPEC §1.

θ is written (α, β, γ, δ, ε, φ, ρ): θα+θβ+θγ = 1 on the input side, θδ+θε+θφ = 1 on the output side,
d_ρ = min(d_in, d_out)^θρ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from einfx.errors import ShapeError, StructureError
from einfx.structures.factorize import factor_side
from einfx.structures.sizes import Sizes

__all__ = ["Structure", "KINDS", "DEFAULT_TOLERANCE"]

KINDS = ("dense", "low_rank", "kronecker", "tensor_train", "btt", "monarch", "theta", "btt_moe")
DEFAULT_TOLERANCE = 0.15
_THETA_NAMES = ("α", "β", "γ", "δ", "ε", "φ", "ρ")
_EPS = 1e-9

# θ of the named families, rank excluded (ρ is set from the rank).
_NAMED_THETA = {
    "dense": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0),
    "low_rank": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0),
    "kronecker": (0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0),
    "tensor_train": (0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0),
    "btt": (0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0),
    "monarch": (0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0),
    "btt_moe": (0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0),
}


def _layer_prefix(layer: str | None) -> str:
    return f"layer {layer!r}: " if layer else ""


def validate_theta(theta) -> tuple[float, ...]:
    """Check a θ 7-tuple against SPEC §1 and return it as floats; raise `StructureError` otherwise."""
    try:
        values = tuple(float(t) for t in theta)
    except TypeError as exc:
        raise StructureError(f"θ must be 7 numbers (α, β, γ, δ, ε, φ, ρ), got {theta!r}") from exc
    if len(values) != 7:
        raise StructureError(f"θ must have 7 entries (α, β, γ, δ, ε, φ, ρ), got {len(values)}: {values}")
    for name, t in zip(_THETA_NAMES, values):
        if not (0.0 - _EPS <= t <= 1.0 + _EPS) or math.isnan(t):
            raise StructureError(f"θ{name} = {t} is outside [0, 1]; θ = {values}")
    a, b, g, d, e, f, r = values
    if abs(a + b + g - 1.0) > 1e-6:
        raise StructureError(f"θα + θβ + θγ must equal 1, got {a} + {b} + {g} = {a + b + g:.6g}; θ = {values}")
    if abs(d + e + f - 1.0) > 1e-6:
        raise StructureError(f"θδ + θε + θφ must equal 1, got {d} + {e} + {f} = {d + e + f:.6g}; θ = {values}")
    if min(a, e) < min(b, d) - _EPS:
        raise StructureError(
            f"redundant θ: min(θα, θε) = {min(a, e):.4g} < min(θβ, θδ) = {min(b, d):.4g}; swap the roles of "
            f"α/β or δ/ε (valid θ has min(θα, θε) >= min(θβ, θδ)); θ = {values}"
        )
    if r > min(a, e) + _EPS:
        raise StructureError(
            f"degenerate θ: θρ = {r:.4g} > min(θα, θε) = {min(a, e):.4g} (the rank cannot exceed what the "
            f"cores can carry; valid θρ <= min(θα, θε)); θ = {values}"
        )
    return values


@dataclass(frozen=True)
class Structure:
    """A structured-matrix family. Build with the named constructors, e.g. ``Structure.btt(rank=2)``.

    Attributes:
        kind: one of ``KINDS``.
        rank: explicit rank (d_ρ) for low_rank, tensor_train and btt.
        rank_frac: rank as a fraction of min(d_in, d_out), for low_rank.
        theta: the θ 7-tuple, for kind ``"theta"``.
        experts: number of experts E, for ``"btt_moe"`` (the BTT rank index ρ is the expert index).
        k: experts active per token, for ``"btt_moe"``.
        tolerance: the largest relative padding of either side before a size is refused.
        groups: (input, output) feature groups that the factorization keeps whole when it can (attention
            heads; `einfx.structures.factorize.factor_side`'s ``outer``), 1 for none. The rewriter sets it
            from the graph; it changes the sizes, never the family or the rank.
    """

    kind: str
    rank: int | None = None
    rank_frac: float | None = None
    theta: tuple[float, ...] | None = None
    experts: int | None = None
    k: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    groups: tuple[int, int] = (1, 1)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise StructureError(f"unknown structure {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise StructureError(f"{self.kind}: rank must be a positive integer, got {self.rank!r}")
        if self.rank_frac is not None and not (0.0 < float(self.rank_frac) <= 1.0):
            raise StructureError(f"{self.kind}: rank_frac must be in (0, 1], got {self.rank_frac!r}")
        groups = tuple(self.groups) if isinstance(self.groups, (tuple, list)) else ()
        if len(groups) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in groups):
            raise StructureError(f"groups must be two positive integers (input, output), got {self.groups!r}")
        object.__setattr__(self, "groups", groups)
        if not (0.0 <= float(self.tolerance) < 10.0):
            raise StructureError(f"tolerance must be in [0, 10), got {self.tolerance!r}")
        if self.kind == "theta":
            object.__setattr__(self, "theta", validate_theta(self.theta))
        if self.kind == "btt_moe":
            e, k = self.experts, self.k
            if not isinstance(e, int) or isinstance(e, bool) or e < 1:
                raise StructureError(f"btt_moe: experts must be an integer >= 1, got {e!r}")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= e:
                raise StructureError(f"btt_moe: k must be an integer in 1..experts = 1..{e}, got {k!r}")
            object.__setattr__(self, "rank", e)

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def dense(cls) -> "Structure":
        """The full matrix (reference)."""
        return cls("dense")

    @classmethod
    def low_rank(cls, rank: int | None = None, rank_frac: float | None = None, **kw) -> "Structure":
        """W = B·A with inner dimension ``rank`` (or ``rank_frac`` of min(d_in, d_out); default 1/4)."""
        if rank is not None and rank_frac is not None:
            raise StructureError(f"low_rank: give rank or rank_frac, not both (got rank={rank}, rank_frac={rank_frac})")
        if rank is None and rank_frac is None:
            rank_frac = 0.25
        return cls("low_rank", rank=rank, rank_frac=rank_frac, **kw)

    @classmethod
    def kronecker(cls, **kw) -> "Structure":
        """W = B ⊗ A with both factors about sqrt(d_out) x sqrt(d_in)."""
        return cls("kronecker", **kw)

    @classmethod
    def tensor_train(cls, rank: int = 2, **kw) -> "Structure":
        """A sum of ``rank`` Kronecker products."""
        return cls("tensor_train", rank=rank, **kw)

    @classmethod
    def btt(cls, rank: int = 1, **kw) -> "Structure":
        """Block Tensor-Train: sqrt(d) blocks on each side, block rank ``rank``."""
        return cls("btt", rank=rank, **kw)

    @classmethod
    def monarch(cls, **kw) -> "Structure":
        """BTT with rank 1."""
        return cls("monarch", rank=1, **kw)

    @classmethod
    def btt_moe(cls, experts: int = 8, k: int = 2, **kw) -> "Structure":
        """BTT-MoE (SPEC §5): ``experts`` rank-1 BTT experts, ``k`` of them active per token."""
        return cls("btt_moe", experts=experts, k=k, **kw)

    @classmethod
    def from_theta(cls, theta, **kw) -> "Structure":
        """Any valid point (α, β, γ, δ, ε, φ, ρ) of the θ space."""
        return cls("theta", theta=tuple(theta), **kw)

    # -- description --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.kind == "theta":
            return "theta(" + ",".join(f"{t:.3g}" for t in self.theta) + ")"
        if self.kind in ("low_rank",) and self.rank_frac is not None:
            return f"low_rank(rank_frac={self.rank_frac:g})"
        if self.kind in ("low_rank", "tensor_train", "btt"):
            return f"{self.kind}(rank={self.rank})"
        if self.kind == "btt_moe":
            return f"btt_moe(experts={self.experts}, k={self.k})"
        return self.kind

    def __str__(self) -> str:
        return self.name

    def grouped(self, groups: tuple[int, int]) -> "Structure":
        """This structure with feature ``groups`` (see the class), unless it already names its own or has no
        factored side to align (dense, low-rank, BTT-MoE)."""
        if self.groups != (1, 1) or tuple(groups) == (1, 1) or self.kind in ("dense", "low_rank", "btt_moe"):
            return self
        return replace(self, groups=tuple(groups))

    def theta_for(self, d_in: int, d_out: int) -> tuple[float, ...]:
        """θ of this structure at a layer size (the rank turned into θρ = log r / log min(d_in, d_out))."""
        if self.kind == "theta":
            return self.theta
        base = list(_NAMED_THETA[self.kind])
        if self.kind in ("low_rank", "tensor_train", "btt", "monarch", "btt_moe"):
            r = self._rank_value(d_in, d_out)
            base[6] = math.log(r) / math.log(min(d_in, d_out)) if min(d_in, d_out) > 1 else 0.0
        return tuple(base)

    def _rank_value(self, d_in: int, d_out: int) -> int:
        if self.rank is not None:
            return self.rank
        if self.rank_frac is not None:
            return max(1, round(self.rank_frac * min(d_in, d_out)))
        return 1

    # -- resolution ---------------------------------------------------------------------------------
    def resolve(self, d_in: int, d_out: int, layer: str | None = None) -> Sizes:
        """Integer sizes for a (d_in, d_out) layer; raise `ShapeError` naming ``layer`` when impossible."""
        where = _layer_prefix(layer)
        for label, v in (("d_in", d_in), ("d_out", d_out)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ShapeError(f"{where}{label} must be a positive integer, got {v!r}")
        if self.kind == "dense":
            return Sizes.for_dense(d_in, d_out)
        if self.kind == "low_rank":
            r = self._rank_value(d_in, d_out)
            if r > min(d_in, d_out):
                raise ShapeError(
                    f"{where}low_rank rank {r} exceeds min(d_in, d_out) = {min(d_in, d_out)} for a "
                    f"{d_in}->{d_out} layer; valid ranks: 1..{min(d_in, d_out)}"
                )
            return Sizes(d_in, d_out, alpha=d_in, epsilon=d_out, rho=r)
        theta = self.theta_for(d_in, d_out)
        ins = factor_side(d_in, theta[0:3], float(self.tolerance), self.groups[0])
        outs = factor_side(d_out, theta[3:6], float(self.tolerance), self.groups[1])
        for side, n, got, ths in (("input", d_in, ins, theta[0:3]), ("output", d_out, outs, theta[3:6])):
            if got is None:
                raise ShapeError(
                    f"{where}{self.name} cannot factor the {side} dimension {n} of a {d_in}->{d_out} layer into "
                    f"sizes near {tuple(round(n ** t, 2) for t in ths)} (θ {ths}) within the padding tolerance "
                    f"{self.tolerance:g} (at most {self.tolerance:.0%} zero padding); raise the structure's "
                    "tolerance, exclude this layer, or choose another structure for it"
                )
        (a, b, g), (d, e, f) = ins[0], outs[0]
        if self.kind == "theta":
            # θρ <= min(θα, θε) holds already; rounding to integer sizes may overshoot by a little,
            # so the rank is clamped to what the resolved cores can carry (documented behaviour).
            r = max(1, round(min(d_in, d_out) ** theta[6]))
            r = min(r, self.max_rank(Sizes(d_in, d_out, alpha=a, beta=b, gamma=g, delta=d, epsilon=e, phi=f)))
        else:
            r = self._rank_value(d_in, d_out) if self.kind != "kronecker" else 1
        sizes = Sizes(d_in, d_out, alpha=a, beta=b, gamma=g, delta=d, epsilon=e, phi=f, rho=r)
        limit = self.max_rank(sizes)
        if r > limit:
            raise ShapeError(
                f"{where}{self.name} rank {r} exceeds the largest useful rank {limit} of a {d_in}->{d_out} "
                f"layer with sizes {sizes.describe()}; valid ranks: 1..{limit}"
            )
        return sizes

    @staticmethod
    def max_rank(sizes: Sizes) -> int:
        """Largest d_ρ that is not redundant: ρ sits between A's (δ, α) and B's (ε, β) indices."""
        return max(1, min(sizes.alpha * sizes.delta, sizes.beta * sizes.epsilon))

    # -- (de)serialization for policies and reports -------------------------------------------------
    def to_dict(self) -> dict:
        out: dict = {"kind": self.kind}
        for key in ("rank", "rank_frac", "theta", "experts", "k"):
            value = getattr(self, key)
            if value is not None and not (self.kind in ("monarch", "btt_moe") and key == "rank"):
                out[key] = list(value) if key == "theta" else value
        if self.tolerance != DEFAULT_TOLERANCE:
            out["tolerance"] = self.tolerance
        if self.groups != (1, 1):
            out["groups"] = list(self.groups)
        return out

    @classmethod
    def from_dict(cls, spec) -> "Structure":
        """Build from ``"btt"``, ``"btt:rank=2"``, ``{"kind": "btt", "rank": 2}`` or a Structure."""
        if isinstance(spec, Structure):
            return spec
        if isinstance(spec, str):
            name, _, args = spec.partition(":")
            kw: dict = {}
            for item in filter(None, (p.strip() for p in args.split(","))):
                key, eq, value = item.partition("=")
                if not eq:
                    raise StructureError(f"structure {spec!r}: expected key=value after ':', got {item!r}")
                kw[key.strip()] = _parse_scalar(value.strip())
            spec = {"kind": name.strip(), **kw}
        if not isinstance(spec, Mapping):
            raise StructureError(f"a structure is a name, 'name:key=value', a dict or a Structure; got {spec!r}")
        spec = dict(spec)
        if "kind" in spec and "structure" in spec:
            raise StructureError(f"structure {spec!r}: give 'kind' or its synonym 'structure', not both")
        # {"structure": "btt", "rank": 1} reads as naturally as {"kind": "btt", "rank": 1}
        kind = spec.pop("kind", None) if "kind" in spec else spec.pop("structure", None)
        if kind is None:
            raise StructureError(f"structure {spec!r} names no kind: a mapping needs the key 'kind' (or "
                                 "'structure'), e.g. {'kind': 'btt', 'rank': 1}")
        builders = {
            "dense": cls.dense, "low_rank": cls.low_rank, "kronecker": cls.kronecker,
            "tensor_train": cls.tensor_train, "btt": cls.btt, "monarch": cls.monarch, "theta": cls.from_theta,
            "btt_moe": cls.btt_moe,
        }
        if kind not in builders:
            raise StructureError(f"unknown structure {kind!r}; valid: {', '.join(builders)}")
        try:
            return builders[kind](**spec)
        except TypeError as exc:
            raise StructureError(f"structure {kind!r}: bad arguments {spec}: {exc}") from exc


def _parse_scalar(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text
