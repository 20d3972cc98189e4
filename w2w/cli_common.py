"""What the command modules (``cli_*.py``, ``metrics/cli.py``, ``download.py``) share."""
from __future__ import annotations

import json


def print_json(data) -> None:
    print(json.dumps(data, indent=2))
