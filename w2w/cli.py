"""Command line: ``python -m w2w <command> ...`` (``--help`` on each command)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

__all__ = ["main", "COMMAND_MODULES"]

# Each module exposes register(subparsers); its parsers set `func(args) -> int`.
COMMAND_MODULES = ("w2w.cli_space", "w2w.cli_build", "w2w.cli_vae", "w2w.metrics.cli", "w2w.download", "w2w.cli_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m w2w", description="weights2weights spaces for ComfyUI and the command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def print_json(data) -> None:
    print(json.dumps(data, indent=2))
