"""The explain report: one `Row` per candidate layer, as a readable table and as JSON.

Costs are per layer, bias excluded (biases do not change): parameters of the weight cores, and FLOPs per
token (2 × multiply-adds in the cheaper token order). Optional columns (for example a planner's predicted
times) go into ``Row.extra`` and are rendered when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

__all__ = ["Row", "Report", "NOT_MEASURED"]

NOT_MEASURED = ("not measured: the outputs were not compared with the original model on real data (pass data= "
                "to optimize/explain, or --data to einfx convert)")


@dataclass(frozen=True)
class Row:
    """One candidate: where it is, what was decided and why, and what it costs before and after."""

    name: str
    kind: str
    shape: tuple[int, ...]
    d_in: int
    d_out: int
    decision: str  # "structured" or "kept"
    reason: str
    structure: str | None
    sizes: str | None
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    projection_error: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def structured(self) -> bool:
        return self.decision == "structured"

    def with_extra(self, **columns: Any) -> "Row":
        """A copy with more optional columns (rendered in the table and the JSON)."""
        return replace(self, extra={**self.extra, **columns})

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "name", "kind", "shape", "d_in", "d_out", "decision", "reason", "structure", "sizes", "params_before",
            "params_after", "flops_before", "flops_after", "projection_error")}
        out["shape"] = list(self.shape)
        out.update(self.extra)
        return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


@dataclass(frozen=True)
class Report:
    """The dry run of a policy on a model.

    Attributes:
        rows: one `Row` per candidate, in graph order.
        frontend: the tracing front end that captured the model ("fx", "hf_fx", "export") or "module".
        trace_failures: front end -> why it failed, for the front ends tried before ``frontend``.
        model: the model's class name.
        budget: the budget planner's outcome (metric, target, achieved; with data, ``search``: the layers,
            families and options the search over θ weighed and its predicted output error), or ``None``.
        verify_error: largest relative Frobenius error of the outputs against the original, when verified.
        unmatched: policy patterns (``"rule 'x'"``, ``"exclude 'y'"``) that matched no layer -> the closest
            layer names.
        fidelity: `einfx.fidelity` of the result against the original on the ``data`` batches
            (``Fidelity.to_dict()``), or ``None`` when no data was given: then the summary says that fidelity to
            the original was not measured.
    """

    rows: tuple[Row, ...]
    frontend: str
    trace_failures: Mapping[str, str] = field(default_factory=dict)
    model: str = ""
    budget: Mapping[str, Any] | None = None
    verify_error: float | None = None
    unmatched: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fidelity: Mapping[str, Any] | None = None

    @property
    def structured(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if r.structured)

    def totals(self) -> dict[str, int]:
        """Summed weight parameters and FLOPs per token over all candidate rows, before and after."""
        keys = ("params_before", "params_after", "flops_before", "flops_after")
        return {k: sum(getattr(r, k) for r in self.rows) for k in keys}

    def to_dict(self) -> dict:
        return {
            "model": self.model, "frontend": self.frontend, "trace_failures": dict(self.trace_failures),
            "budget": dict(self.budget) if self.budget is not None else None, "verify_error": self.verify_error,
            "unmatched": {k: list(v) for k, v in self.unmatched.items()},
            "fidelity": dict(self.fidelity) if self.fidelity is not None else NOT_MEASURED,
            "totals": self.totals(), "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def summary(self) -> str:
        t = self.totals()
        n = len(self.structured)

        def ratio(before, after):
            return f"{before / after:.2f}x fewer" if after else "-"

        lines = [f"{type(self).__name__} of {self.model or 'model'} (traced with {self.frontend}): "
                 f"{n} of {len(self.rows)} candidate layers structured",
                 f"  weights in candidate layers: {t['params_before']:,} -> {t['params_after']:,} "
                 f"({ratio(t['params_before'], t['params_after'])})",
                 f"  FLOPs per token in candidate layers: {t['flops_before']:,} -> {t['flops_after']:,} "
                 f"({ratio(t['flops_before'], t['flops_after'])})"]
        done = self.structured
        if done and len(done) < len(self.rows):
            p0, p1 = sum(r.params_before for r in done), sum(r.params_after for r in done)
            f0, f1 = sum(r.flops_before for r in done), sum(r.flops_after for r in done)
            lines.append(f"  in the {n} structured layers: weights {p0:,} -> {p1:,} ({ratio(p0, p1)}), "
                         f"FLOPs per token {f0:,} -> {f1:,} ({ratio(f0, f1)})")
        if self.budget is not None:
            b = self.budget
            lines.append(f"  budget: {b['metric']} target {b['target']:.4g} of dense, achieved {b['achieved']:.4g}")
            found = b.get("search")
            if isinstance(found, str):
                lines.append(f"  search over θ: {found}")
            elif found:
                lines.append(f"  search over θ: {found['options']:,} options ({', '.join(found['families'])}) in "
                             f"{found['searched_layers']} layers, measured on the data; predicted relative output "
                             f"error {found['predicted_rel_error']:.3g}")
        if self.verify_error is not None:
            lines.append(f"  verify: max relative output error {self.verify_error:.3g}")
        f = self.fidelity
        if f is None:
            lines.append(f"  fidelity: {NOT_MEASURED}")
        else:
            top1 = f", top-1 agreement {f['top1_agreement']:.4f}" if f.get("top1_agreement") is not None else ""
            lines.append(f"  fidelity to the original on {f['examples']} calibration examples ({f['output']}): "
                         f"cosine {f['cosine']:.4f}, relative error {f['rel_error']:.4f}{top1}")
        for what, close in self.unmatched.items():
            lines.append(f"  policy {what} matches no layer" + (f" (closest: {', '.join(close)})" if close else ""))
        for fe, why in self.trace_failures.items():
            lines.append(f"  front end {fe} failed: {why}")
        return "\n".join(lines)

    def table(self) -> str:
        extra_keys = list(dict.fromkeys(k for r in self.rows for k in r.extra))
        head = ["name", "kind", "d_in->d_out", "decision", "structure", "sizes", "params", "FLOPs/token", "proj err",
                *extra_keys, "reason"]
        body = []
        for r in self.rows:
            body.append([
                r.name, r.kind, f"{r.d_in}->{r.d_out}", r.decision, _fmt(r.structure), _fmt(r.sizes),
                f"{r.params_before:,}->{r.params_after:,}", f"{r.flops_before:,}->{r.flops_after:,}",
                _fmt(r.projection_error), *(_fmt(r.extra.get(k)) for k in extra_keys), r.reason,
            ])
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        widths[-1] = len(head[-1])  # the reason is last and not padded
        fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [fmt_row(head), "  ".join("-" * w for w in widths)]
        lines += [fmt_row(row) for row in body]
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"
