"""Packaging and the pack's own commands, without ComfyUI: metadata, requirements, import safety, download, demo graph."""
from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

from w2w import cli
from demo.cli import build_parser as demo_parser, demo_graph
from w2w.space import load_space
from w2w.synthetic import write_release

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_requirements_txt_and_pyproject_list_the_same_dependencies(pyproject):
    assert sorted(requirement_lines(ROOT / "requirements.txt")) == sorted(pyproject["project"]["dependencies"])


def registry_archive_files() -> list[str]:
    """What comfy-cli's `comfy node pack` puts in the registry archive of this checkout: the git-tracked files minus
    the .comfyignore matches (evaluated by git itself with the same gitignore syntax)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the registry archive is made from the tracked files")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    ignored = subprocess.run(["git", "-c", f"core.excludesFile={ROOT / '.comfyignore'}", "check-ignore", "--no-index",
                              "--stdin"], cwd=ROOT, input="\n".join(tracked), capture_output=True, text=True).stdout
    return sorted(set(tracked) - set(ignored.split()))


def test_registry_archive_ships_what_users_run_and_no_development_files():
    files = registry_archive_files()
    tops = {f.split("/", 1)[0] for f in files}
    assert {"__init__.py", "nodes", "w2w", "web", "example_workflows", "demo", "docs", "README.md", "LICENSE",
            "pyproject.toml", "requirements.txt", "requirements-idscore.txt"} <= tops
    assert not {"tests", "benchmarks", "scripts", ".ci", "CONTRIBUTING.md"} & tops
    assert "nodes/__init__.py" in files and "web/js/w2w.js" in files
    assert any(f.startswith("models/micro/") and f.endswith(".safetensors") for f in files)  # python -m demo --micro


def test_torch_is_never_a_dependency(pyproject):
    names = [re.split(r"[<>=!~\[ ]", d)[0].lower() for d in pyproject["project"]["dependencies"]]
    assert not {"torch", "torchvision", "torchaudio", "facenet-pytorch"} & set(names)


def test_project_metadata_follows_the_registry_rules(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"}
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert "Repository" in project["urls"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert comfy["requires-comfyui"].startswith(">=0.3.64")


def test_pack_root_imports_without_comfyui():
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("w2w_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert inspect.iscoroutinefunction(module.comfy_entrypoint)
    assert not any(name.split(".")[0] in {"comfy", "comfy_api", "folder_paths", "nodes"}
                   for name in set(sys.modules) - before)


def test_cli_has_the_download_command_and_the_demo_its_own_entry_point():
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert "download" in set(choices) and "demo" not in set(choices)
    assert demo_parser().prog == "python -m demo"


def test_command_line_doc_lists_every_command_in_one_table():
    """docs/command-line.md: one unbroken table (a blank line would end it), a row naming each `python -m w2w`
    command."""
    text = (ROOT / "docs" / "command-line.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    assert rows and rows == list(range(rows[0], rows[-1] + 1))  # contiguous: no blank line inside the table
    cells = [lines[i].split("|")[1] for i in rows[2:]]  # first cell of each row after the header
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    for command in choices:
        assert any(re.search(rf"`{re.escape(command)}[ `]", cell) for cell in cells), f"{command} has no row"


# ---- download ------------------------------------------------------------------------------------------
def fake_hub(calls: list) -> types.ModuleType:
    """A stand-in huggingface_hub whose snapshot_download writes a synthetic release where the real one would."""
    hub = types.ModuleType("huggingface_hub")

    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None):
        calls.append({"repo_id": repo_id, "local_dir": local_dir, "allow_patterns": list(allow_patterns)})
        write_release(str(Path(local_dir) / "files"), pcs=8, models=40, seed=1)
        return local_dir

    hub.snapshot_download = snapshot_download
    return hub


def test_download_fetches_the_release_files_then_converts(tmp_path, monkeypatch):
    from w2w.download import DOWNLOAD_FILES, REPO_ID, download_and_convert

    calls: list = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(calls))
    folder, out = download_and_convert(tmp_path / "w2w")

    assert calls == [{"repo_id": REPO_ID, "local_dir": str(tmp_path / "w2w" / "weights2weights"),
                      "allow_patterns": [f"files/{name}" for name in DOWNLOAD_FILES]}]
    assert folder == tmp_path / "w2w" / "weights2weights" / "files"
    assert out == tmp_path / "w2w" / "weights2weights.safetensors"
    converted, released = load_space(str(out)), load_space(str(folder))
    assert converted.fingerprint == released.fingerprint and converted.pcs == 8
    assert torch.allclose(converted.components, released.components)


def test_download_without_huggingface_hub_says_what_to_install(tmp_path, monkeypatch):
    from w2w.download import download_release

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        download_release(tmp_path)


def test_download_cli_needs_a_destination_outside_comfyui(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    import w2w.download as download

    monkeypatch.setattr(download, "default_models_dir", lambda env=None: None)
    assert cli.main(["download"]) == 2
    assert "--dest" in capsys.readouterr().err


# ---- demo graph ------------------------------------------------------------------------------------------
def test_demo_graph_chains_load_sample_edit_apply_into_the_sampler():
    graph = demo_graph("ckpt.safetensors", "space.safetensors", 64, size=64, steps=1)
    kinds = {nid: node["class_type"] for nid, node in graph.items()}

    def source(nid, name):
        return kinds[graph[nid]["inputs"][name][0]]

    sampler = next(n for n, k in kinds.items() if k == "KSampler")
    apply = graph[sampler]["inputs"]["model"][0]
    assert kinds[apply] == "W2WApplyLoRA" and source(apply, "model") == "CheckpointLoaderSimple"
    edit = graph[apply]["inputs"]["identity"][0]
    assert kinds[edit] == "W2WApplyEditDirection" and source(edit, "identity") == "W2WSampleIdentity"
    assert {node["inputs"].get("pcs") for node in graph.values()} - {None} == {64}
    assert any(k == "SaveImage" for k in kinds.values())
