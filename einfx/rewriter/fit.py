"""Sequential data-aware fitting (SPEC §6): structure the layers in execution order, each fitted to the inputs
that the already-structured model gives it.

    for each group (a layer and the siblings that read the same input tensor: q, k, v):
        stream the calibration batches through the current model and the original; accumulate C̃ = X̃ᵀX̃ and
        K = X̃ᵀX of the group's inputs (X̃ structured, X original; padding positions left out where the batch
        has an attention_mask), stopping each forward pass as soon as the group's inputs are seen;
        fit each layer with `project_on_data` to min ‖Ŵ X̃ᵀ − W Xᵀ‖ (weighed by the layer's output metric G,
        `einfx.rewriter.sensitivity`, when the policy's fit_objective is "output"; a layer that writes into a
        residual sum is then fitted to the original's sum, `einfx.rewriter.residual`) and swap it into the model

Memory holds one covariance per layer of the current group, never the data. Layers that are not plain
module sites (attention decompositions, BTT-MoE, dense) are built as `build_layer` builds them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from einfx.rewriter.decide import Decision
from einfx.rewriter.fidelity import batch_mask, call
from einfx.rewriter.residual import sum_points
from einfx.rewriter.substitute import _set, structure_modules, weight_of
from einfx.structures.calibrated import project_on_data
from einfx.layers.linear import EinsumLinear

__all__ = ["fit_on_data", "data_aware"]


# Added to each layer's input covariance, relative to its mean diagonal, before fitting.
DAMPENING = 0.01


class _Enough(Exception):
    """Raised by a hook once the group's inputs of this batch are all collected: the rest is not needed."""


def data_aware(d: Decision) -> bool:
    """Whether a decision's layer is fitted to data: an accepted module site with a projected structure."""
    return d.accepted and d.candidate.site in ("module", "fallback") and d.structure.kind not in ("dense", "btt_moe")


class _Inputs:
    """Forward pre-hooks that keep the (unmasked) input rows of named modules for one batch, stopping the
    forward pass once every one of them has been seen."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.names = set(modules)
        self.rows: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, tuple[int, tuple]] = {}
        self.batch: Any = None
        self.stop = False
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            self.inputs.setdefault(name, (x.data_ptr(), tuple(x.shape)))
            if name in self.rows:
                return
            mask = batch_mask(self.batch, x.shape)
            rows = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
            self.rows[name] = rows.detach().double().reshape(-1, x.shape[-1])
            if self.stop and set(self.rows) >= self.names:
                raise _Enough
        return hook

    def run(self, model, batch, stop: bool = True) -> dict[str, torch.Tensor]:
        self.batch, self.rows, self.stop = batch, {}, stop
        try:
            call(model, batch)
        except _Enough:
            pass
        return self.rows

    def close(self):
        for h in self.handles:
            h.remove()


def _statistics(model, reference, names: list[str], data, points: dict[str, str] | None = None
                ) -> dict[str, tuple]:
    """Per layer: (C̃ = Σ x̃ x̃ᵀ, K = Σ x̃ xᵀ or None, rows, Σ x̃, Σ x or None, E = Σ D x̃ᵀ or None, Σ D or None)
    with x̃ the structured model's inputs and x the reference's inputs at the same positions; for a layer with
    a sum point (``points``, `einfx.rewriter.residual`), D = s − s̃ is the reference's sum there minus the
    structured model's."""
    points = dict(points or {}) if reference is not None else {}
    watched = list(names) + [p for p in points.values() if p not in names]
    ours = _Inputs({n: model.get_submodule(n) for n in watched})
    theirs = _Inputs({n: reference.get_submodule(n) for n in watched}) if reference is not None else None
    paired = theirs is not None
    stats: dict[str, list] = {n: [0.0, 0.0 if paired else None, 0, 0.0, 0.0 if paired else None,
                                  0.0 if n in points else None, 0.0 if n in points else None] for n in names}
    try:
        for batch in data:
            got = ours.run(model, batch)
            ref = theirs.run(reference, batch) if paired else {}
            for n in names:
                x = got[n]
                st = stats[n]
                st[0] = st[0] + x.T @ x
                st[2] += x.shape[0]
                st[3] = st[3] + x.sum(0)
                if paired:
                    st[1] = st[1] + x.T @ ref[n]
                    st[4] = st[4] + ref[n].sum(0)
                if n in points:
                    gap = ref[points[n]] - got[points[n]]
                    st[5] = st[5] + gap.T @ x
                    st[6] = st[6] + gap.sum(0)
    finally:
        ours.close()
        if paired:
            theirs.close()
    return {n: tuple(v) for n, v in stats.items()}


