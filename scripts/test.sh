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
# Debian's chromium (+ chromium-driver) and Playwright's Python package, driven with executable_path=<chromium>, and
# the newest ComfyUI frontend the test also runs against (version in tests/comfy/newest-frontend.txt), installed once
# into ${XDG_CACHE_HOME:-~/.cache}/comfyui-w2w/frontends/<version>.
# Best effort: nothing here can fail the run; without a browser or that frontend the browser test skips with a loud
# reason (under CI, with CI set, it fails instead). Skip this block with W2W_NO_BROWSER_INSTALL=1.
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
  frontend_version=$(sed -e '/^#/d' -e '/^[[:space:]]*$/d' tests/comfy/newest-frontend.txt 2>/dev/null | head -n 1 || true)
  frontend_dir="${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-w2w/frontends/$frontend_version"
  if [ -n "$frontend_version" ] && [ ! -f "$frontend_dir/comfyui_frontend_package/static/index.html" ]; then
    # into a temporary folder first: a failed or interrupted install never looks like a finished one
    rm -rf "$frontend_dir.partial"
    { "$PY" -m pip install -q --no-deps --target "$frontend_dir.partial" "comfyui-frontend-package==$frontend_version" \
        >/dev/null 2>&1 && rm -rf "$frontend_dir" && mv "$frontend_dir.partial" "$frontend_dir"; } \
      || { rm -rf "$frontend_dir.partial"
           echo "browser test: could not install comfyui-frontend-package==$frontend_version into $frontend_dir;" \
                "the browser test will skip (under CI: fail) its runs on that frontend" >&2; }
  fi
fi
# ---- end of the optional browser block ---------------------------------------------------------------------------
exec "$PY" -m pytest "$@"
