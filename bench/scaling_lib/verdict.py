"""Per-structure summaries of a task's runs and the verdicts on the paper's claims.

    runs -> summarize: per variant, the frontier, the power-law fit and the compute multiplier vs dense
    summaries -> verdicts: one row per claim, decided by the measured multipliers

A compute multiplier m of a structure is C_dense(L*) / C_structure(L*) at the lowest loss L* both
frontiers reached (read off the frontiers, no extrapolation); when the frontiers share no loss, the fits
are extrapolated instead and the row says so. m > 1: the structure reaches L* with fewer FLOPs than dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaling_lib.fit import Frontier, PowerLaw, compute_multiplier, fit_power_law, frontier

__all__ = ["Summary", "Verdict", "summarize", "verdicts", "MATCH_TOLERANCE", "REFERENCE"]

REFERENCE = "dense"
# "Match" dense: a multiplier of at least 1 / (1 + 10%).
MATCH_TOLERANCE = 0.10


@dataclass(frozen=True)
class Summary:
    """What one structure's runs show.

    Attributes:
        variant: the structure's name.
        frontier: its compute-optimal frontier.
        fit: the power law fitted on the frontier (None with fewer than 3 frontier points or no decrease).
        multiplier: compute multiplier vs dense (None for dense itself or when it cannot be measured).
        at_loss: the loss L* at which the multiplier was read.
        source: "frontier" (interpolated data), "fit" (extrapolated power laws) or "" (none).
    """

    variant: str
    frontier: Frontier
    fit: PowerLaw | None
    multiplier: float | None
    at_loss: float | None
    source: str

    def to_dict(self) -> dict:
        fit = None if self.fit is None else {"a": self.fit.a, "b": self.fit.b, "c": self.fit.c,
                                             "rmse_log": self.fit.rmse_log, "points": self.fit.points}
        return {"variant": self.variant, "frontier": {"flops": list(self.frontier.compute), "loss": list(self.frontier.loss)},
                "fit": fit, "multiplier_vs_dense": self.multiplier, "at_loss": self.at_loss, "source": self.source}


@dataclass(frozen=True)
class Verdict:
    """One claim, its measured evidence and the outcome ("holds", "does not hold", "partly", "inconclusive")."""

    claim: str
    evidence: str
    outcome: str


def _fit(f: Frontier) -> PowerLaw | None:
    if len(f.compute) < 3:
        return None
    try:
        return fit_power_law(f.compute, f.loss)
    except ValueError:
        return None


def summarize(points: dict[str, list[tuple[float, float]]]) -> dict[str, Summary]:
    """{variant: Summary} from {variant: [(training FLOPs, held-out loss), ...]} (must include dense)."""
    fronts = {v: frontier([c for c, _ in pts], [l for _, l in pts]) for v, pts in points.items() if pts}
    fits = {v: _fit(f) for v, f in fronts.items()}
    ref, ref_fit = fronts.get(REFERENCE), fits.get(REFERENCE)
    out = {}
    for v, f in fronts.items():
        mult, loss, source = None, None, ""
        if ref is not None and v != REFERENCE:
            m = compute_multiplier(ref, f)
            if m is not None:
                mult, loss, source = m.value, m.loss, "frontier"
            elif ref_fit is not None and fits[v] is not None:
                # no shared loss: extrapolate both fits to the lowest loss either reached
                loss = max(min(ref.loss), min(f.loss))
                c_ref, c = ref_fit.compute_for(loss), fits[v].compute_for(loss)
                if c_ref is not None and c is not None:
                    mult, source = c_ref / c, "fit"
        out[v] = Summary(v, f, fits[v], mult, loss, source)
    return out


def _m(summaries: dict[str, Summary], v: str) -> str:
    s = summaries.get(v)
    if s is None or s.multiplier is None:
        return f"{v}: n/a"
    note = " (extrapolated fit)" if s.source == "fit" else ""
    return f"{v}: {s.multiplier:.2f}×{note}"


def _outcome(checks: list[bool | None]) -> str:
    known = [c for c in checks if c is not None]
    if not known or len(known) < len(checks):
        return "inconclusive" if not known else ("partly" if any(known) else "does not hold") + " (some n/a)"
    return "holds" if all(known) else ("does not hold" if not any(known) else "partly")


def verdicts(summaries: dict[str, Summary]) -> list[Verdict]:
    """The four claims of the paper, each decided from the multipliers vs dense (see the module docstring)."""

    def mult(v: str) -> float | None:
        s = summaries.get(v)
        return None if s is None else s.multiplier

    def below(v: str, bound: float) -> bool | None:
        m = mult(v)
        return None if m is None else m < bound

    def at_least(v: str, bound: float) -> bool | None:
        m = mult(v)
        return None if m is None else m >= bound

    def above(v: str, bound: float) -> bool | None:
        m = mult(v)
        return None if m is None else m > bound

    rows = []
    rows.append(Verdict("Parameter sharing (ω > 0: Kronecker, Tensor-Train) scales worse than dense",
                        ", ".join(_m(summaries, v) for v in ("kronecker", "tensor_train")) + " (< 1 means worse)",
                        _outcome([below("kronecker", 1.0), below("tensor_train", 1.0)])))
    rows.append(Verdict("Low rank (ψ < 1) scales worse than full rank (dense)",
                        _m(summaries, "low_rank") + " (< 1 means worse)", _outcome([below("low_rank", 1.0)])))
    match = 1.0 / (1.0 + MATCH_TOLERANCE)
    rows.append(Verdict("Full-rank BTT and Monarch (ω = 0, ψ = 1) match or beat dense per FLOP",
                        ", ".join(_m(summaries, v) for v in ("btt", "monarch")) + f" (≥ {match:.2f} means match)",
                        _outcome([at_least("btt", match), at_least("monarch", match)])))
    m_bm, m_moe = mult("btt_moe"), mult("moe")
    beats_moe = None if m_bm is None or m_moe is None else m_bm > m_moe
    rows.append(Verdict("BTT-MoE beats dense and standard MoE per FLOP",
                        ", ".join(_m(summaries, v) for v in ("btt_moe", "moe")) + " (BTT-MoE must be > 1 and > MoE)",
                        _outcome([above("btt_moe", 1.0), beats_moe])))
    return rows