@torch.no_grad()
def fit_on_data(model: nn.Module, decisions: Sequence[Decision], init: str, data: Sequence, order: Sequence[str],
                reference: nn.Module | None = None, out_metrics: dict[str, torch.Tensor] | None = None,
                residual: bool = True) -> tuple[dict[str, EinsumLinear], dict[str, str]]:
    """Structure ``model`` in place; data-aware layers fitted in ``order`` (module names, execution order).

    With ``reference`` (the original model, same module names), each layer is fitted to reproduce the
    original layer's output on the original's inputs from the inputs the structured model gives it:
    min Σ‖Ŵ x̃ − W x‖², that is the projection of W' = W Kᵀ C̃⁻¹ (ridge-regularized towards W) under C̃, so upstream errors are corrected
    rather than carried along. Without it, min Σ‖(W − Ŵ) x̃‖².

    With ``out_metrics`` (per layer name, its output metric G from `einfx.rewriter.sensitivity`), each error
    is weighed by what the model's main output sees of it: min Σ (Ŵ x̃ − W x)ᵀ G (Ŵ x̃ − W x).

    With ``reference`` and ``residual``, a layer whose output is added to a residual stream that a module then
    reads (`einfx.rewriter.residual.sum_points`: BERT's attention and FFN output projections into their
    LayerNorms) is fitted to the original model's *sum* there instead of its own output: min Σ‖Ŵ x̃ + b' − (W x̃ + b
    + s − s̃)‖² with s, s̃ the original's and the structured model's sums (the layer still dense in the
    latter), so it cancels what its inputs can predict of the error the residual carries past it.

    Returns the built layers by name and, for the data-aware ones, how each was fitted.
    """
    fitted = [d for d in decisions if data_aware(d)]
    rank = {name: i for i, name in enumerate(order)}
    fitted.sort(key=lambda d: rank.get(d.candidate.name, len(rank)))
    built = structure_modules(model, [d for d in decisions if d.accepted and not data_aware(d)], init)
    notes: dict[str, str] = {}
    remaining = list(fitted)
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        points = (sum_points(reference, [d.candidate.name for d in fitted], data[0])
                  if reference is not None and residual and fitted else {})
        while remaining:
            group = _group(model, remaining, data[0])
            names = [d.candidate.name for d in group]
            # one sum point per group: siblings writing into the same sum would each cancel the same gap
            mine, taken = {}, set()
            for name in names:
                if name in points and points[name] not in taken:
                    mine[name] = points[name]
                    taken.add(points[name])
            stats = _statistics(model, reference, names, data, mine)
            for d in group:
                name = d.candidate.name
                gram, cross, rows, total, ref_total, gap, gap_total = stats[name]
                g = (out_metrics or {}).get(name)
                n = max(rows, 1)
                means = (total / n, None if ref_total is None else ref_total / n)
                residual = None if gap is None else (gap / n, gap_total / n)
                layer = _fit(model, d, gram / n, None if cross is None else cross / n, g, means, residual)
                target, them = ("the original's outputs" if cross is not None else "its own outputs"), "them"
                if residual is not None:
                    target, them = f"the original's sum at {mine[name]}", "it"
                if g is not None:
                    target += f" as the model's output sees {them}"
                notes[name] = f"fitted to {target} on {rows:,} calibration inputs ({layer.einfx_fit})"
                _set(model, name, layer)
                built[name] = layer
            remaining = [d for d in remaining if d not in group]
    finally:
        for m, mode in modes:
            m.train(mode)
    return built, notes


