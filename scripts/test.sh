#!/usr/bin/env bash
# Install the test environment into the current Python and run the whole suite: bash scripts/test.sh [pytest args]
# torch is never installed, upgraded or downgraded here: install it first (any recent version) if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
torch_before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)
if [ "$torch_before" = none ]; then
  echo "torch is not installed: install it first (e.g. pip install torch torchvision), then re-run" >&2
  exit 2
fi
"$PY" -m pip install -q -r requirements-test.txt
"$PY" -m pip install -q --no-deps -r requirements-idscore.txt  # facenet-pytorch pins torch<2.3: never let it resolve
"$PY" -m pip install -q -r requirements-dask.txt  # optional Dask build engine: its tests fail (not skip) in CI without it
torch_after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$torch_before" != "$torch_after" ]; then
  echo "installing the test requirements changed torch from $torch_before to $torch_after" >&2
  exit 3
fi
echo "torch $torch_after unchanged by the install"

# ---- optional: headless browser for tests/comfy/test_browser.py ---------------------------------------------------
# Debian's chromium (+ chromium-driver) and Playwright's Python package, driven with executable_path=<chromium>.
# Best effort: nothing here can fail the run; without a browser the browser test skips with a loud reason.
# Skip this block with W2W_NO_BROWSER_INSTALL=1.
if [ "${W2W_NO_BROWSER_INSTALL:-0}" != 1 ]; then
  if [ -z "${W2W_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/dev/null 2>&1 \
        || echo "browser test: could not install chromium with apt-get; the browser test will be skipped" >&2
    else
      echo "browser test: chromium is missing and apt-get is unavailable (or not root); the browser test will be skipped" >&2
    fi
  fi
  if ! "$PY" -c 'import playwright' >/dev/null 2>&1; then
    "$PY" -m pip install -q playwright >/dev/null 2>&1 \
      || echo "browser test: could not pip install playwright; the browser test will be skipped" >&2
  fi
fi
# ---- end of the optional browser block ---------------------------------------------------------------------------
exec "$PY" -m pytest "$@"
