"""Output files of ``einfx convert``: atomic per-model directories, resume checks, batch summary and chart.

Layout under the output directory::

    DIR/<slug>/model.onnx, DIR/<slug>/report.json     one complete, valid directory per converted model
    DIR/.tmp-<host>-<pid>-<slug>/                      staging while a model converts (never read)
    DIR/summary[.shard-K-of-N].{json,md,png}            the batch summary of one run

A model directory only ever appears by ``os.replace`` of a finished staging directory, so a run killed at
any point leaves either the previous directory, the new one, or none; never a partial one. Staging
directories of dead processes on this host are removed when a run starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import asdict, dataclass

from einfx.errors import EinfxError, ExportError

__all__ = [
    "ONNX_NAME", "REPORT_NAME", "ModelResult", "file_digest", "host_tag", "staging_dir", "publish",
    "clean_stale", "remove_path", "write_bytes_atomic", "write_json_atomic", "finalize_report", "check_complete",
    "summary_paths", "write_summary", "summary_markdown", "write_chart",
]

ONNX_NAME = "model.onnx"
REPORT_NAME = "report.json"
_PREFIXES = (".tmp-", ".old-")


@dataclass(frozen=True)
class ModelResult:
    """The outcome of one model in a batch.

    Attributes:
        spec: canonical model spec (or the raw text when it did not parse).
        slug: its directory name under the output directory ("" when it did not parse).
        status: "ok" (converted now), "skipped" (complete outputs found by --resume) or "failed".
        seconds: wall time spent on the model in this run.
        error: for "failed", ``"ErrorType: message"``.
        params_before, params_after: parameter counts of the original and converted model.
        flops_before, flops_after: FLOPs of one forward pass on the example inputs.
        max_rel_error: ONNX-vs-torch parity of the exported model.
        cosine: fidelity of the converted model to the original (mean cosine of the main output on the --data
            batches), ``None`` when not measured.
    """

    spec: str
    slug: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    params_before: int | None = None
    params_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    max_rel_error: float | None = None
    cosine: float | None = None

    @property
    def params_saving(self) -> float | None:
        """Fraction of parameters removed (0.25 = 25 % fewer), None when unknown."""
        return _saving(self.params_before, self.params_after)

    @property
    def flops_saving(self) -> float | None:
        """Fraction of FLOPs removed, None when unknown."""
        return _saving(self.flops_before, self.flops_after)

    def to_dict(self) -> dict:
        return {**asdict(self), "params_saving": self.params_saving, "flops_saving": self.flops_saving}

    @classmethod
    def from_report(cls, report: dict, status: str, seconds: float) -> "ModelResult":
        """A successful result from a model's report.json content."""
        export = report.get("export") or {}
        fid = report.get("fidelity")
        return cls(
            spec=report["spec"], slug=report["slug"], status=status, seconds=seconds,
            params_before=report["params"]["before"], params_after=report["params"]["after"],
            flops_before=report["flops"]["before"], flops_after=report["flops"]["after"],
            max_rel_error=export.get("max_rel_error"),
            cosine=fid.get("cosine") if isinstance(fid, dict) else None,
        )


def _saving(before, after) -> float | None:
    return None if not before or after is None else 1.0 - after / before


# --- atomic files and directories ----------------------------------------------------------------------------


def host_tag() -> str:
    """This host's name reduced to [A-Za-z0-9_], so that it can sit between '-' separators."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def file_digest(path: str) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return os.path.getsize(path), sha.hexdigest()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it into place."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")
    # os.open with 0o666 honours the umask (mkstemp would make the file private).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def staging_dir(out_dir: str, slug: str) -> str:
    """Create and return a fresh staging directory for ``slug`` owned by this process."""
    path = os.path.join(out_dir, f".tmp-{host_tag()}-{os.getpid()}-{slug}")
    if os.path.lexists(path):
        remove_path(path)
    os.makedirs(path)
    return path


def publish(staging: str, final: str) -> None:
    """Move a finished staging directory to ``final``, replacing any previous directory there.

    ``os.replace`` cannot replace a non-empty directory, so a previous one is first renamed aside
    (``.old-…``) and deleted afterwards; a kill in between leaves no ``final`` rather than a partial one.
    """
    old = None
    if os.path.lexists(final):
        parent, slug = os.path.split(final)
        old = os.path.join(parent, f".old-{host_tag()}-{os.getpid()}-{slug}")
        remove_path(old)
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(os.path.dirname(final))
    if old:
        remove_path(old)


def clean_stale(out_dir: str) -> list[str]:
    """Remove staging leftovers (``.tmp-*``, ``.old-*``) of dead processes on this host; return their names.

    Leftovers of other hosts are kept: on a shared file system they may belong to a running shard.
    """
    removed = []
    if not os.path.isdir(out_dir):
        return removed
    host = host_tag()
    for name in sorted(os.listdir(out_dir)):
        if not name.startswith(_PREFIXES):
            continue
        parts = name.split("-", 3)
        if len(parts) < 4 or parts[1] != host or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        remove_path(os.path.join(out_dir, name))
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path: str) -> None:
    """Remove a file or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- per-model report and resume check -----------------------------------------------------------------------


