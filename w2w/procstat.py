"""Memory and I/O counters of the current process, read from ``/proc`` (Linux; ``-1`` elsewhere).

Imports nothing but the standard library, so Dask workers can run these functions (``Client.run``) without
importing torch or the rest of w2w. Used by the Dask engine's per-worker report and by the benchmarks.
"""
from __future__ import annotations

import re

__all__ = ["status_bytes", "read_bytes", "reset_peak", "snapshot"]


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM`` = peak RSS, ...), or -1."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) * 1024 if match else -1
    except OSError:
        return -1


def read_bytes() -> int:
    """Bytes this process has read through read()-like calls since it started (``rchar``: page-cache hits
    included, sockets excluded), or -1."""
    try:
        with open("/proc/self/io") as f:
            match = re.search(r"^rchar:\s+(\d+)", f.read(), re.M)
        return int(match.group(1)) if match else -1
    except OSError:
        return -1


def reset_peak() -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux >= 4.0; silently nothing elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def snapshot() -> dict[str, int]:
    """{"rss", "peak_rss", "read_bytes"} of this process, in bytes (-1 when unknown)."""
    return {"rss": status_bytes("VmRSS"), "peak_rss": status_bytes("VmHWM"), "read_bytes": read_bytes()}
