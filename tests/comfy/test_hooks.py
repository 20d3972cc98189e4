"""w2w Identity Hook in the real ComfyUI: an identity as HOOKS, combined with the stock hook nodes.

What must hold (stand-in SD1.5, CPU, 64×64, two Euler steps):
- unmasked, strength 1, on both conditionings: the latent of Apply w2w LoRA, and of Create Hook LoRA (MO) on the LoRA
  that Save w2w LoRA wrote;
- two identities under complementary masks: each half of the latent is closer to its own identity's single run;
- keyframes: the node's own switch (edited_identity) and the same switch built from stock keyframe nodes give Apply's
  delayed-injection latent; strength 0 everywhere gives the plain model's;
- downstream of a stock LoRA and next to a ControlNet on the same conditioning, hook = Apply;
- the input MODEL keeps no hook patches and its weights.
Relative tolerances are 1e-3 of the latent norm: the hook path and the baked path compute the same fp32 patch and
round it to the stored dtype the same way, so differences are float-ordering noise, orders of magnitude below the
distance between two identities (each test checks that distance, so that equality is not vacuous).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfyhost import SD15_STANDIN_NAME
from demo import standins
from w2w.convert import convert_release
from w2w.synthetic import write_release

PCS = 16
STEPS = 2  # Euler, "simple" schedule: sigmas 14.6 and 1.61; a switch at 30 % (sigma ~3) falls between them
SPACE_FILE = "w2w-hooks-space.safetensors"
CONTROLNET = "w2w-standin-controlnet.safetensors"
HINT = "w2w-hooks-hint.png"
TOLERANCE = 1e-3  # relative, see the module docstring


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def staged(comfy_host, comfyui_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("w2w-hooks")
    write_release(str(root / "release"), pcs=PCS, models=200, seed=7, weight_scale=0.05)
    convert_release(str(root / "release"), str(root / SPACE_FILE))
    comfy_host.stage_model("w2w", root / SPACE_FILE, SPACE_FILE)
    comfy_host.stage_model("controlnet", standins.ensure_controlnet_standin(comfyui_path), CONTROLNET)
    gen = np.random.default_rng(0)
    Image.fromarray(gen.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(comfy_host.base_dir / "input" / HINT)
    return root


@pytest.fixture(scope="module")
def run(comfy_host, staged):
    """Run a graph with the module's executor (the checkpoint is loaded once); returns the sampled latent."""
    executor = comfy_host.new_executor()

    def _run(graph: dict) -> torch.Tensor:
        return comfy_host.run_graph(graph, executor=executor).output("sampler", 0)["samples"].clone()
    _run.executor = executor  # for a test that needs the whole GraphResult: one checkpoint in memory, not two
    return _run


@pytest.fixture(scope="module")
def saved_loras(comfy_host, staged):
    """Identities a and b saved with Save w2w LoRA (float32): their names in the loras folder."""
    import folder_paths

    graph = base_graph()
    for who in ("a", "b"):
        graph[f"save_{who}"] = {"class_type": "W2WSaveLoRA", "inputs": {
            "space": ["space", 0], "identity": [who, 0], "filename_prefix": f"w2w-hooks/{who}", "dtype": "float32"}}
    del graph["save"], graph["sampler"]
    comfy_host.run_graph(graph)
    folder_paths.filename_list_cache.clear()
    names = {who: [n for n in folder_paths.get_filename_list("loras") if n.startswith(f"w2w-hooks/{who}_")]
             for who in ("a", "b")}
    assert all(len(v) == 1 for v in names.values()), names
    return {who: v[0] for who, v in names.items()}


