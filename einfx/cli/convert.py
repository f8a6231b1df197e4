"""``einfx convert``: convert a batch of models, one isolated job per model, resumable and shardable.

Top to bottom, a run is::

    collect_tasks     MODEL arguments and --list lines -> tasks (a spec that does not parse becomes a failed task)
    select_tasks      sorted unique tasks, then this machine's --shard K/N
    clean_stale       remove staging leftovers of dead runs on this host
    run_batch         run_one per task, in this process (-j 1) or in up to N spawned processes (-j N)
    write_summary     summary.{json,md,png}; exit code 1 if any model failed

``run_one`` is the unit of work: skip when --resume finds complete outputs, otherwise call the converter
(`einfx.cli.pipeline.convert_one` unless another callable of the same signature is injected) into a staging
directory and publish it atomically. Any exception fails that model only, with its reason recorded.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import os
import shlex
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from einfx.cli import outputs
from einfx.cli.outputs import ModelResult
from einfx.cli.shard import shard as shard_items
from einfx.zoo import ModelSpec, parse_spec
from einfx.errors import EinfxError, ModelSpecError

__all__ = ["Task", "RunOptions", "BatchResult", "read_list", "collect_tasks", "select_tasks", "run_one",
           "run_batch", "worker_threads", "fingerprint", "check_options", "DTYPES"]

DTYPES = ("float32", "float16")

Converter = Callable[[ModelSpec, str, str, str, int], dict]


@dataclass(frozen=True)
class Task:
    """One model to convert.

    Attributes:
        key: canonical spec (or the raw text when it did not parse); sorts, de-duplicates and shards tasks.
        spec: the parsed spec, None when parsing failed.
        policy: path of the policy file for this model.
        error: the parse error ("ModelSpecError: ..."), None when the spec parsed.
    """

    key: str
    spec: ModelSpec | None
    policy: str
    error: str | None = None


@dataclass(frozen=True)
class RunOptions:
    """Options shared by every model of a run."""

    out_dir: str
    dtype: str = "float32"
    tokens: int = 128
    resume: bool = False
    data: str | None = None
    runtime: str | None = None
    deploy_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BatchResult:
    """The results of a run, in task order, and the summary files written."""

    results: tuple[ModelResult, ...]
    summary: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every model converted or was already complete, 1 when any failed."""
        return int(any(r.status == "failed" for r in self.results))


# --- collecting and selecting tasks --------------------------------------------------------------------------


