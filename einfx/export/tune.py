"""Measured planning: time the cost model's best plans, and dense, in the runtime that will run the graph.

The cost model ranks a layer's candidate plans; a runtime decides among the best few. For each distinct
layer signature (sizes, bias, dtype, tokens) the top `CANDIDATES` plans and the dense layer are built as
standalone ONNX graphs (`einfx.export.plan_graph`), compiled in the runtime, and timed side by side
(interleaved rounds, medians). The winner is cached per runtime, in the same folder as the device profile
(cuDNN's benchmark mode and TVM's tuning logs work the same way), so a model with repeated layer shapes is
tuned once per shape and a second export costs nothing.

A cache records what its numbers depend on (runtime and version, device, threads, host CPU). One measured
elsewhere is refused with `TuningCacheError`, or ignored and replaced with ``stale="ignore"``.

    tuned = tune_layer(layer, "openvino", tokens=1024)
    tuned.winner          # "dense" or the plan's label, e.g. "xab#2"
    tuned.speedup         # dense time / the winner's time
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from einfx.errors import TuningCacheError
from einfx.export.plan_graph import dense_model, plan_model
from einfx.export.runtimes import load, runtime_id
from einfx.passes.fold import dense_linear
from einfx.passes.lower import lowerable
from einfx.planning.plan import Plan, Step
from einfx.planning.planner import all_plans, plain_plans, plan_layer
from einfx.planning.profile import DeviceProfile, cache_dir, load_profile, write_json_atomic

__all__ = ["Tuned", "TuningCache", "TuningCacheError", "tune_layer", "tune_model", "signature", "median_times",
           "CANDIDATES", "TUNE_MARGIN", "tuning_path"]

# plans timed per signature, besides dense (the cost model's best few)
CANDIDATES = 4
# a structured plan is kept only when measured this much faster than dense (timing noise on a busy host)
TUNE_MARGIN = 1.05
FORMAT = 1


@dataclass(frozen=True)
class Tuned:
    """One signature's measurement: the median seconds per candidate and the winner.

    Attributes:
        signature: the layer signature (see `signature`).
        runtime: where it was measured.
        times: label -> median seconds (``"dense"`` and one label per timed plan).
        winner: ``"dense"`` or the label of the fastest plan (kept only if `TUNE_MARGIN` faster than dense).
        plan: the fastest structured plan (what a layer that may not fold runs, even when dense wins).
        cached: read from the cache instead of measured now.
    """

    signature: str
    runtime: str
    times: dict
    winner: str
    plan: Plan
    cached: bool = False

    @property
    def dense(self) -> bool:
        return self.winner == "dense"

    @property
    def speedup(self) -> float:
        """Measured dense time over the winner's time (1.0 when dense wins)."""
        return self.times["dense"] / self.times[self.winner]

    @property
    def best_structured(self) -> str:
        return min((k for k in self.times if k != "dense"), key=self.times.get)

    def describe(self) -> str:
        best = self.best_structured
        return (f"{self.runtime}: {'dense' if self.dense else 'structured ' + self.winner} "
                f"(best plan {best} {self.times[best] * 1e3:.3f} ms vs dense {self.times['dense'] * 1e3:.3f} ms"
                f"{', cached' if self.cached else ''})")


def signature(layer, tokens: int, dtype: str = "float32") -> str:
    """What a measurement depends on: sizes, bias, dtype and token count (not the weights' values)."""
    s = layer.sizes
    dims = ",".join(f"{k}={v}" for k, v in s.as_dict().items())
    return f"{s.d_in}x{s.d_out} [{dims}] bias={layer.bias is not None} {dtype} tokens={int(tokens)}"


def tuning_path(runtime: str, device: str = "cpu") -> Path:
    return cache_dir() / f"tuning-{runtime}-{device}-v{FORMAT}.json"


