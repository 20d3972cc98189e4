"""Command line: ``python -m w2w <command> ...`` (``--help`` on each command)."""
from __future__ import annotations

import argparse
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
    sub.add_parser("demo", add_help=False, help="the headless ComfyUI demo, `python -m demo` (`demo --help`: its "
                   "options; `demo --micro`: the miniature world's contact sheet)")
    return parser


def _demo(argv: list[str]) -> int:
    """``python -m w2w demo ARGS`` = ``python -m demo ARGS`` (the demo package sits beside this one in the pack)."""
    try:
        from demo.cli import main as demo_main
    except ImportError as exc:
        print(f"error: the demo is not importable ({exc}): run `python -m w2w demo` from the pack's folder (the "
              "custom_nodes folder that holds w2w/ and demo/)", file=sys.stderr)
        return 2
    return demo_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # every other argument is the demo's own
        return _demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
