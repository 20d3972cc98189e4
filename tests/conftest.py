"""Markers shared by the whole suite, the CI rule for skips, and the run's summary (tiers that ran, peak memory).
Options and reporting only; fixtures live next to the tests that use them.

Under CI (the environment variable ``CI`` is set) a skip is a failure: a tier that cannot run (no ComfyUI, no browser,
no facenet-pytorch, no Dask) must turn CI red with its reason, never vanish from a green run. A test that may
legitimately skip there says why with ``@pytest.mark.ci_may_skip("reason")``. Locally skips stay, loud (``-ra``).
"""
from __future__ import annotations

import collections
import os
import resource
import sys

import pytest

# Tiers of the summary, by where a test lives: (label, predicate on the test's node id).
TIERS = (
    ("browser (headless Chromium + the real ComfyUI server)", lambda nid: "tests/comfy/test_browser.py" in nid),
    ("ID score (facenet-pytorch)", lambda nid: "idscore" in nid or "test_metrics" in nid),
    ("real host (ComfyUI)", lambda nid: "tests/comfy/" in nid),
    ("Dask engine", lambda nid: "dask" in nid),
    ("core", lambda nid: True),
)
_outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _under_ci() -> bool:
    return bool(os.environ.get("CI"))


def _tier(nodeid: str) -> str:
    return next(label for label, matches in TIERS if matches(nodeid))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip_under_ci(report, may_skip: bool) -> None:
    if report.skipped and _under_ci() and not may_skip and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"skipped, but CI is set and every tier must run here: {_skip_reason(report)} "
                           "(provide what is missing, or mark the test ci_may_skip with a reason)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    _fail_skip_under_ci(report, item.get_closest_marker("ci_may_skip") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_under_ci(outcome.get_result(), False)  # a module that skips itself at import: a whole tier missing


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[_tier(report.nodeid)][report.outcome] += 1


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy test (seconds to minutes on a CPU); still runs in CI, "
                                       "deselect locally with -m 'not slow'")
    config.addinivalue_line("markers", "comfy: needs a real ComfyUI (found via $COMFYUI_PATH, a ComfyUI checkout "
                                       "containing this pack, then ~/ComfyUI); skipped with a reason otherwise")
    config.addinivalue_line("markers", "ci_may_skip(reason): the test may skip even under CI, for the reason given")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): they
    run fastest so, above all on a shared CPU, and give the same bytes on every run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    terminalreporter.section("tiers that ran" + (" (CI: a skip is a failure)" if _under_ci() else ""))
    for label, _ in TIERS:
        counts = _outcomes.get(label)
        if counts:
            terminalreporter.write_line(f"{label}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    _, peak = _rss_mib()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    terminalreporter.write_line(f"memory: peak RSS of the test process {peak / 1024:.2f} GiB; largest child process "
                                f"(servers, builds) {children / 1024:.2f} GiB")
