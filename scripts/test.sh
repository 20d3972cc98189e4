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
torch_after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$torch_before" != "$torch_after" ]; then
  echo "installing the test requirements changed torch from $torch_before to $torch_after" >&2
  exit 3
fi
echo "torch $torch_after unchanged by the install"
exec "$PY" -m pytest "$@"
