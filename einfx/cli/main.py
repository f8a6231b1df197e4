"""Entry point of the ``einfx`` console script: ``demo``, ``explain`` and ``convert``.

Exit codes: 0 success; 1 at least one model failed (the others still ran); 2 bad command line or options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from einfx.errors import EinfxError

__all__ = ["main", "build_parser"]

_MODEL_HELP = ("torchvision:NAME, timm:NAME, hf:MODEL_TYPE[?key=value&...] (a config with random weights, never a "
               "download), a weights file PATH.safetensors|.pt|.pth[@ARCH_SPEC], or a local Hugging Face model "
               "folder (config.json, safetensors weights, tokenizer files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="einfx", description="Structured einsum linear layers for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the main job on a built-in default model (no arguments needed)")
    demo.add_argument("--quick", action="store_true", help="a smaller model, for smoke tests")
    demo.add_argument("--out", default="out/demo", help="folder for the ONNX files (default: out/demo)")
    demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and latency comparison")
    demo.set_defaults(handler=_run_demo)

    explain = sub.add_parser("explain", help="dry run: which layers a policy would replace, and why")
    _add_model_args(explain)
    explain.add_argument("--json", action="store_true", help="print each report as JSON")
    explain.set_defaults(handler=_run_explain)

    convert = sub.add_parser(
        "convert", help="convert models to structured layers and export ONNX (batch, resumable, sharded)",
        description="Per model, writes OUT/<model>/model.onnx and report.json atomically; then OUT/summary.json, "
                    "summary.md and summary.png. See docs/convert.md for job arrays.")
    _add_model_args(convert)
    convert.add_argument("--list", metavar="FILE", help="a file of models, one 'SPEC [policy=PATH] [arch=SPEC]' a line")
    convert.add_argument("--out", required=True, metavar="DIR", help="output directory")
    convert.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                         help="models converted at once, each in its own process (default 1: in this process)")
    convert.add_argument("--shard", metavar="K/N", help="convert only shard K of N of the sorted model list")
    convert.add_argument("--resume", action="store_true", help="skip models whose outputs are complete and valid")
    convert.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="ONNX dtype")
    convert.add_argument("--runtime", choices=("onnxruntime", "openvino"),
                         help="the runtime the ONNX file is for: every structured layer's plan and fold-to-dense "
                              "decision is measured there (cached), and the file is verified there")
    convert.add_argument("--deploy-shape", metavar="BxS", help="with --runtime: the static (batch x sequence) "
                         "shape the runtime will compile the file at, e.g. 8x128 (or B for models without a "
                         "sequence axis): the layers are tuned, and the graph passes timed, at that shape")
    convert.set_defaults(handler=_run_convert)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--policy", required=True, metavar="FILE", help="policy file (YAML or TOML)")
    parser.add_argument("--arch", metavar="SPEC", help="architecture of weights files given without @SPEC")
    parser.add_argument("--tokens", type=int, default=128, metavar="N", help="sequence length of text models")
    parser.add_argument("--data", metavar="FILE", help="calibration inputs: text lines (tokenized with the model's own "
                        "tokenizer when it has one) or a .safetensors file of input tensors; the layers are fitted "
                        "to them and the report gives the fidelity to the original on them")


def _run_demo(args: argparse.Namespace) -> int:
    from einfx.cli.demo import run_demo

    return run_demo(quick=args.quick, out_dir=args.out, onnx=not args.no_onnx)


def _usage_error(command: str, exc: BaseException) -> int:
    print(f"einfx {command}: error: {exc}", file=sys.stderr)
    return 2


def _check_policy_file(path: str) -> None:
    if not os.path.isfile(path):
        raise EinfxError(f"--policy {path!r}: no such file")


def _run_explain(args: argparse.Namespace) -> int:
    from einfx.zoo import parse_spec

    explain_fn = args.explain_fn
    if explain_fn is None:
        from einfx.cli.pipeline import explain_one as explain_fn
    try:
        _check_policy_file(args.policy)
        if not args.models:
            raise EinfxError("no models given; e.g. einfx explain torchvision:resnet18 --policy policy.yaml")
    except EinfxError as exc:
        return _usage_error("explain", exc)
    failed = 0
    for text in args.models:
        try:
            extra = {"data": args.data} if args.data is not None else {}
            report = explain_fn(parse_spec(text, arch=args.arch), args.policy, args.tokens, **extra)
        except Exception as exc:  # report the model's failure and go on with the next one
            failed += 1
            print(f"einfx explain: {text}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if args.json:
            data = report.to_json() if hasattr(report, "to_json") else report
            print(data if isinstance(data, str) else json.dumps(data, indent=2))
        else:
            print(f"== {text}\n{report}")
    return int(failed > 0)


def _run_convert(args: argparse.Namespace) -> int:
    from einfx.cli.convert import (RunOptions, check_options, collect_tasks, parse_deploy_shape, run_batch,
                                   select_tasks)
    from einfx.cli.shard import parse_shard

    try:
        shard = parse_shard(args.shard) if args.shard else None
        check_options(args.dtype, args.tokens, args.jobs)
        deploy_shape = parse_deploy_shape(args.deploy_shape, args.runtime) if args.deploy_shape else None
        _check_policy_file(args.policy)
        if args.data is not None and not os.path.isfile(args.data):
            raise EinfxError(f"--data {args.data!r}: no such file")
        tasks = collect_tasks(args.models, args.policy, list_file=args.list, arch=args.arch)
        if not tasks:
            raise EinfxError("no models given: pass MODEL arguments or --list FILE")
    except (EinfxError, ValueError) as exc:
        return _usage_error("convert", exc)
    selected = select_tasks(tasks, shard)
    options = RunOptions(out_dir=args.out, dtype=args.dtype, tokens=args.tokens, resume=args.resume, data=args.data,
                         runtime=args.runtime, deploy_shape=deploy_shape)
    batch = run_batch(selected, options, convert_fn=args.convert_fn, jobs=args.jobs, shard=shard)
    counts = {s: sum(r.status == s for r in batch.results) for s in ("ok", "skipped", "failed")}
    where = f" (shard {shard[0]}/{shard[1]}: {len(selected)} of {len({t.key for t in tasks})} models)" if shard else ""
    print(f"einfx convert{where}: {counts['ok']} converted, {counts['skipped']} skipped (already complete), "
          f"{counts['failed']} failed; summary: {batch.summary['md']}")
    return batch.exit_code


def main(argv: list[str] | None = None, *, convert_fn=None, explain_fn=None) -> int:
    """Run the ``einfx`` command line.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        convert_fn: the per-model converter of ``convert`` (default `einfx.cli.pipeline.convert_one`).
        explain_fn: the per-model dry run of ``explain`` (default `einfx.cli.pipeline.explain_one`).

    Returns:
        The exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.convert_fn, args.explain_fn = convert_fn, explain_fn
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
