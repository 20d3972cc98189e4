"""The real ComfyUI as an in-process host: the stand-in checkpoint, the ldm keys we patch, graph runs."""
from __future__ import annotations

import json

import pytest
import torch

from comfyhost import SD15_STANDIN_NAME, GraphError, load_stock_graph, png_pixels
from demo import standins

# The 16 SD1.5 transformer blocks (ldm names) and their channel width C, per ../shared/COMFYUI.md.
SD15_BLOCK_WIDTHS = {
    "input_blocks.1.1": 320, "input_blocks.2.1": 320, "input_blocks.4.1": 640, "input_blocks.5.1": 640,
    "input_blocks.7.1": 1280, "input_blocks.8.1": 1280, "middle_block.1": 1280,
    "output_blocks.3.1": 1280, "output_blocks.4.1": 1280, "output_blocks.5.1": 1280,
    "output_blocks.6.1": 640, "output_blocks.7.1": 640, "output_blocks.8.1": 640,
    "output_blocks.9.1": 320, "output_blocks.10.1": 320, "output_blocks.11.1": 320,
}
TEXT_DIM = 768  # CLIP-L hidden size: the input width of every attn2.to_k / to_v


def sd15_target_keys() -> dict[str, tuple[int, int]]:
    """The 64 w2w target weights as ComfyUI model keys -> expected (out, in) shape."""
    keys = {}
    for block, width in SD15_BLOCK_WIDTHS.items():
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_v"):
                fan_in = TEXT_DIM if (attn, proj) == ("attn2", "to_v") else width
                keys[f"diffusion_model.{block}.transformer_blocks.0.{attn}.{proj}.weight"] = (width, fan_in)
    return keys


@pytest.fixture(scope="class")
def stock_loaded(comfy_host):
    """(MODEL, CLIP, VAE) from the stock CheckpointLoaderSimple on the stand-in, for the tests of one class; freed
    after it, so that the graph runs below never hold a second checkpoint beside it."""
    loaded = comfy_host.node_class("CheckpointLoaderSimple")().load_checkpoint(SD15_STANDIN_NAME)
    yield loaded
    del loaded
    comfy_host.unload_models()


class TestStockLoader:
    """The stand-in through the stock loader, outside any graph."""

    def test_standin_loads_with_stock_loader_as_sd15(self, stock_loaded, sd15_standin):
        import comfy.supported_models
        import comfy.utils

        model, clip, vae = stock_loaded
        config = model.model.model_config
        assert type(config) is comfy.supported_models.SD15
        assert (config.unet_config["model_channels"], config.unet_config["context_dim"]) == (320, 768)
        assert clip is not None and vae is not None and vae.latent_channels == 4
        _, metadata = comfy.utils.load_torch_file(str(sd15_standin), return_metadata=True)
        assert "NOT a real model" in metadata["w2w.standin"]
        assert metadata["w2w.standin.version"] == str(standins.STANDIN_VERSION)

    def test_standin_tokens_encode_to_finite_conditioning(self, stock_loaded):
        _, clip, _ = stock_loaded
        cond = clip.encode_from_tokens(clip.tokenize("sks person"))
        assert cond.shape == (1, 77, TEXT_DIM)
        assert torch.isfinite(cond).all() and cond.std() > 0.1

    def test_the_64_target_weights_exist_with_the_expected_shapes(self, stock_loaded):
        state = stock_loaded[0].model_state_dict()
        expected = sd15_target_keys()
        assert len(expected) == 64
        found = {key: tuple(state[key].shape) for key in expected if key in state}
        assert sorted(set(expected) - set(found)) == []
        assert found == expected
        # Rank-1 factors A (1, in) and B (out, 1) over the 64 modules: the released 99,648-value vector.
        assert sum(out + fan_in for out, fan_in in expected.values()) == 99_648


def test_standin_init_is_deterministic_per_key():
    key, shape = "model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)
    first = standins._init_tensor(key, shape, 0, torch.float16)
    assert torch.equal(first, standins._init_tensor(key, shape, 0, torch.float16))
    assert not torch.equal(first, standins._init_tensor(key, shape, 1, torch.float16))
    assert not torch.equal(first, standins._init_tensor(key.replace("1.1", "2.1"), shape, 0, torch.float16))
    assert abs(first.float().std().item() - 320 ** -0.5) < 0.1 * 320 ** -0.5


class InferenceModeProbe:
    """A pass-through LATENT node that records the grad mode it runs under."""

    seen: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "probe"
    CATEGORY = "testing"

    def probe(self, samples):
        InferenceModeProbe.seen.append({"inference_mode": torch.is_inference_mode_enabled(),
                                        "latent_is_inference": samples["samples"].is_inference()})
        return (samples,)


def probed_stock_graph(seed: int = 5) -> dict:
    """The stock graph with InferenceModeProbe between KSampler (3) and VAEDecode (8)."""
    graph = load_stock_graph()
    graph["3"]["inputs"]["seed"] = seed
    graph["10"] = {"class_type": "W2WTestInferenceModeProbe", "inputs": {"samples": ["3", 0]}}
    graph["8"]["inputs"]["samples"] = ["10", 0]
    return graph


