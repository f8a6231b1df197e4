"""Entry point of the ``einfx`` console script."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="einfx", description="Structured einsum linear layers for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the main job on a built-in default model (no arguments needed)")
    demo.add_argument("--quick", action="store_true", help="a smaller model, for smoke tests")
    demo.set_defaults(handler=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from einfx.cli.demo import run_demo

    return run_demo(quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