@dataclass
class TuningCache:
    """Winners by signature for one runtime on one host (a JSON file, written atomically).

    Args:
        path: the file (default: `tuning_path`); missing is an empty cache.
        stale: ``"refuse"`` (raise `TuningCacheError` for a cache measured with another runtime version,
            device, thread count or host) or ``"ignore"`` (start empty and overwrite it on save).
    """

    runtime: str
    threads: int
    device: str = "cpu"
    path: Path | None = None
    stale: str = "refuse"
    entries: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stale not in ("refuse", "ignore"):
            raise TuningCacheError(f"stale must be 'refuse' or 'ignore', got {self.stale!r}")
        self.path = Path(self.path) if self.path is not None else tuning_path(self.runtime, self.device)
        self.id = runtime_id(self.runtime, self.threads, self.device)
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            if self.stale == "ignore":
                return
            raise TuningCacheError(f"tuning cache {self.path} is unreadable ({exc}); delete it or pass "
                                   "stale='ignore'") from exc
        found = {k: data.get(k) for k in ("format", "id")}
        if found["format"] != FORMAT or found["id"] != self.id:
            if self.stale == "ignore":
                return
            theirs = found["id"] if isinstance(found["id"], dict) else {}
            diff = [f"{k}: {theirs.get(k)!r} here {v!r}" for k, v in self.id.items() if theirs.get(k) != v]
            if found["format"] != FORMAT:
                diff.insert(0, f"format {found['format']!r}, expected {FORMAT}")
            raise TuningCacheError(f"tuning cache {self.path} was measured elsewhere ({'; '.join(diff)}); "
                                   "its winners do not apply here: delete it, or pass stale='ignore' to re-tune")
        self.entries = dict(data.get("entries") or {})

    def get(self, sig: str, reference: Plan | None) -> Tuned | None:
        entry = self.entries.get(sig)
        if entry is None:
            return None
        steps = tuple(Step(s["op"], s["out"], tuple(s["inputs"]), tuple(s["args"])) for s in entry["steps"])
        plan = replace(reference, steps=steps, order=entry["order"], layout=entry["layout"], output=steps[-1].out,
                       token_block=0)
        return Tuned(sig, self.runtime, dict(entry["times"]), entry["winner"], plan, cached=True)

    def put(self, tuned: Tuned) -> None:
        plan = tuned.plan
        entry = {"winner": tuned.winner, "times": tuned.times, "order": plan.order, "layout": plan.layout,
                 "steps": [{"op": s.op, "out": s.out, "inputs": list(s.inputs), "args": [int(a) for a in s.args]}
                           for s in plan.steps]}
        self.entries[tuned.signature] = entry

    def save(self) -> Path:
        return write_json_atomic(self.path, {"format": FORMAT, "id": self.id, "entries": self.entries}, indent=1)


def candidates(layer, tokens: int, profile: DeviceProfile, count: int = CANDIDATES) -> list[tuple[str, Plan]]:
    """The cost model's ``count`` best distinct plans for ``layer`` (no fold: a runtime folds constants itself,
    so a folded plan is the dense candidate), labelled ``"<order>#<rank>"``, and the plain token-major plan
    (``"<order>-plain"``) when it is not among them."""
    plans = [p for p in all_plans(layer.sizes, tokens, "float32", profile) if p.order != "fold"]
    plans.append(plan_layer(layer.sizes, tokens, "float32", profile, ("xab", "xba")))
    seen, out = set(), []
    for p in sorted(plans, key=lambda p: (p.time, p.flops, p.copies)):
        if p.steps in seen:
            continue
        seen.add(p.steps)
        out.append((f"{p.order}#{len(out) + 1}", p))
        if len(out) == count:
            break
    # the plain token-major plan of the cheaper order in FLOPs: plain GEMMs the cost model may undervalue
    plain = min(plain_plans(layer.sizes, tokens, "float32", profile), key=lambda p: p.flops)
    if plain.steps not in seen:
        out.append((f"{plain.order}-plain", plain))
    return out