@pytest.fixture(scope="module")
def probed_run(comfy_host):
    """One in-process run of the probed stock graph on the session's shared executor, and what the probe saw."""
    comfy_host.unload_models()  # nothing loaded before (the stock loader's models above) stays beside this graph's
    comfy_host.register_node("W2WTestInferenceModeProbe", InferenceModeProbe)
    InferenceModeProbe.seen.clear()
    result = comfy_host.run_graph(probed_stock_graph(), executor=comfy_host.shared_executor)
    yield result, list(InferenceModeProbe.seen)
    comfy_host.unload_models()  # drops the shared executor's cached outputs too


def test_stock_graph_runs_in_process_under_inference_mode(probed_run):
    result, seen = probed_run
    assert seen == [{"inference_mode": True, "latent_is_inference": True}]
    image = result.output("8")  # VAEDecode IMAGE, (batch, H, W, C) in [0, 1]
    assert image.is_inference() and image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0.01  # random weights give noise, not a constant image
    files = result.image_files()
    assert len(files) == 1 and files[0].is_file()
    assert png_pixels(files[0]).shape == (64, 64, 3)


def test_shared_executor_caches_unchanged_nodes_like_the_server(comfy_host, probed_run):
    first, _ = probed_run
    InferenceModeProbe.seen.clear()
    second = comfy_host.run_graph(probed_stock_graph(seed=6), executor=comfy_host.shared_executor)
    cached = [data["nodes"] for event, data in second.messages if event == "execution_cached"][0]
    assert {"4", "5", "6", "7"} <= set(cached) and not {"3", "10", "8"} & set(cached)
    assert len(InferenceModeProbe.seen) == 1  # downstream of the changed seed: executed again
    assert not torch.equal(first.output("8"), second.output("8"))


def test_run_graph_leaves_the_callers_graph_as_it_was(comfy_host, probed_run):
    """ComfyUI writes into a graph it runs (each node's "is_changed"); the server parses every queued prompt anew. A
    graph reused by a test must reach the next run as the user wrote it, or fingerprints are frozen at the first run."""
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(comfy_host.base_dir / "input" / "w2w_smoke_red.png")
    graph = probed_stock_graph(seed=7)  # and a node with a fingerprint (LoadImage's IS_CHANGED hashes the file)
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "w2w_smoke_red.png"}}
    graph["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
    before = json.dumps(graph, sort_keys=True)
    comfy_host.run_graph(graph, executor=comfy_host.shared_executor)
    assert json.dumps(graph, sort_keys=True) == before


def test_pack_module_is_the_copy_comfyui_imported(comfy_host):
    import sys

    pack = comfy_host.pack_module()
    assert sys.modules[comfy_host.pack_module_name] is pack
    core = comfy_host.pack_module("w2w")
    assert core.__file__.startswith(str(comfy_host.base_dir / "custom_nodes" / comfy_host.pack_name))
    assert core is not sys.modules.get("w2w")  # not the copy tests import directly


def test_invalid_graph_reports_the_node(comfy_host, stock_graph):
    stock_graph["3"]["inputs"]["steps"] = 0  # KSampler steps has min 1
    with pytest.raises(GraphError) as caught:
        comfy_host.run_graph(stock_graph)
    assert "3" in caught.value.details["node_errors"]


def test_harness_speaks_both_executor_generations():
    """The harness against 0.38.1's executor API (read from its execution.py: cache_args with 'ram' and
    'ram_inactive', an async cache get returning CacheEntry(ui, outputs)) and 0.3.64's (no cache_args, a plain get)."""
    import types
    from typing import NamedTuple

    from comfyhost import cached_outputs, new_prompt_executor

    class CacheEntry(NamedTuple):
        ui: dict
        outputs: list

    class NewExecutor:
        def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
            self.cache_args = cache_args

    class OldExecutor:
        def __init__(self, server, cache_type=False):
            self.cache_type = cache_type

    class AsyncCache:
        async def get(self, node_id):
            return CacheEntry(ui={}, outputs=[["value"]]) if node_id == "1" else None

    class PlainCache:
        def get(self, node_id):
            return [["value"]] if node_id == "1" else None

    new = new_prompt_executor(types.SimpleNamespace(PromptExecutor=NewExecutor, CacheType=types.SimpleNamespace(
        CLASSIC="classic")), server=None)
    assert {"ram", "ram_inactive", "lru"} <= set(new.cache_args) and new.cache_args["ram"] == 0
    old = new_prompt_executor(types.SimpleNamespace(PromptExecutor=OldExecutor, CacheType=types.SimpleNamespace(
        CLASSIC="classic")), server=None)
    assert old.cache_type == "classic"
    assert cached_outputs(AsyncCache(), "1") == [["value"]] and cached_outputs(AsyncCache(), "2") is None
    assert cached_outputs(PlainCache(), "1") == [["value"]] and cached_outputs(PlainCache(), "2") is None
