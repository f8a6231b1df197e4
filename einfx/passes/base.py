"""Graph passes: a pass is a plain function ``GraphModule -> PassResult``; `run_passes` runs a list of them
in order, lints the graph after each, and names the pass that failed (the original error is kept as
``__cause__``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import fx

from einfx.errors import PassError

__all__ = ["PassResult", "Pass", "run_passes", "pass_name"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed anything, and statistics."""

    graph_module: fx.GraphModule
    changed: bool
    stats: Mapping[str, Any] = field(default_factory=dict)


Pass = Callable[[fx.GraphModule], PassResult]


def pass_name(p: Pass) -> str:
    """A readable name for a pass (function name, or the wrapped function of a functools.partial)."""
    inner = getattr(p, "func", p)
    return getattr(inner, "__name__", type(inner).__name__)


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass]) -> PassResult:
    """Run ``passes`` in order on ``gm``; lint and recompile after each.

    Returns:
        A `PassResult` whose ``changed`` is true if any pass changed the graph, and whose ``stats`` maps each
        pass name to its own stats.

    Raises:
        PassError: a pass raised, returned something other than a `PassResult`, or left a graph that fails
            ``Graph.lint()``; the message names the pass and the original exception is ``__cause__``.
    """
    changed = False
    stats: dict[str, Any] = {}
    for p in passes:
        name = pass_name(p)
        try:
            result = p(gm)
        except Exception as exc:
            raise PassError(f"pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PassError(f"pass {name!r} returned {type(result).__name__}, expected a PassResult")
        try:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        except Exception as exc:
            raise PassError(f"pass {name!r} left an invalid graph: {type(exc).__name__}: {exc}") from exc
        gm = result.graph_module
        changed = changed or result.changed
        stats[name] = dict(result.stats)
    return PassResult(gm, changed, stats)