def finalize_report(staging: str, report: dict, spec: str, slug: str, options: dict, seconds: float) -> dict:
    """Check a converter's report and ONNX file in ``staging``, add identity fields, write report.json.

    Args:
        staging: the staging directory holding model.onnx.
        report: what the converter returned; needs ``params`` and ``flops`` with integer before/after.
        spec, slug: the model's canonical spec and directory name.
        options: the run options that decide whether an existing output can be reused (see check_complete).
        seconds: conversion wall time.

    Raises:
        ExportError: model.onnx is missing or empty.
        EinfxError: the report lacks params/flops before/after.
    """
    onnx_path = os.path.join(staging, ONNX_NAME)
    if not os.path.isfile(onnx_path) or os.path.getsize(onnx_path) == 0:
        raise ExportError(f"model {spec!r}: the converter wrote no {ONNX_NAME} (or an empty one) in {staging}")
    for key in ("params", "flops"):
        entry = report.get(key) if isinstance(report, dict) else None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int) for k in ("before", "after")):
            raise EinfxError(f"model {spec!r}: converter report needs integer {key}.before and {key}.after, "
                             f"got {entry!r}")
    size, sha = file_digest(onnx_path)
    full = {**report, "spec": spec, "slug": slug, "status": "ok", "options": options, "seconds": round(seconds, 3),
            "onnx": {"file": ONNX_NAME, "size": size, "sha256": sha}}
    write_json_atomic(os.path.join(staging, REPORT_NAME), full)
    return full


def check_complete(model_dir: str, options: dict) -> tuple[dict | None, str]:
    """Whether ``model_dir`` holds complete, valid outputs for these options.

    Complete means: report.json parses, records status "ok" and the same options (spec, policy digest,
    dtype, tokens), and model.onnx exists with the recorded size and sha256.

    Returns:
        ``(report, "complete")`` when reusable, else ``(None, reason)``.
    """
    report_path = os.path.join(model_dir, REPORT_NAME)
    onnx_path = os.path.join(model_dir, ONNX_NAME)
    if not os.path.isdir(model_dir):
        return None, "no output directory"
    try:
        with open(report_path, encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError) as exc:
        return None, f"{REPORT_NAME} unreadable ({type(exc).__name__})"
    if not isinstance(report, dict) or report.get("status") != "ok":
        return None, f"{REPORT_NAME} does not record success"
    if report.get("options") != options:
        return None, f"made with other options {report.get('options')}"
    onnx = report.get("onnx") or {}
    if not os.path.isfile(onnx_path):
        return None, f"{ONNX_NAME} missing"
    if file_digest(onnx_path) != (onnx.get("size"), onnx.get("sha256")):
        return None, f"{ONNX_NAME} size/sha256 differ from {REPORT_NAME}"
    try:
        ModelResult.from_report(report, "skipped", 0.0)
    except (KeyError, TypeError) as exc:
        return None, f"{REPORT_NAME} lacks {exc}"
    return report, "complete"


# --- batch summary ---------------------------------------------------------------------------------------------


def summary_paths(out_dir: str, shard: tuple[int, int] | None = None) -> dict[str, str]:
    """Paths of summary.json / summary.md / summary.png (``summary.shard-K-of-N.*`` for a shard)."""
    stem = "summary" if shard is None or shard[1] == 1 else f"summary.shard-{shard[0]}-of-{shard[1]}"
    return {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}


def write_summary(out_dir: str, results: list[ModelResult], options: dict,
                  shard: tuple[int, int] | None = None) -> dict[str, str]:
    """Write the batch summary (JSON, Markdown, PNG chart) atomically; return the paths."""
    paths = summary_paths(out_dir, shard)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    write_json_atomic(paths["json"], {"options": options, "counts": counts, "models": [r.to_dict() for r in results]})
    write_bytes_atomic(paths["md"], summary_markdown(results, counts).encode())
    write_chart(paths["png"], results)
    return paths


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def summary_markdown(results: list[ModelResult], counts: dict) -> str:
    """The batch summary as a Markdown table (one row per model) plus the failure reasons."""
    lines = [
        "# einfx convert summary", "",
        f"{counts['ok']} converted, {counts['skipped']} already complete (skipped), {counts['failed']} failed.", "",
        "| model | status | params before → after | params saved | FLOPs before → after | FLOPs saved "
        "| ONNX max rel. error | fidelity to the original (cosine) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        parity = "–" if r.max_rel_error is None else f"{r.max_rel_error:.2e}"
        fid = "–" if r.status == "failed" else _fidelity(r.cosine)
        lines.append(
            f"| `{r.spec}` | {r.status} | {_num(r.params_before)} → {_num(r.params_after)} | {_pct(r.params_saving)} "
            f"| {_num(r.flops_before)} → {_num(r.flops_after)} | {_pct(r.flops_saving)} | {parity} | {fid} "
            f"| {r.seconds:.1f} |")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r.spec}`: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def _fidelity(cosine: float | None) -> str:
    return "not measured (no --data)" if cosine is None else f"{cosine:.4f}"


def _label(spec: str, width: int = 48) -> str:
    path, at, arch = spec.partition("@")
    text = f"{os.path.basename(path)}@{arch}" if at else spec
    return text if len(text) <= width else text[: width - 1] + "…"


def write_chart(path: str, results: list[ModelResult]) -> None:
    """A horizontal bar chart of the params and FLOPs saving (%) per converted model, written atomically."""
    # A bare Figure renders PNG through Agg without pyplot, so no global backend is switched.
    from matplotlib.figure import Figure

    done = [r for r in results if r.status in ("ok", "skipped")]
    fig = Figure(figsize=(10, 1.2 + 0.45 * max(1, len(done))), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if done:
        ys = range(len(done))
        height = 0.4
        ax.barh([y - height / 2 for y in ys], [100 * (r.params_saving or 0.0) for r in done], height, label="params")
        ax.barh([y + height / 2 for y in ys], [100 * (r.flops_saving or 0.0) for r in done], height, label="FLOPs")
        ax.set_yticks(list(ys), [f"{_label(r.spec)}\nfidelity: {_fidelity(r.cosine)}" for r in done], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no converted models", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("saving vs. original model (%)")
    ax.set_title("einfx convert: params and FLOPs saved per model")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
