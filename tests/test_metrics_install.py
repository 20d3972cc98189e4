"""Installing the ID score's extras never changes torch (facenet-pytorch's wheel pins torch<2.3, numpy<2, Pillow<10.3).

The slow test installs requirements-idscore.txt exactly as documented (``pip install --no-deps -r``) into a folder of
its own and checks that it brings nothing but facenet-pytorch and tqdm, and that facenet-pytorch from there detects a
face next to this interpreter's torch, numpy and Pillow. It needs the package index that pip is configured with.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-idscore.txt"
GUARDED = ("torch", "torchvision", "numpy", "pillow")
INSTALL = ["install", "--no-deps", "-r", str(REQUIREMENTS)]


def _requirement_lines() -> list[str]:
    return [line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _pip(python: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _skip_if_offline(result: subprocess.CompletedProcess) -> None:
    text = result.stdout + result.stderr
    if result.returncode and re.search(r"No matching distribution|Could not find a version|NewConnectionError|"
                                       r"Temporary failure in name resolution|Network is unreachable", text):
        pytest.skip(f"the package index is not reachable, cannot check a fresh install: {text.strip()[-300:]}")


def test_requirements_are_only_packages_safe_to_install_without_dependencies():
    lines = _requirement_lines()
    names = sorted(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0].lower() for line in lines)
    assert names == ["facenet-pytorch", "tqdm"], lines
    assert "facenet-pytorch==2.6.0" in lines  # the version whose parts were checked against torch 2.x / numpy 2
    assert "pip install --no-deps -r requirements-idscore.txt" in REQUIREMENTS.read_text()
    assert not any(name in GUARDED for name in names)


def test_facenet_pytorch_declares_the_pins_that_make_no_deps_necessary():
    try:
        requires = metadata.requires("facenet-pytorch") or []
    except metadata.PackageNotFoundError:
        pytest.skip("facenet-pytorch is not installed: pip install --no-deps -r requirements-idscore.txt")
    torch_pin = next(r for r in requires if r.replace(" ", "").startswith("torch<") or r.startswith("torch "))
    assert "<2.3" in torch_pin.replace(" ", ""), requires  # if this changes, revisit requirements-idscore.txt


def test_dry_run_of_the_documented_install_touches_nothing_guarded(tmp_path):
    report = tmp_path / "report.json"
    result = _pip(sys.executable, *INSTALL, "--dry-run", "--ignore-installed", "--report", str(report), "-q")
    _skip_if_offline(result)
    assert result.returncode == 0, result.stderr
    installed = sorted(item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"])
    assert installed == ["facenet-pytorch", "tqdm"], installed


@pytest.mark.slow
def test_fresh_install_keeps_torch_and_works(tmp_path):
    """The documented install, made into a folder of its own (``--target``) so that it works from any layout — system
    Python, a virtual environment (ComfyUI's recommended install) or conda — without touching the running one: it
    must bring only facenet-pytorch and tqdm, and facenet-pytorch from there must detect a face next to this
    interpreter's torch, numpy and Pillow."""
    target = tmp_path / "site"
    result = _pip(sys.executable, *INSTALL, "--target", str(target), "--no-cache-dir", "-q")
    _skip_if_offline(result)
    assert result.returncode == 0, result.stderr
    brought = sorted(re.split(r"-\d", p.name, maxsplit=1)[0].lower().replace("_", "-")
                     for p in target.glob("*.dist-info"))
    assert brought == ["facenet-pytorch", "tqdm"], brought

    check = textwrap.dedent("""
        import os, sys, numpy as np
        import facenet_pytorch
        assert os.path.realpath(facenet_pytorch.__file__).startswith(os.path.realpath(sys.argv[1])), facenet_pytorch.__file__
        from w2w.metrics.faces import FaceDetector
        from w2w.metrics.standins import draw_face
        face = FaceDetector().detect([np.asarray(draw_face())])[0]
        print("FACE", face is not None)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", check, str(target)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "FACE True" in out.stdout
