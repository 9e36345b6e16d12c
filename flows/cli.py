"""The `amed` command line: one module per sub-command under :mod:`flows.commands`, each exposing
``register(subparsers)`` and ``run(args)``. Heavy libraries (prefect, ray, mlflow) are imported inside the handlers,
so `amed --help` stays fast; a command module that fails to import fails the CLI (never a silently missing command)."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from flows.commands import convert, distill, export, fetch, fid, fid_ref, promote, sample, teacher, train

COMMANDS = (sample, train, teacher, distill, fetch, export, promote, fid_ref, fid, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amed", description="Distill, evaluate and register fast AMED samplers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flows.env import apply_safe_defaults, freeze_gc_at_exit

    apply_safe_defaults()
    freeze_gc_at_exit()  # a faster exit once torch & co. are loaded (flows/env.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"amed {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the command cannot use (read-only, full, missing): one line naming it
        if e.filename is None and e.errno not in _DISK_ERRNOS:
            raise
        print(f"amed {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def os_error_line(e: OSError) -> str:
    """An OSError as one line: the path, what went wrong and what to do."""
    fix = {errno.ENOSPC: "free space there or choose another folder",
           errno.EDQUOT: "free space there or choose another folder",
           errno.EROFS: "it is on a read-only filesystem: choose a writable folder",
           errno.EACCES: "choose a folder you may write", errno.EPERM: "choose a folder you may write"}.get(e.errno)
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{e.strerror or type(e).__name__}" + (f" ({fix})" if fix else "")


def error_line(e: BaseException) -> str:
    """The error as one line. A Ray task's error (``RayTaskError(ValueError)``, a subclass of its cause's type) carries
    the remote traceback in its text, which the flow's log has already shown: only its cause is repeated."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and type(e).__name__.startswith("RayTaskError"):
        return f"{type(cause).__name__}: {cause} (in a Ray task; its traceback is in the log above)"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
