"""W2WIDScore in a real ComfyUI: LoadImage -> w2w ID Score, per-pair report, crops, missing weights at validation."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

if importlib.util.find_spec("facenet_pytorch") is None:
    # under CI the suite's conftest turns this skip into a failure (the ID-score tier must run there)
    pytest.skip("facenet-pytorch is not installed: pip install --no-deps -r requirements-idscore.txt",
                allow_module_level=True)

from w2w.metrics.faces import FACENET_FILENAME  # noqa: E402
from w2w.metrics.standins import draw_face, save_random_facenet  # noqa: E402

NODE_ID = "W2WIDScore"


@pytest.fixture(scope="module")
def idscore_host(comfy_host, tmp_path_factory):
    """The host with random FaceNet weights staged as models/facenet/<released name> and two input images."""
    weights = save_random_facenet(str(tmp_path_factory.mktemp("facenet") / FACENET_FILENAME), seed=5)
    comfy_host.stage_model("facenet", weights, FACENET_FILENAME)
    inputs = comfy_host.base_dir / "input"
    draw_face().save(inputs / "w2w_idscore_face.png")
    Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(inputs / "w2w_idscore_blank.png")
    if NODE_ID not in comfy_host.pack_node_ids:  # not yet listed in nodes.FEATURES: load the module directly
        package = str(comfy_host.base_dir / "custom_nodes" / comfy_host.pack_name).replace(".", "_x_")
        node = importlib.import_module(f"{package}.nodes.idscore").W2WIDScore
        node.GET_SCHEMA()
        comfy_host.register_node(NODE_ID, node)
    return comfy_host


def _graph(weights_choice: str | None = "auto") -> dict:
    score_inputs = {"reference": ["1", 0], "generated": ["3", 0]}
    if weights_choice is not None:
        score_inputs["facenet_weights"] = weights_choice
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "w2w_idscore_face.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "w2w_idscore_blank.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": NODE_ID, "inputs": score_inputs},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}},
    }


def test_node_is_registered_by_the_pack(comfy_host):
    assert NODE_ID in comfy_host.pack_node_ids, (
        f"{NODE_ID} is not registered: add 'idscore' to FEATURES in nodes/__init__.py")


@pytest.mark.parametrize("choice", ["auto", FACENET_FILENAME, None])
def test_graph_scores_each_pair_and_reports_the_missing_face(idscore_host, choice):
    result = idscore_host.run_graph(_graph(choice))
    mean, report, crops = (result.output("4", i) for i in range(3))
    assert abs(mean - 1.0) < 1e-5  # the face against itself; the blank pair is left out of the mean
    lines = report.splitlines()
    assert "1 of 2 pairs" in lines[0]
    assert lines[2].endswith("reference 0 -> generated 0  ok")
    assert lines[3].endswith("reference 0 -> generated 1  no face in generated")
    assert tuple(crops.shape) == (2, 160, 320, 3)
    assert float(crops.min()) >= 0.0 and float(crops.max()) <= 1.0
    assert any(p.name.startswith("ComfyUI_temp_") for p in result.image_files())  # the PreviewImage of the crops


def test_scorer_is_a_model_comfyui_unloads_and_unload_after_frees_it_at_once(idscore_host):
    """The MTCNN + FaceNet networks are loaded through ComfyUI's model management: listed among its loaded models after
    a score, gone after Unload Models (unload_all_models, what the /free route calls); with unload_after they are
    gone as soon as the score is computed, and the scorer itself is forgotten."""
    import comfy.model_management as mm

    package = str(idscore_host.base_dir / "custom_nodes" / idscore_host.pack_name).replace(".", "_x_")
    node_module = importlib.import_module(f"{package}.nodes.idscore")
    scores = importlib.import_module(f"{package}.w2w.metrics.idscore")

    def ours_loaded() -> int:
        return sum(1 for m in mm.current_loaded_models if any(m.model is p for p in node_module._PATCHERS.values()))

    idscore_host.run_graph(_graph())
    assert ours_loaded() == 1 and len(scores._SCORER_CACHE) == 1
    mm.unload_all_models()
    assert ours_loaded() == 0
    graph = _graph()
    graph["4"]["inputs"]["unload_after"] = True
    result = idscore_host.run_graph(graph)
    assert abs(result.output("4", 0) - 1.0) < 1e-5  # scored as before
    assert ours_loaded() == 0 and node_module._PATCHERS == {} and scores._SCORER_CACHE == {}


def test_no_face_anywhere_gives_nan_and_says_so(idscore_host):
    graph = _graph()
    graph["1"]["inputs"]["image"] = "w2w_idscore_blank.png"
    result = idscore_host.run_graph(graph)
    assert math.isnan(result.output("4", 0))
    assert "no mean" in result.output("4", 1)


def test_missing_weights_fail_validation_with_the_fix(idscore_host, tmp_path, monkeypatch):
    staged = idscore_host.models_dir / "facenet" / FACENET_FILENAME
    target = os.readlink(staged)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    os.unlink(staged)
    try:
        import folder_paths
        folder_paths.filename_list_cache.clear()
        valid, error, _outputs, node_errors = idscore_host.validate(_graph())
    finally:
        idscore_host.stage_model("facenet", target, FACENET_FILENAME)
    assert not valid
    details = " ".join(e["details"] for e in node_errors["4"]["errors"])
    assert FACENET_FILENAME in details and "107 MiB" in details and "models/facenet" in details
    assert "Nothing is downloaded" in details


def test_schema_has_tooltips_and_description(idscore_host):
    import nodes

    schema = nodes.NODE_CLASS_MAPPINGS[NODE_ID].GET_SCHEMA()
    assert schema.display_name == "w2w ID Score" and schema.category == "w2w/metrics" and schema.description
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [i.id for i in schema.inputs] == ["reference", "generated", "facenet_weights", "unload_after"]
    assert "w2w_idscore" not in sys.modules  # nothing leaked under a bare name


def test_evaluation_graphs_match_the_pack_nodes(idscore_host, tmp_path_factory):
    """benchmarks/eval_inversion.py builds its graphs by hand: they must validate against the nodes as they are."""
    from comfyhost import SD15_STANDIN_NAME

    from w2w.synthetic import write_release

    spec = importlib.util.spec_from_file_location("eval_inversion_graphs", idscore_host.pack_dir / "benchmarks" / "eval_inversion.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    space_dir = tmp_path_factory.mktemp("eval-space") / "eval-space"
    write_release(str(space_dir), pcs=8, models=16)
    idscore_host.stage_model("w2w", space_dir, "eval-space")
    cfg = bench.GraphSettings(checkpoint=SD15_STANDIN_NAME, space="eval-space/", space_pcs=8, preset="custom", pcs=8,
                              invert_steps=1, resolution=64, size=64, sampler_steps=1)
    jobs = [("sks person", 0), ("a photo of sks person", 1)]
    graphs = [bench.invert_graph(cfg, "w2w_idscore_face.png", "eval/x"),
              bench.generate_graph(cfg, "w2w_idscore_face.png", jobs, "eval/x"),
              bench.generate_graph(cfg, None, jobs, "eval/mean")]
    for graph in graphs:
        valid, error, outputs, node_errors = idscore_host.validate(graph)
        assert valid, (error, node_errors)
    assert graphs[0]["invert"] == graphs[1]["invert"]  # the same node and inputs: ComfyUI reuses the inversion
    assert {f"save_{j}" for j in range(len(jobs))} <= set(outputs)


def test_missing_facenet_pytorch_fails_validation_with_the_install_command(idscore_host, monkeypatch):
    for name in [m for m in sys.modules if m == "facenet_pytorch" or m.startswith("facenet_pytorch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import now raises ImportError
    valid, _error, _outputs, node_errors = idscore_host.validate(_graph())
    assert not valid
    details = " ".join(e["details"] for e in node_errors["4"]["errors"])
    assert "pip install --no-deps facenet-pytorch==2.6.0" in details