def _group(model, remaining: list[Decision], batch) -> list[Decision]:
    """The first remaining layer and the remaining layers that read the very same input tensor."""
    probe = _Inputs({d.candidate.name: model.get_submodule(d.candidate.name) for d in remaining})
    try:
        probe.run(model, batch, stop=False)
    finally:
        probe.close()
    first = remaining[0].candidate.name
    key = probe.inputs.get(first)
    return [d for d in remaining if d.candidate.name == first or (key is not None and probe.inputs.get(d.candidate.name)
                                                                  == key)]


def _fit(model, d: Decision, cov: torch.Tensor, cross: torch.Tensor | None, out_metric: torch.Tensor | None = None,
         means: tuple | None = None, residual: tuple | None = None) -> EinsumLinear:
    """Fit one layer; ``cov`` and ``cross`` are second moments per row, ``means`` (mean x̃, mean x or None),
    ``residual`` (E[D x̃ᵀ], E[D]) for a layer fitted to a sum: the target is W x̃ + D, D = s − s̃.

    A layer with a bias is fitted on the centred statistics and its bias absorbs the mean error,
    b' = b + W E[x] − Ŵ E[x̃]: the affine least-squares optimum (the mean of the inputs, large after GELU or
    LayerNorm, costs none of the structure's rank). Without a bias the second moments are fitted as they are.
    """
    cand = d.candidate
    w = weight_of(model, cand).detach()
    b = model.get_parameter(cand.bias).detach() if cand.bias else None
    layer = EinsumLinear.from_weight(w, b, d.structure, init="random", name=cand.name)
    centred = means is not None and b is not None and layer.bias is not None
    # dampening (GPTQ's 1% of the mean diagonal of the second moment): with fewer calibration rows than input
    # features the covariance is singular, and fitting exactly inside the calibration subspace does not carry
    # to other inputs
    ridge = DAMPENING * float(torch.diagonal(cov).mean() or 1.0)
    gap, gap_mean = residual if residual is not None else (None, None)
    if centred:
        ours = means[0]
        theirs = means[1] if means[1] is not None else ours
        cov = cov - torch.outer(ours, ours)
        if cross is not None:
            cross = cross - torch.outer(ours, theirs)
        if gap is not None:
            gap = gap - torch.outer(gap_mean, ours)
    cov = cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    target = w
    if gap is not None:
        # W' = W + E (C̃ + λI)⁻¹: the ridge regression of W x̃ + D on x̃, pulled towards W
        target = (w.double() + torch.linalg.solve(cov, gap.T).T).to(w.dtype)
    elif cross is not None:
        # W' = (W Kᵀ + λW)(C̃ + λI)⁻¹: the dense map from the structured model's inputs to the original outputs,
        # a ridge regression pulled towards W (not 0), so that W' = W exactly when the inputs are unchanged
        wt = w.double().T
        target = torch.linalg.solve(cov, cross @ wt + ridge * wt).T.to(w.dtype)
    g = None if out_metric is None else out_metric.to(w.device)
    p = project_on_data(target, cov.to(w.device), d.structure, layer.sizes, name=cand.name, out_metric=g)
    for key, core in p.cores.items():
        getattr(layer, key).copy_(core)
    if centred:
        fitted = layer.to_dense().double()
        if gap_mean is not None:  # the mean of W x̃ + D
            shift = w.double() @ ours.to(w.device) + gap_mean.to(w.device) - fitted @ ours.to(w.device)
        else:
            shift = w.double() @ theirs.to(w.device) - fitted @ ours.to(w.device)
        layer.bias.copy_((b.double() + shift).to(layer.bias.dtype))
    layer.projection_error = float(p.rel_error)
    layer.einfx_fit = p.method + (", bias re-centred" if centred else "") + (", residual sum" if gap is not None else "")
    return layer