# ---------------------------------------------------------------------------------------------- graphs
def base_graph(seed: int = 5, steps: int = STEPS) -> dict:
    """Two sampled identities a, b of the space; plain model; one prompt; KSampler → SaveLatent."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_STANDIN_NAME}},
        "space": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE_FILE, "pcs": PCS}},
        # factor 3: two clearly different people, so that "closer to a than to b" is a strong statement
        "a": {"class_type": "W2WSampleIdentity", "inputs": {"space": ["space", 0], "seed": 11, "pcs": PCS,
                                                            "factor": 3.0}},
        "b": {"class_type": "W2WSampleIdentity", "inputs": {"space": ["space", 0], "seed": 12, "pcs": PCS,
                                                            "factor": 3.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "two people, sks person", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "low quality, blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "w2w-hooks"}},
    }


def with_apply(graph: dict, who: str, edited: str | None = None, edit_start: float = 0.3, model=("ckpt", 0)) -> dict:
    inputs = {"model": list(model), "space": ["space", 0], "identity": [who, 0], "strength": 1.0}
    if edited is not None:
        inputs.update(edited_identity=[edited, 0], edit_start=edit_start)
    graph["apply"] = {"class_type": "W2WApplyLoRA", "inputs": inputs}
    graph["sampler"]["inputs"]["model"] = ["apply", 0]
    return graph


def hook_node(graph: dict, name: str, who: str, edited: str | None = None, edit_start: float = 0.3) -> list:
    inputs = {"space": ["space", 0], "identity": [who, 0], "strength": 1.0}
    if edited is not None:
        inputs.update(edited_identity=[edited, 0], edit_start=edit_start)
    graph[name] = {"class_type": "W2WIdentityHook", "inputs": inputs}
    return [name, 0]


def with_hooks(graph: dict, hooks: list, mask: list | None = None, cond=("pos", "neg")) -> dict:
    """Cond Pair Set Props: ``hooks`` (and ``mask``) on the positive and negative conditioning."""
    inputs = {"positive_NEW": [cond[0], 0], "negative_NEW": [cond[1], 0], "strength": 1.0,
              "set_cond_area": "default", "hooks": hooks}
    if mask is not None:
        inputs["mask"] = mask
    graph["props"] = {"class_type": "PairConditioningSetProperties", "inputs": inputs}
    graph["sampler"]["inputs"]["positive"] = ["props", 0]
    graph["sampler"]["inputs"]["negative"] = ["props", 1]
    return graph


def keyframes(graph: dict, name: str, hooks: list, *points: tuple[float, float]) -> list:
    """Stock Create Hook Keyframe chain (strength, start_percent) + Set Hook Keyframes on ``hooks``."""
    previous = None
    for i, (strength, start) in enumerate(points):
        inputs = {"strength_mult": strength, "start_percent": start}
        if previous is not None:
            inputs["prev_hook_kf"] = previous
        graph[f"{name}_kf{i}"] = {"class_type": "CreateHookKeyframe", "inputs": inputs}
        previous = [f"{name}_kf{i}", 0]
    graph[name] = {"class_type": "SetHookKeyframes", "inputs": {"hooks": hooks, "hook_kf": previous}}
    return [name, 0]


def hooked_graph(who: str, edited: str | None = None, edit_start: float = 0.3, steps: int = STEPS) -> dict:
    graph = base_graph(steps=steps)
    return with_hooks(graph, hook_node(graph, "hook", who, edited, edit_start))


def half_masks(graph: dict) -> tuple[list, list]:
    """Left-half and right-half masks of the 64×64 image (stock SolidMask, MaskComposite, InvertMask)."""
    graph["zeros"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    graph["ones"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
    graph["left"] = {"class_type": "MaskComposite", "inputs": {"destination": ["zeros", 0], "source": ["ones", 0],
                                                               "x": 0, "y": 0, "operation": "add"}}
    graph["right"] = {"class_type": "InvertMask", "inputs": {"mask": ["left", 0]}}
    return ["left", 0], ["right", 0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- tests
def test_unmasked_hook_equals_apply_and_create_hook_lora_on_the_saved_lora(run, saved_loras):
    plain = run(base_graph())
    applied = run(with_apply(base_graph(), "a"))
    hooked = run(hooked_graph("a"))
    graph = base_graph()
    graph["lora_hook"] = {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": saved_loras["a"],
                                                                              "strength_model": 1.0}}
    stock = run(with_hooks(graph, ["lora_hook", 0]))
    assert relative(applied, plain) > 100 * TOLERANCE  # the identity changes the latent: equality below means something
    assert relative(hooked, applied) < TOLERANCE
    assert relative(stock, applied) < TOLERANCE


def test_two_identities_under_complementary_masks_each_own_their_half(comfy_host, run, sd15_standin):
    only_a, only_b = run(hooked_graph("a")), run(hooked_graph("b"))
    graph = base_graph()
    left, right = half_masks(graph)
    with_hooks(graph, hook_node(graph, "hook_a", "a"), mask=left)
    graph["props_b"] = {"class_type": "PairConditioningSetPropertiesAndCombine", "inputs": {
        "positive": ["props", 0], "negative": ["props", 1], "positive_NEW": ["pos", 0], "negative_NEW": ["neg", 0],
        "strength": 1.0, "set_cond_area": "default", "mask": right, "hooks": hook_node(graph, "hook_b", "b")}}
    graph["sampler"]["inputs"]["positive"] = ["props_b", 0]
    graph["sampler"]["inputs"]["negative"] = ["props_b", 1]
    result = comfy_host.run_graph(graph, executor=run.executor)
    both = result.output("sampler", 0)["samples"]
    halves = {"left": (..., slice(0, 4)), "right": (..., slice(4, 8))}  # latent 8×8: columns 0-3 | 4-7

    def distance(x, y, half):
        return float((x[halves[half]] - y[halves[half]]).norm())

    assert relative(only_a, only_b) > 10 * TOLERANCE
    assert distance(both, only_a, "left") < 0.5 * distance(both, only_b, "left")
    assert distance(both, only_b, "right") < 0.5 * distance(both, only_a, "right")

    model = result.output("ckpt", 0)  # the checkpoint's MODEL, which every graph of this module shares
    assert model.hook_patches == {}  # hooks are registered on the sampler's clone, never on the input MODEL
    comfy_host.unload_models()
    keys = [k for k in model.model.state_dict() if ".attn2.to_q." in k or ".attn1.to_v." in k]
    state = model.model.state_dict()
    with safe_open(str(sd15_standin), framework="pt") as f:
        changed = [k for k in keys if not torch.equal(state[k], f.get_tensor("model." + k).to(state[k].dtype))]
    assert len(keys) == 32 and changed == []


def test_keyframed_switch_equals_applys_delayed_injection(run):
    """Three "simple" steps (sigmas 14.6, 2.92, 0.93); edit_start 0.3 switches at sigma 3.33, i.e. for the last two.
    The switch moves the latent only a little on the random stand-in (its latents are large next to what one
    identity changes late in sampling), so equality is measured against what the switch itself changes: within 5 %
    of it; a missing, early, late or blended switch would be off by far more."""
    only_a = run(with_apply(base_graph(steps=3), "a"))
    switched = run(with_apply(base_graph(steps=3), "a", edited="b", edit_start=0.3))
    effect = relative(switched, only_a)
    assert effect > 1e-4  # the switch changes the latent by far more than float ordering does (measured ~1e-5)

    own = run(hooked_graph("a", edited="b", edit_start=0.3, steps=3))
    assert relative(own, switched) < 0.05 * effect

    graph = base_graph(steps=3)  # the same switch from stock nodes: a on until 30 %, b from 30 % on
    first = keyframes(graph, "kf_a", hook_node(graph, "hook_a", "a"), (1.0, 0.0), (0.0, 0.3))
    second = keyframes(graph, "kf_b", hook_node(graph, "hook_b", "b"), (0.0, 0.0), (1.0, 0.3))
    graph["both"] = {"class_type": "CombineHooks2", "inputs": {"hooks_A": first, "hooks_B": second}}
    stock = run(with_hooks(graph, ["both", 0]))
    assert relative(stock, switched) < 0.05 * effect


def test_strength_zero_everywhere_is_the_plain_model(run):
    plain = run(base_graph())
    graph = base_graph()
    silent = run(with_hooks(graph, keyframes(graph, "kf", hook_node(graph, "hook", "a"), (0.0, 0.0))))
    assert relative(silent, plain) < 1e-6


def test_hook_works_downstream_of_a_stock_lora_and_next_to_a_controlnet(run, saved_loras):
    def downstream(graph: dict, model: list) -> list:
        graph["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": list(model),
                                                                         "lora_name": saved_loras["b"],
                                                                         "strength_model": 0.5}}
        return ["lora", 0]

    def controlnet(graph: dict) -> None:
        graph["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
        graph["hint"] = {"class_type": "LoadImage", "inputs": {"image": HINT}}
        sampler = graph["sampler"]["inputs"]
        graph["cn_apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": sampler["positive"], "negative": sampler["negative"], "control_net": ["cn", 0],
            "image": ["hint", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        sampler["positive"], sampler["negative"] = ["cn_apply", 0], ["cn_apply", 1]

    graph = base_graph()
    applied_after_lora = run(with_apply(graph, "a", model=downstream(graph, ["ckpt", 0])))
    graph = base_graph()
    graph["sampler"]["inputs"]["model"] = downstream(graph, ["ckpt", 0])
    hooked_after_lora = run(with_hooks(graph, hook_node(graph, "hook", "a")))
    assert relative(applied_after_lora, run(with_apply(base_graph(), "a"))) > 10 * TOLERANCE  # the LoRA counts
    assert relative(hooked_after_lora, applied_after_lora) < TOLERANCE

    graph = with_apply(base_graph(), "a")
    controlnet(graph)
    applied_with_cn = run(graph)
    graph = hooked_graph("a")
    controlnet(graph)
    hooked_with_cn = run(graph)
    assert relative(applied_with_cn, run(with_apply(base_graph(), "a"))) > 10 * TOLERANCE  # the ControlNet counts
    assert relative(hooked_with_cn, applied_with_cn) < TOLERANCE


def test_a_hook_on_a_unet_the_space_does_not_fit_stops_the_sampler_with_applys_message(comfy_host, staged):
    """The host's hook registration drops the keys a MODEL lacks and ignores wrong shapes with a log line: without a
    check the identity would silently not be applied. The hook checks the targets when a sampler registers it and
    stops with the message Apply w2w LoRA gives; an SD1.5 MODEL registers as before (the graphs above)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import nodes
    from comfy_extras import nodes_hooks

    space = comfy_host.node_class("W2WLoadSpace").execute(SPACE_FILE, PCS).result[0]
    identity = comfy_host.node_class("W2WSampleIdentity").execute(space, 0, PCS, 1.0).result[0]
    config = dict(standins.SD15_UNET_CONFIG, model_channels=32, num_heads=4)  # SD-like, not SD1.5's shapes
    unet = comfy.supported_models.SD15(config).get_model({}, "")
    small = comfy.model_patcher.ModelPatcher(unet, mm.get_torch_device(), mm.unet_offload_device())
    with pytest.raises(ValueError, match="w2w spaces are for SD1.5 UNets") as applied:
        comfy_host.node_class("W2WApplyLoRA").execute(small, space, identity, 1.0)
    hooks = comfy_host.node_class("W2WIdentityHook").execute(space, identity, 1.0).result[0]
    cond = [[torch.zeros(1, 77, 768), {}]]
    positive, negative = nodes_hooks.PairConditioningSetProperties().set_properties(cond, cond, 1.0, "default",
                                                                                     hooks=hooks)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode(), pytest.raises(ValueError, match="w2w spaces are for SD1.5 UNets") as hooked:
        nodes.KSampler().sample(small, 5, 1, 2.0, "euler", "normal", positive, negative, latent, 1.0)
    assert str(hooked.value) == str(applied.value)
    assert small.patches == {} and not small.hook_patches
