"""Headless Chromium and the ComfyUI frontends for the browser tests, driven by Playwright's Python package.

`find_browser()` returns (playwright sync API module, Chromium executable) or a reason why the browser tests
cannot run here. The executable is $W2W_CHROMIUM, else the first of `chromium`, `chromium-browser`,
`google-chrome` on PATH (Debian: `apt-get install chromium`); Playwright's own browser download is never used.
`launch(playwright, executable, profile_dir)` starts it with a new empty profile and the flags below.

Frontends: `bundled_frontend()` is the comfyui-frontend-package installed with ComfyUI's requirements;
`newest_frontend()` is the version named in newest-frontend.txt, installed once (scripts/test.sh does it) with
`pip install --no-deps --target <cache>/frontends/<version> comfyui-frontend-package==<version>`.
`unavailable(reason)` skips loudly, or fails under CI (environment variable CI set), where nothing may be missing.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from demo.locate import cache_dir

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# --headless and --user-data-dir are given through Playwright (headless=True, the persistent profile directory).
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
HOW_TO_PROVIDE = ("install Debian's Chromium (apt-get install chromium chromium-driver) and Playwright "
                  "(pip install playwright), or set W2W_CHROMIUM to a Chromium/Chrome executable; "
                  "scripts/test.sh does both when it can")


def find_browser():
    """(playwright.sync_api module, executable path) or (None, reason)."""
    try:
        from playwright import sync_api
    except ImportError:
        return None, "the Python package playwright is not installed"
    explicit = os.environ.get("W2W_CHROMIUM")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            return None, f"W2W_CHROMIUM={explicit} is not an executable file"
        return sync_api, explicit
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return sync_api, path
    return None, f"no Chromium executable on PATH (looked for {', '.join(CHROMIUM_NAMES)})"


def launch(playwright, executable: str, profile_dir: Path):
    """A persistent headless context on a new empty profile; close it with `.close()`."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=executable, headless=True, args=list(CHROMIUM_FLAGS),
        viewport={"width": 1600, "height": 1000}, timeout=120_000)


# ---- frontends ---------------------------------------------------------------------------------------------------
NEWEST_FRONTEND_FILE = Path(__file__).with_name("newest-frontend.txt")
FRONTEND_PACKAGE = "comfyui-frontend-package"


@dataclass(frozen=True)
class Frontend:
    """A ComfyUI frontend to test with: `static` is its static/ folder (None: the one ComfyUI serves by itself, the
    installed package); `vue_nodes` turns on the Vue node renderer (setting Comfy.VueNodes.Enabled)."""

    name: str
    version: str
    static: Path | None
    vue_nodes: bool


def newest_frontend_version() -> str:
    """The version in newest-frontend.txt (its first line that is neither empty nor a # comment)."""
    lines = NEWEST_FRONTEND_FILE.read_text(encoding="utf-8").splitlines()
    return next(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def frontend_target(version: str) -> Path:
    """Where `pip install --target` puts that frontend: ${XDG_CACHE_HOME:-~/.cache}/comfyui-w2w/frontends/<version>."""
    return cache_dir().parent / "frontends" / version


def install_command(version: str) -> str:
    return f"pip install --no-deps --target {frontend_target(version)} {FRONTEND_PACKAGE}=={version}"


def bundled_frontend():
    """(Frontend, None) for the installed comfyui-frontend-package (canvas renderer), or (None, reason)."""
    try:
        version = metadata.version(FRONTEND_PACKAGE)
    except metadata.PackageNotFoundError:
        return None, (f"{FRONTEND_PACKAGE} is not installed in this Python: install ComfyUI's requirements "
                      "(pip install -r ComfyUI/requirements.txt)")
    return Frontend("bundled", version, None, vue_nodes=False), None


def newest_frontend():
    """(Frontend, None) for the version of newest-frontend.txt from its cache folder (Vue renderer), or (None, reason)."""
    version = newest_frontend_version()
    target = frontend_target(version)
    static = target / "comfyui_frontend_package" / "static"
    dist_info = target / f"comfyui_frontend_package-{version}.dist-info"
    if not (static / "index.html").is_file() or not dist_info.is_dir():
        return None, f"{FRONTEND_PACKAGE} {version} is not installed in {target}; install it with: {install_command(version)}"
    return Frontend("newest", version, static, vue_nodes=True), None


def unavailable(reason: str) -> None:
    """Fail under CI (a missing browser or frontend there is a broken set-up); elsewhere skip, loudly."""
    if os.environ.get("CI"):
        pytest.fail(f"browser test cannot run under CI: {reason}", pytrace=False)
    message = f"BROWSER TEST SKIPPED: {reason}"
    print("\n" + "!" * 100 + "\n" + message + "\n" + "!" * 100, flush=True)
    pytest.skip(message)
