"""Find a ComfyUI installation and this pack's own paths, without importing ComfyUI.

Used by the demo (`demo/run.py`) and by the tests in `tests/comfy/`. Standard library only:
importing this module never imports `comfy`, `folder_paths`, `nodes` or torch.
"""
from __future__ import annotations

import os
from pathlib import Path

# Name the pack gets under `<base>/custom_nodes/` when the demo or the tests stage it.
PACK_DIRNAME = "comfyui-w2w"

# Files whose presence marks a directory as a ComfyUI checkout.
_COMFYUI_MARKERS = ("main.py", "nodes.py", "execution.py", "folder_paths.py", "comfy")

HOW_TO_PROVIDE = (
    "set COMFYUI_PATH to a ComfyUI checkout (e.g. `export COMFYUI_PATH=$HOME/ComfyUI`), "
    "or clone this pack into <ComfyUI>/custom_nodes/, or install ComfyUI at ~/ComfyUI "
    "(git clone https://github.com/comfyanonymous/ComfyUI ~/ComfyUI && "
    "pip install -r ~/ComfyUI/requirements.txt)"
)


def pack_root() -> Path:
    """The root of this pack (the directory holding `demo/`, `w2w/`, `nodes/`)."""
    return Path(__file__).resolve().parent.parent


def is_comfyui(path: str | os.PathLike) -> bool:
    """True if `path` looks like a ComfyUI checkout (main.py, nodes.py, comfy/, ...)."""
    p = Path(path)
    return all((p / marker).exists() for marker in _COMFYUI_MARKERS)


def _enclosing_comfyui(start: Path) -> Path | None:
    """`<root>` if `start` sits at `<root>/custom_nodes/<pack>` (symlinks resolved or not)."""
    for candidate in (start, start.resolve()):
        parent = candidate.parent
        if parent.name == "custom_nodes" and is_comfyui(parent.parent):
            return parent.parent
    return None


def find_comfyui(env: dict | None = None) -> Path | None:
    """Locate ComfyUI: $COMFYUI_PATH, then a checkout containing this pack, then ~/ComfyUI.

    Returns the checkout directory, or None when none is found. A $COMFYUI_PATH that is set
    but does not point at a ComfyUI checkout raises ValueError (a typo should not silently
    fall through to another installation).
    """
    env = os.environ if env is None else env
    explicit = env.get("COMFYUI_PATH", "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if not is_comfyui(path):
            raise ValueError(
                f"COMFYUI_PATH={explicit!r} is not a ComfyUI checkout (expected "
                f"{', '.join(_COMFYUI_MARKERS)} inside it); fix the variable or unset it"
            )
        return path.resolve()
    enclosing = _enclosing_comfyui(Path(__file__).parent.parent.absolute())
    if enclosing is not None:
        return enclosing.resolve()
    home = Path(env.get("HOME") or Path.home()) / "ComfyUI"
    if is_comfyui(home):
        return home.resolve()
    return None


def comfyui_version(path: str | os.PathLike) -> str | None:
    """The version string from `<path>/comfyui_version.py`, or None if it cannot be read."""
    version_file = Path(path) / "comfyui_version.py"
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def cache_dir(env: dict | None = None) -> Path:
    """Where built stand-in models are kept: ${XDG_CACHE_HOME:-~/.cache}/comfyui-w2w/standins."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME", "").strip() or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "comfyui-w2w" / "standins"