def read_list(path: str) -> list[tuple[str, str | None, str | None]]:
    """Read a model list file: one ``SPEC [policy=PATH] [arch=SPEC]`` per line, ``#`` starts a comment.

    Relative weights and policy paths are taken relative to the list file's directory.

    Returns:
        ``(spec_text, policy_or_None, arch_or_None)`` per model line.

    Raises:
        ModelSpecError: unreadable file or a line with an unknown option (names the file and line).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ModelSpecError(f"--list {path!r}: cannot read: {exc.strerror or exc}") from exc
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for number, line in enumerate(lines, 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        extra: dict[str, str] = {}
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if not eq or key not in ("policy", "arch") or key in extra:
                raise ModelSpecError(f"{path}:{number}: unexpected {word!r}; a line is SPEC [policy=PATH] [arch=SPEC]")
            extra[key] = value
        spec_text = _relative_to(base, words[0])
        policy = _relative_to(base, extra["policy"]) if "policy" in extra else None
        entries.append((spec_text, policy, extra.get("arch")))
    return entries


def _relative_to(base: str, text: str) -> str:
    path, at, rest = text.partition("@")
    if ":" in path.split("/")[0] or os.path.isabs(path):  # a zoo spec, or already absolute
        return text
    return os.path.normpath(os.path.join(base, path)) + at + rest


def collect_tasks(models: list[str], policy: str, list_file: str | None = None,
                  arch: str | None = None) -> list[Task]:
    """Tasks for the MODEL arguments and the lines of ``list_file``; unparsable specs become failed tasks."""
    entries = [(m, None, None) for m in models] + (read_list(list_file) if list_file else [])
    tasks = []
    for text, line_policy, line_arch in entries:
        try:
            spec = parse_spec(text, arch=line_arch or arch)
        except ModelSpecError as exc:
            tasks.append(Task(key=text.strip(), spec=None, policy=line_policy or policy, error=_describe(exc)))
            continue
        tasks.append(Task(key=spec.canonical, spec=spec, policy=line_policy or policy))
    return tasks


def select_tasks(tasks: list[Task], shard: tuple[int, int] | None = None) -> list[Task]:
    """Sorted unique tasks (first occurrence of a key wins), restricted to shard K of N when given."""
    k, n = shard or (1, 1)
    return shard_items(tasks, k, n, key=lambda t: t.key)


def fingerprint(task: Task, options: RunOptions) -> dict:
    """The options an output was made with; --resume reuses an output only when they are equal."""
    marks = {"spec": task.key, "policy_sha256": _sha256_or_none(task.policy), "dtype": options.dtype,
             "tokens": options.tokens}
    if options.data is not None:
        marks["data_sha256"] = _sha256_or_none(options.data)
    if options.runtime is not None:
        marks["runtime"] = options.runtime
    if options.deploy_shape is not None:
        marks["deploy_shape"] = list(options.deploy_shape)
    return marks


def _sha256_or_none(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"  # whole: a cut message loses the hint at its end


# --- one model -----------------------------------------------------------------------------------------------


def run_one(task: Task, options: RunOptions, convert_fn: Converter | None = None) -> ModelResult:
    """Convert one model into ``options.out_dir/<slug>/`` atomically; never raises for a model failure.

    Args:
        task: the model.
        options: run options.
        convert_fn: ``(spec, policy_path, staging_dir, dtype, tokens[, data=path]) -> report dict`` that writes
            ``staging_dir/model.onnx`` (``data`` is passed with ``--data`` only); defaults to
            `einfx.cli.pipeline.convert_one`.
    """
    start = time.perf_counter()
    done = _settled(task, options)
    if done is not None:
        return done
    if convert_fn is None:
        from einfx.cli.pipeline import convert_one as convert_fn
    slug = task.spec.slug
    final = os.path.join(options.out_dir, slug)
    marks = fingerprint(task, options)
    staging = outputs.staging_dir(options.out_dir, slug)
    try:
        extra = {"data": options.data} if options.data is not None else {}
        if options.runtime is not None:
            extra["runtime"] = options.runtime
        if options.deploy_shape is not None:
            extra["deploy_shape"] = options.deploy_shape
        report = convert_fn(task.spec, task.policy, staging, options.dtype, options.tokens, **extra)
        full = outputs.finalize_report(staging, report, task.key, slug, marks, time.perf_counter() - start)
        outputs.publish(staging, final)
        return ModelResult.from_report(full, "ok", time.perf_counter() - start)
    except Exception as exc:  # one model's failure, whatever its cause, must not stop the batch
        outputs.remove_path(staging)
        return ModelResult(task.key, slug, "failed", time.perf_counter() - start, _describe(exc))
    except BaseException:
        outputs.remove_path(staging)
        raise


def _settled(task: Task, options: RunOptions) -> ModelResult | None:
    """The result of a task that needs no conversion: a spec that did not parse, or --resume finds it complete."""
    if task.spec is None:
        return ModelResult(task.key, "", "failed", 0.0, task.error)
    if options.resume:
        report, _ = outputs.check_complete(os.path.join(options.out_dir, task.spec.slug), fingerprint(task, options))
        if report is not None:
            return ModelResult.from_report(report, "skipped", 0.0)
    return None


# --- the batch -----------------------------------------------------------------------------------------------


def worker_threads(jobs: int) -> int:
    """Torch threads per worker: the usable CPUs shared evenly, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, jobs))


def run_batch(tasks: list[Task], options: RunOptions, convert_fn: Converter | None = None, jobs: int = 1,
              shard: tuple[int, int] | None = None, progress: bool | None = None) -> BatchResult:
    """Run every task, write the batch summary, and return the results.

    Args:
        tasks: selected tasks (see `select_tasks`).
        options: run options.
        convert_fn: the converter (see `run_one`); with ``jobs > 1`` it must be picklable (a module-level
            function), since each model runs in its own spawned process.
        jobs: 1 runs models one after another in this process; N > 1 runs up to N models at once, each
            in a fresh process that exits after its model (memory is returned to the system per model).
        shard: only names the summary files (``summary.shard-K-of-N.*``).
        progress: a progress bar (True), plain log lines (False), or auto: a bar when stderr is a terminal.
    """
    os.makedirs(options.out_dir, exist_ok=True)
    outputs.clean_stale(options.out_dir)
    reporter = _Progress(len(tasks), progress)
    try:
        if jobs <= 1:
            results = []
            for task in tasks:
                results.append(run_one(task, options, convert_fn))
                reporter.done(results[-1])
        else:
            results = _run_parallel(tasks, options, convert_fn, jobs, reporter)
    finally:
        reporter.close()
    meta = {"out_dir": options.out_dir, "dtype": options.dtype, "tokens": options.tokens, "resume": options.resume,
            "data": options.data, "jobs": jobs, "shard": list(shard) if shard else None}
    paths = outputs.write_summary(options.out_dir, results, meta, shard)
    return BatchResult(tuple(results), paths)


