"""The `amed` command line. Each sub-command lives in its own `flows.cmd_*` module exposing
``register(subparsers)``; heavy libraries (prefect, ray, mlflow) are imported inside the handlers,
so `amed --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = [
    "flows.cmd_sample",
    "flows.cmd_train",
    "flows.cmd_teacher",
    "flows.cmd_distill",
    "flows.cmd_registry",
    "flows.cmd_models",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amed", description="Distill, evaluate and register fast AMED samplers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # command not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flows.env import apply_safe_defaults

    apply_safe_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"amed {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
