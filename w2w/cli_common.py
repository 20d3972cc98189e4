"""What the command modules (``cli_*.py``, ``metrics/cli.py``, ``download.py``) share: printing, argument types
that refuse impossible numbers when the command line is read, and the check that an output never replaces an input."""
from __future__ import annotations

import argparse
import json
import math
import os


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def whole(minimum: int):
    """An argparse type: a whole number of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: use {minimum} or more")
        return value
    parse.__name__ = f"whole number >= {minimum}"
    return parse


POSITIVE = whole(1)
NONNEGATIVE = whole(0)


def finite(text: str) -> float:
    """An argparse type: a finite real number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # also the same file under another name (hard or symbolic link)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(out: str, flag: str, *inputs: str | None, read_whole: tuple[str | None, ...] = (),
                 folder: bool = False) -> None:
    """Refuse, before any work, an output that would replace an input or land in a folder read whole.

    ``inputs`` are files or folders the command reads: the output may not be one of them nor, for a folder, an
    existing file inside it. ``read_whole`` are folders every file of which is read (a LoRA folder, a Zarr array):
    nothing may be written inside them. An output that is an existing folder is refused (``folder``: the output is
    a folder, and an existing file is refused instead)."""
    out = os.fspath(out)
    if not out.strip():
        raise ValueError(f"{flag} is empty: give the path to write")
    real = os.path.realpath(out)
    for path in inputs:
        if path is None:
            continue
        path = os.fspath(path)
        if _same_file(out, path):
            raise ValueError(f"{flag} {out} would replace the input {path}: write the result to another path")
        if os.path.isdir(path) and os.path.isfile(out) and _inside(real, os.path.realpath(path)):
            raise ValueError(f"{flag} {out} would replace a file of the input folder {path}: write the result to "
                             "another path")
    for whole_folder in read_whole:
        if whole_folder is not None and os.path.isdir(whole_folder) and _inside(real, os.path.realpath(whole_folder)):
            raise ValueError(f"{flag} {out} is inside {whole_folder}, whose every file is read as input: write the result "
                             "outside that folder")
    if folder and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a file, and this output is a folder: give a folder name")
    if not folder and os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a folder: give a file name (e.g. {os.path.join(out, 'result.safetensors')})")
    parent = os.path.dirname(os.path.abspath(out))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: cannot write in {existing} (permission denied); choose another folder")
