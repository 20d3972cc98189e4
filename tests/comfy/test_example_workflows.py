"""Every example workflow loads in the real ComfyUI with no missing nodes, validates, and (the cheap ones) runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_example_workflows as examples
from comfyhost import SD15_STANDIN_NAME
from w2w.convert import convert_release
from w2w.synthetic import write_release
from workflow_convert import FRONTEND_ONLY, ui_to_api

WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
TEST_SPACE = "w2w-workflow-space.safetensors"
PCS = 16


def test_every_example_workflow_exists():
    assert {p.stem for p in WORKFLOWS} == set(examples.WORKFLOWS)


@pytest.fixture(scope="module")
def staged(comfy_host, tmp_path_factory):
    """Stand-ins under the names the workflows use: space, ControlNet file (validation only) and pose image."""
    root = tmp_path_factory.mktemp("workflow-files")
    write_release(str(root / "release"), pcs=PCS, models=120, seed=7, weight_scale=0.02)
    convert_release(str(root / "release"), str(root / TEST_SPACE))
    comfy_host.stage_model("w2w", root / TEST_SPACE)
    (root / examples.CONTROLNET).write_bytes(b"")  # only its name is checked by validation
    comfy_host.stage_model("controlnet", root / examples.CONTROLNET)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(comfy_host.base_dir / "input" / examples.POSE_IMAGE)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(comfy_host.base_dir / "input" / examples.PHOTO)
    return root


def as_standins(graph: dict, pcs: int | None = None, size: int | None = None, steps: int | None = None) -> dict:
    renames = {examples.CKPT: SD15_STANDIN_NAME, examples.SPACE: TEST_SPACE}
    for node in graph.values():
        inputs = node["inputs"]
        for key, value in inputs.items():
            if isinstance(value, str) and value in renames:
                inputs[key] = renames[value]
        if pcs is not None and "pcs" in inputs:
            inputs["pcs"] = pcs
        if size is not None and node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        if steps is not None and node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return graph


def load_api(path: Path) -> dict:
    return ui_to_api(json.loads(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_no_missing_nodes_and_matches_its_source(comfy_host, path):
    import nodes

    workflow = json.loads(path.read_text(encoding="utf-8"))
    types = {n["type"] for n in workflow["nodes"]} - FRONTEND_ONLY
    assert sorted(t for t in types if t not in nodes.NODE_CLASS_MAPPINGS) == []
    assert load_api(path) == examples.WORKFLOWS[path.stem][0]()  # regenerate with make_example_workflows.py


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_in_comfyui(comfy_host, staged, path):
    valid, error, outputs, node_errors = comfy_host.validate(as_standins(load_api(path)))
    assert valid, (error, node_errors)
    assert outputs


def test_save_lora_workflow_runs_and_writes_a_lora_and_an_identity(comfy_host, staged):
    import folder_paths

    result = comfy_host.run_graph(as_standins(load_api(WORKFLOW_DIR / "w2w_save_lora.json"), pcs=PCS))
    texts = " ".join(str(ui) for ui in result.ui.values())
    assert "saved LoRA w2w/identity_" in texts and "saved identity w2w_identity_" in texts
    assert any(n.startswith("w2w/identity_") for n in folder_paths.get_filename_list("loras"))
    assert any(n.startswith("w2w_identity_") for n in folder_paths.get_filename_list("w2w_identities"))


@pytest.mark.slow
def test_sample_workflow_runs_at_a_small_size(comfy_host, staged):
    graph = as_standins(load_api(WORKFLOW_DIR / "w2w_sample_identity.json"), pcs=PCS, size=64, steps=1)
    result = comfy_host.run_graph(graph)
    files = result.image_files()
    assert len(files) == 1 and Image.open(files[0]).size == (64, 64)


def test_two_people_workflow_runs_at_a_small_size(comfy_host, staged):
    """Two hooked identities under the left/right masks of the example (768×512 masks, resized by ComfyUI)."""
    graph = as_standins(load_api(WORKFLOW_DIR / "w2w_two_people.json"), pcs=PCS, size=64, steps=1)
    result = comfy_host.run_graph(graph)
    files = result.image_files()
    assert len(files) == 1 and Image.open(files[0]).size == (64, 64)
