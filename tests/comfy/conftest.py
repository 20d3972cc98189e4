"""Fixtures for tests that run against a real ComfyUI.

ComfyUI is found by `demo.locate.find_comfyui()` ($COMFYUI_PATH, a ComfyUI checkout containing this
pack, then ~/ComfyUI); without it every test that asks for these fixtures is skipped with a reason
that says how to provide it. The in-process host imports ComfyUI into the pytest process for good
(see comfyhost.py): run this directory in one process (no pytest-xdist / --forked splitting).

Fixtures (all session-scoped unless noted):
- `comfyui_path` -> Path of the ComfyUI checkout.
- `sd15_standin` -> Path of the cached random-weight SD1.5 checkpoint (built once per cache).
- `comfy_host` -> comfyhost.ComfyHost: ComfyUI imported in-process with `--cpu`, this pack in
  custom_nodes, the stand-in staged as models/checkpoints/<SD15_STANDIN_NAME>. Main calls:
  `run_graph(graph, check=True, executor=None) -> GraphResult` (validate + PromptExecutor, i.e.
  under inference_mode; `executor=comfy_host.shared_executor` keeps the output cache between runs),
  `validate(graph)`, `stage_model(kind, path, name=None)`, `node_class(id)`, `register_node(id, cls)`,
  `pack_module("w2w.space")` (the pack's own copy of a core module), `pack_import_errors`,
  `pack_node_ids`, `unload_models()`.
- `stock_graph` (function scope) -> a fresh copy of demo/graphs/sd15_stock.json pointing at the stand-in.
Helpers to import from `comfyhost`: SD15_STANDIN_NAME, load_stock_graph(ckpt_name), png_pixels(path),
GraphError, GraphResult.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from demo import standins
from demo.locate import HOW_TO_PROVIDE, PACK_DIRNAME, find_comfyui, pack_root
from comfyhost import SD15_STANDIN_NAME, load_stock_graph


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs the real host (it uses `comfyui_path`, directly or not) as `comfy`."""
    for item in items:
        if "comfyui_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    try:
        path = find_comfyui()
    except ValueError as error:  # COMFYUI_PATH set to something that is not ComfyUI: a mistake to fix
        pytest.fail(str(error))
    if path is None:
        pytest.skip("ComfyUI not found; to run the tests against the real host, " + HOW_TO_PROVIDE)
    return path


@pytest.fixture(scope="session")
def sd15_standin(comfyui_path) -> Path:
    return standins.ensure_sd15_standin(comfyui_path)


@pytest.fixture(scope="session")
def comfy_host(comfyui_path, sd15_standin, tmp_path_factory):
    from comfyhost import ComfyHost  # imports ComfyUI only when started

    host = ComfyHost.start(comfyui_path, tmp_path_factory.mktemp("comfy-base"), pack_root(), PACK_DIRNAME)
    host.stage_model("checkpoints", sd15_standin, SD15_STANDIN_NAME)
    yield host
    host.unload_models()


@pytest.fixture(scope="module", autouse=True)
def release_models_after_each_module():
    """After a test module (and its module-scoped results) is done, drop every model the in-process host loaded, so
    that modules never stack full-size UNets in memory."""
    yield
    import comfyhost

    if comfyhost._STARTED is not None:
        comfyhost._STARTED.unload_models()


@pytest.fixture(scope="module")
def float32_unet(comfy_host):
    """For a module whose checks are derived for float32 weights: the UNet is stored in float32 while it runs (the
    suite's default is float16 storage). Use with ``pytestmark = pytest.mark.usefixtures("float32_unet")``."""
    import comfy.cli_args

    args = comfy.cli_args.args
    before = args.fp16_unet
    comfy_host.unload_models()  # nothing loaded in the other dtype may be reused
    args.fp16_unet = False
    yield
    args.fp16_unet = before


@pytest.fixture
def stock_graph() -> dict:
    return load_stock_graph()
