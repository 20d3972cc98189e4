"""``python -m demo``: see demo/cli.py."""
import sys

from .cli import main

sys.exit(main())