def _child(conn, task: Task, options: RunOptions, convert_fn, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        result = run_one(task, options, convert_fn)
    except BaseException as exc:  # report even an interrupt, then let the process end
        result = ModelResult(task.key, task.spec.slug if task.spec else "", "failed", 0.0, _describe(exc))
    conn.send(result)
    conn.close()


def _run_parallel(tasks, options, convert_fn, jobs, reporter) -> list[ModelResult]:
    # One spawned process per model rather than a ProcessPoolExecutor: a worker killed by the OOM killer or a
    # segfault then fails exactly its own model, whereas a broken pool fails every pending model.
    ctx = multiprocessing.get_context("spawn")
    threads = worker_threads(jobs)
    pending = deque(enumerate(tasks))
    running: dict = {}
    results: list[ModelResult | None] = [None] * len(tasks)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                index, task = pending.popleft()
                settled = _settled(task, options)  # no process for a parse failure or a resume skip
                if settled is not None:
                    results[index] = settled
                    reporter.done(settled)
                    continue
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(send, task, options, convert_fn, threads),
                                   name=f"einfx-convert-{index}")
                proc.start()
                send.close()  # so that the child's exit reads as EOF here
                running[receive] = (proc, index, task, time.perf_counter())
            if not running:  # everything left was settled without a worker; wait() on nothing would block
                continue
            for receive in multiprocessing.connection.wait(list(running)):
                proc, index, task, start = running.pop(receive)
                try:
                    result = receive.recv()
                except (EOFError, OSError):
                    result = None
                receive.close()
                proc.join()
                if result is None:
                    # The dead worker could not remove its own staging directory; do it for it.
                    outputs.remove_path(os.path.join(
                        options.out_dir, f".tmp-{outputs.host_tag()}-{proc.pid}-{task.spec.slug}"))
                    result = ModelResult(task.key, task.spec.slug, "failed", time.perf_counter() - start,
                                         f"WorkerDied: the worker process ended with exit code {proc.exitcode} "
                                         "(killed by a signal if negative, e.g. -9 by the OOM killer)")
                results[index] = result
                reporter.done(result)
    finally:
        for proc, *_ in running.values():
            proc.terminate()
            proc.join()
    return results


class _Progress:
    """A tqdm bar on a terminal; one plain log line per model otherwise (both on stderr)."""

    def __init__(self, total: int, bar: bool | None):
        self.total, self.count = total, 0
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        if use_bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="model", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def done(self, result: ModelResult) -> None:
        self.count += 1
        if result.status == "failed":
            line = f"[{self.count}/{self.total}] failed  {result.spec}: {result.error}"
        else:
            saving = (f"params -{100 * result.params_saving:.1f} %, FLOPs -{100 * result.flops_saving:.1f} %"
                      if result.params_saving is not None and result.flops_saving is not None else "")
            line = f"[{self.count}/{self.total}] {result.status:<7} {result.spec} ({result.seconds:.1f} s) {saving}"
        if self.bar is not None:
            self.bar.set_postfix_str(result.spec[:40], refresh=False)
            self.bar.update(1)
            if result.status == "failed":
                self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_deploy_shape(text: str, runtime: str | None) -> tuple[int, ...]:
    """``--deploy-shape`` "8x128" (batch x sequence) or "8" (batch) as a tuple; `EinfxError` naming the value."""
    if runtime is None:
        raise EinfxError(f"--deploy-shape {text}: give --runtime too (the shape is the one that runtime compiles "
                         "the file at)")
    parts = text.lower().split("x")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise EinfxError(f"--deploy-shape {text!r}: expected BATCHxSEQUENCE or BATCH of positive integers, "
                         "e.g. 8x128")
    return tuple(int(p) for p in parts)


def check_options(dtype: str, tokens: int, jobs: int) -> None:
    """Raise `EinfxError` for out-of-range run options (names the option, value and valid range)."""
    if dtype not in DTYPES:
        raise EinfxError(f"--dtype {dtype!r}: valid: {', '.join(DTYPES)}")
    if tokens < 1:
        raise EinfxError(f"--tokens {tokens}: must be >= 1")
    if jobs < 1:
        raise EinfxError(f"-j {jobs}: must be >= 1")