def median_times(fns: dict, rounds: int = 7, min_time: float = 0.03) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds after one warm-up call."""
    calls = {}
    for key, fn in fns.items():
        fn()
        start, n = time.perf_counter(), 0
        while True:
            fn()
            n += 1
            if time.perf_counter() - start >= min_time:
                break
        calls[key] = n
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[key]):
                fn()
            samples[key].append((time.perf_counter() - start) / calls[key])
    return {k: float(np.median(v)) for k, v in samples.items()}


@torch.no_grad()
def tune_layer(layer, runtime: str, tokens: int, *, threads: int = 0, cache: TuningCache | None = None,
               profile: DeviceProfile | None = None, count: int = CANDIDATES, margin: float = TUNE_MARGIN,
               timer=median_times) -> Tuned:
    """Time ``layer``'s best plans and its dense fold at ``tokens`` rows in ``runtime``; cache the winner.

    Args:
        layer: an `EinsumLinear` (float32 is what is timed; the structure of a plan does not depend on dtype).
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        tokens: rows of the input (batch × sequence of the deployment shape).
        threads: runtime threads (0: the runtime's default).
        cache: where winners are looked up and stored (None: measure, store nothing).
        profile: the cost model that ranks the candidates (default: the CPU profile seen through a graph
            runtime, no free strided views).
        timer: ``timer({label: fn}) -> {label: seconds}`` (tests substitute a fake clock).
    """
    profile = profile or load_profile("cpu", fallback=True).with_backend("onnxruntime")
    sig = signature(layer, tokens)
    reference = plan_layer(layer.sizes, tokens, "float32", profile, ("xab", "xba"))
    if cache is not None:
        hit = cache.get(sig, reference)
        if hit is not None:
            return hit
    cores = {k: v.detach().float().cpu() for k, v in layer.cores().items()}
    bias = layer.bias.detach().float().cpu() if layer.bias is not None else None
    plans = dict(candidates(layer, tokens, profile, count))
    x = {"x": torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(0)).numpy()}
    models = {"dense": dense_model(layer.to_dense().float().cpu(), bias, tokens)}
    models.update({label: plan_model(plan, cores, bias, tokens, layer.in_features) for label, plan in plans.items()})
    runners = {label: load(runtime, m, threads, spinning=False) for label, m in models.items()}
    times = timer({label: (lambda r=r: r(x)) for label, r in runners.items()})
    best = min(plans, key=times.get)
    winner = best if times[best] * margin < times["dense"] else "dense"
    tuned = Tuned(sig, runtime, times, winner, plans[best])
    if cache is not None:
        cache.put(tuned)
    return tuned


def _parent(model: torch.nn.Module, name: str):
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@torch.no_grad()
def tune_model(model: torch.nn.Module, runtime: str, tokens: int, *, threads: int = 0, keep=(),
               cache: TuningCache | None = None, save: bool = True, progress=None) -> dict[str, Tuned]:
    """Tune every structured layer of ``model`` for ``runtime`` and apply the result, in place.

    A layer whose signature measured dense faster becomes an exact ``nn.Linear`` (unless its name matches a
    ``keep`` pattern: a policy that forbids folding); every other layer records the winning plan as its
    ``export_plan``, which the lowering pass and a capturing export then run. Layers that share a signature
    are timed once. Returns the measurements by layer name.
    """
    cache = cache if cache is not None else TuningCache(runtime, threads)
    results, by_sig = {}, {}
    layers = [(n, m) for n, m in model.named_modules() if n and lowerable(m)]
    for name, layer in layers:
        sig = signature(layer, tokens)
        if sig not in by_sig:
            by_sig[sig] = tune_layer(layer, runtime, tokens, threads=threads, cache=cache)
            if progress is not None:
                progress(name, by_sig[sig])
        results[name] = by_sig[sig]
    for name, layer in layers:
        tuned = results[name]
        if tuned.dense and not any(fnmatch.fnmatchcase(name, pat) for pat in keep):
            parent, attr = _parent(model, name)
            setattr(parent, attr, dense_linear(layer))
        else:
            layer.export_plan = tuned.plan
    if save and any(not t.cached for t in by_sig.values()):
        cache.save()
    return results
