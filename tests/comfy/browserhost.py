"""Headless Chromium for the browser tests, driven by Playwright's Python package.

`find_browser()` returns (playwright sync API module, Chromium executable) or a reason why the browser tests
cannot run here. The executable is $W2W_CHROMIUM, else the first of `chromium`, `chromium-browser`,
`google-chrome` on PATH (Debian: `apt-get install chromium`); Playwright's own browser download is never used.
`open_page(playwright, executable, profile_dir)` starts it with a new empty profile and the flags below.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

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
