"""Outputs of a task: a Markdown table, a JSON record and a PNG of the frontiers, each written atomically
(a temporary file in the same folder, then os.replace)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_write", "markdown", "write_outputs", "plot"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _g(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def markdown(record: dict) -> str:
    """The task's report: setup, per-structure table (frontier, fit, multiplier), verdicts, runs."""
    lines = [f"# Scaling: {record['task']} ({record['mode']} run)", ""]
    if record["mode"] == "quick":
        lines += ["**Smoke run (`--quick`): far too small to support any claim; the verdicts below only show "
                  "that the pipeline works.**", ""]
    lines += [f"Loss: {record['loss']}. Training FLOPs = 3 × forward FLOPs per step ({record['flops_note']}).",
              f"Setup: {record['setup']}", f"Device: {record['device']}; wall time {record['seconds']:.0f} s.", "",
              "## Structures", "",
              "| structure | ω | ψ | ν | widths | params | frontier pts | best loss | fit a | fit b | fit c "
              "| fit rmse(log L) | multiplier vs dense | at loss | from |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["structures"]:
        fit = row["fit"] or {}
        tax = row.get("taxonomy") or {}
        lines.append(
            f"| {row['variant']} | {_g(tax.get('omega'), 2)} | {_g(tax.get('psi'), 2)} | {_g(tax.get('nu'), 2)} "
            f"| {', '.join(str(w) for w in row['widths'])} | {row['params']} | {len(row['frontier']['loss'])} "
            f"| {_g(min(row['frontier']['loss']), 4)} | {_g(fit.get('a'))} | {_g(fit.get('b'))} | {_g(fit.get('c'))} "
            f"| {_g(fit.get('rmse_log'), 2)} | {_g(row['multiplier_vs_dense'])} | {_g(row['at_loss'], 4)} "
            f"| {row['source'] or '–'} |")
    lines += ["", "Multiplier: C_dense(L) / C_structure(L) at the lowest loss L both frontiers reach; > 1 means "
              "fewer FLOPs than dense. ω, ψ, ν: `einfx.taxonomy` at the largest width (θ formulas).", "",
              "## Verdicts (measured here)", "", "| claim | evidence (multiplier vs dense) | verdict |", "|---|---|---|"]
    lines += [f"| {v['claim']} | {v['evidence']} | {v['outcome']} |" for v in record["verdicts"]]
    lines += ["", "## Runs", "", "| structure | width | params | GFLOPs/step | steps: held-out loss | wall s |",
              "|---|---|---|---|---|---|"]
    for r in record["runs"]:
        pts = ", ".join(f"{p['step']}: {p['loss']:.4g}" for p in r["points"]) + (" (diverged)" if r["diverged"] else "")
        lines.append(f"| {r['variant']} | {r['width']} | {r['params']} | {r['flops_per_step'] / 1e9:.3g} | {pts} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Loss against training FLOPs (log-log): every checkpoint, each frontier and its power-law fit."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(record["structures"]):
        color = colors(i % 10)
        pts = [(p["flops"], p["loss"]) for r in record["runs"] if r["variant"] == row["variant"] for p in r["points"]]
        if pts:
            ax.scatter(*zip(*pts), s=10, alpha=0.35, color=color)
        fc, fl = row["frontier"]["flops"], row["frontier"]["loss"]
        ax.plot(fc, fl, marker="o", ms=4, lw=1.5, color=color, label=row["variant"])
        fit = row["fit"]
        if fit:
            grid = np.geomspace(min(fc), max(fc), 100)
            ax.plot(grid, fit["a"] * grid ** (-fit["b"]) + fit["c"], ls="--", lw=1, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(record["loss"])
    title = f"{record['task']}: compute-optimal frontiers (solid), power-law fits (dashed)"
    ax.set_title(title + (" — smoke run" if record["mode"] == "quick" else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_outputs(record: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``stem``.md, .json and .png under ``out_dir``; returns their paths by extension."""
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    atomic_write(paths["json"], (json.dumps(record, indent=1) + "\n").encode())
    atomic_write(paths["md"], markdown(record).encode())
    plot(record, paths["png"])
    return paths
