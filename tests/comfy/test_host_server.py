"""The real ComfyUI as a server: demo/run.py posts graphs over loopback HTTP and reports errors per node."""
from __future__ import annotations

import json

import pytest

from comfyhost import load_stock_graph, png_pixels
from demo import run as demo_run
from w2w.convert import convert_release
from w2w.synthetic import write_release


@pytest.mark.slow
def test_server_rejects_an_invalid_graph_with_per_node_errors(comfyui_path, sd15_standin, tmp_path):
    graph = load_stock_graph(sd15_standin.name)
    graph["3"]["inputs"]["steps"] = 0
    with pytest.raises(demo_run.DemoError, match=r"node 3 \(KSampler\).*steps"):
        demo_run.run_demo(graph, comfyui_path, tmp_path / "out", stage=[("checkpoints", sd15_standin)], timeout=120)


@pytest.mark.slow
def test_demo_cli_runs_the_stock_graph_on_the_server_with_the_standin(comfyui_path, sd15_standin, tmp_path, capsys):
    models = tmp_path / "models"  # no real files: the graph's checkpoint must be replaced, loudly
    (models / "checkpoints").mkdir(parents=True)
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(load_stock_graph("not-here.safetensors")))

    code = demo_run.main(["--graph", str(graph), "--models", str(models), "--out", str(tmp_path / "out"),
                          "--comfyui", str(comfyui_path), "--timeout", "1200"])

    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "STAND-INS IN USE" in printed and "not-here.safetensors not found" in printed
    images = sorted((tmp_path / "out").glob("*.png"))
    assert len(images) == 1
    pixels = png_pixels(images[0])
    assert pixels.shape == (64, 64, 3) and pixels.float().std() > 1.0


# ---------------------------------------------------------------------------------------------- the demo command
@pytest.mark.slow
def test_demo_command_runs_the_graph_on_the_server_and_prefers_real_files(comfyui_path, sd15_standin, tmp_path,
                                                                           capsys):
    """`python -m demo` with a user's space file present (ours, under the real name) and no checkpoint."""
    from demo import cli

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    release = tmp_path / "release"
    write_release(str(release), pcs=16, models=100, seed=4, weight_scale=0.02)
    (models / "w2w").mkdir()
    convert_release(str(release), str(models / "w2w" / "weights2weights.safetensors"))

    code = cli.main(["--comfyui", str(comfyui_path), "--models", str(models), "--out", str(tmp_path / "out"),
                     "--timeout", "900"])

    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "STAND-INS IN USE" in printed and "realisticVisionV51_v51VAE.safetensors not found" in printed
    assert "w2w/weights2weights.safetensors not found" not in printed  # the user's space is used as is
    images = sorted((tmp_path / "out").glob("w2w-demo_*.png"))
    assert len(images) == 1
    from PIL import Image

    assert Image.open(images[0]).size == (64, 64)
