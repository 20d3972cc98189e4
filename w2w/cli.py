"""Command line: ``python -m w2w <command> ...`` (``--help`` on each command)."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from . import cli_build, cli_encoder, cli_space, cli_vae, download
from .metrics import cli as metrics_cli

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m w2w", description="weights2weights spaces for ComfyUI and the "
                                     "command line (the headless ComfyUI demo is `python -m demo`)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (cli_space, cli_build, cli_vae, cli_encoder, metrics_cli, download):  # each adds its commands; func(args) -> int
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, ImportError, KeyError) as exc:  # OSError: a full disk, a folder at a file's path...
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _permission_hint(exc: OSError) -> str:
    """What to do about a permission error: an input the user cannot read, or an output they cannot write."""
    path = exc.filename
    if exc.errno != errno.EROFS and isinstance(path, (str, bytes, os.PathLike)) and os.path.exists(path) \
            and not os.access(path, os.R_OK):
        kind = "folder" if os.path.isdir(path) else "file"
        return f" (you cannot read this {kind}: change its permissions or copy it where you can read it)"
    return " (choose a folder you can write to)"


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 28] No space left on device: 'x'" -> plain words
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        if exc.errno == errno.ENOSPC:
            text += " (free space there or choose another output folder; nothing was written)"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += _permission_hint(exc)
        return text
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return " ".join(str(exc).split("\n"))
