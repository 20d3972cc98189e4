"""Markers shared by the whole suite, and the run's memory summary (options and reporting only; fixtures live next
to the tests that use them)."""
from __future__ import annotations

import os
import resource
import sys


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy test (seconds to minutes on a CPU); still runs in CI, "
                                       "deselect locally with -m 'not slow'")
    config.addinivalue_line("markers", "comfy: needs a real ComfyUI (found via $COMFYUI_PATH, a ComfyUI checkout "
                                       "containing this pack, then ~/ComfyUI); skipped with a reason otherwise")


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc (Linux) or getrusage."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float("nan"), peak / (1024 if sys.platform != "darwin" else 1024 * 1024)


def pytest_runtest_logfinish(nodeid, location):
    """With W2W_MEMLOG=FILE: one line per test, `current_MiB peak_MiB nodeid`, to find what holds memory."""
    path = os.environ.get("W2W_MEMLOG")
    if path:
        current, peak = _rss_mib()
        with open(path, "a") as f:
            f.write(f"{current:9.0f} {peak:9.0f} {nodeid}\n")


def pytest_terminal_summary(terminalreporter):
    _, peak = _rss_mib()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    terminalreporter.write_line(f"memory: peak RSS of the test process {peak / 1024:.2f} GiB; largest child process "
                                f"(servers, builds) {children / 1024:.2f} GiB")
