"""The w2w nodes inside the real ComfyUI: loading, schema conventions, the end-to-end graph, exact weight patches,
equivalence with the stock LoraLoader, the untouched input MODEL, delayed injection and error messages.

One full-size random-weight SD1.5 stand-in is shared by the whole session (`comfy_host`); the space is a synthetic
one in the released layout (all 64 modules, 16 PCs), with weights large enough that every patch is visible.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors import safe_open

from comfyhost import SD15_STANDIN_NAME, GraphError
from demo.cli import demo_graph
from w2w.identity import Identity
from w2w.convert import convert_release
from w2w.space import load_space
from w2w.synthetic import write_release

# Patch exactness and the delayed-injection trajectory are checked to float32 rounding: the UNet is stored in float32
# for this module (the suite's default is float16 storage, see comfyhost.py).
pytestmark = pytest.mark.usefixtures("float32_unet")

PCS = 16
SPACE_FILE = "w2w-test-space.safetensors"
SPACE_DIR = "w2w-test-release"
CATEGORIES = {"w2w/space", "w2w/identity", "w2w/inversion", "w2w/vae", "w2w/metrics"}
NODE_IDS = {"W2WLoadSpace", "W2WSampleIdentity", "W2WApplyEditDirection", "W2WBlendIdentities", "W2WSaveIdentity",
            "W2WLoadIdentity", "W2WSaveLoRA", "W2WApplyLoRA", "W2WIdentityHook"}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def space_files(comfy_host, tmp_path_factory):
    """A synthetic released-files folder and its conversion, staged in models/w2w; returns (folder, file)."""
    root = tmp_path_factory.mktemp("w2w-space")
    release = root / SPACE_DIR
    write_release(str(release), pcs=PCS, models=200, seed=3, weight_scale=0.05)
    converted = root / SPACE_FILE
    convert_release(str(release), str(converted))
    comfy_host.stage_model("w2w", release, SPACE_DIR)
    comfy_host.stage_model("w2w", converted, SPACE_FILE)
    return release, converted


@pytest.fixture(scope="module")
def reference_space(space_files):
    """The same space loaded by the test process's own copy of the core (not the pack's)."""
    return load_space(str(space_files[1]), PCS)


def graph_with_lora_save() -> dict:
    graph = demo_graph(SD15_STANDIN_NAME, SPACE_FILE, PCS, size=64, steps=1, attribute="Male", strength=1.5,
                       prefix="w2w-test")
    graph["4"]["inputs"]["debias"] = "Young"
    graph["12"] = {"class_type": "W2WSaveLoRA", "inputs": {"space": ["2", 0], "identity": ["4", 0],
                                                           "filename_prefix": "w2w-test/edited", "dtype": "float32"}}
    return graph


@pytest.fixture(scope="module")
def e2e(comfy_host, space_files):
    """CheckpointLoader → Load Space → Sample → Edit → Apply → KSampler → VAEDecode (+ Save LoRA), run once."""
    return comfy_host.run_graph(graph_with_lora_save())


def combo_options(comfy_host, node_id: str, name: str) -> list[str]:
    """The choices ComfyUI offers for a combo input (as /object_info reports them)."""
    kind, info = comfy_host.node_class(node_id).INPUT_TYPES()["required"][name][:2]
    return list(kind) if isinstance(kind, (list, tuple)) else list(info["options"])


def target_keys(space) -> list[str]:
    return [slot.comfy_key for slot in space.layout.modules]


def checkpoint_weights(path, keys) -> dict[str, torch.Tensor]:
    """The 64 base weights straight from the checkpoint file (ldm keys under 'model.')."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor("model." + k) for k in keys}


def loaded_weights(patcher, keys) -> dict[str, torch.Tensor]:
    """Load `patcher` as KSampler would and copy the weights it leaves in the model."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    state = patcher.model.state_dict()
    return {k: state[k].detach().clone() for k in keys}


def tolerance(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound: two roundings to `dtype` (base cast + patched result) plus fp32 sum error."""
    return 2 * torch.finfo(dtype).eps * reference.abs() + 4 * torch.finfo(torch.float32).eps * reference.abs() + 1e-12


# ---------------------------------------------------------------------------------------------- loading
def test_pack_loads_without_import_errors_and_registers_every_node(comfy_host):
    assert comfy_host.pack_import_errors == []
    assert NODE_IDS <= set(comfy_host.pack_node_ids)


@pytest.mark.parametrize("node_id", sorted(NODE_IDS))
def test_every_node_has_a_description_category_and_input_tooltips(comfy_host, node_id):
    node = comfy_host.node_class(node_id)
    schema = node.GET_SCHEMA()
    assert schema.node_id.startswith("W2W") and schema.category in CATEGORIES
    assert len(schema.description) > 40
    assert schema.display_name
    for item in schema.inputs:
        assert item.tooltip and len(item.tooltip) > 15, f"{node_id}.{item.id} lacks a tooltip"
    for item in schema.outputs:
        assert item.tooltip, f"{node_id} output {item.display_name} lacks a tooltip"


def test_every_node_of_the_pack_follows_the_conventions(comfy_host):
    """All W2W* nodes, whichever feature module defines them: prefixed id, category, description, tooltips."""
    problems = []
    for node_id in comfy_host.pack_node_ids:
        schema = comfy_host.node_class(node_id).GET_SCHEMA()
        if not (node_id.startswith("W2W") and schema.category in CATEGORIES and schema.description):
            problems.append(f"{node_id}: id/category/description")
        problems += [f"{node_id}.{i.id}: no tooltip" for i in schema.inputs if not i.tooltip]
    assert problems == []


def test_nodes_sit_in_nested_categories_and_flag_experimental_and_advanced_inputs(comfy_host):
    """Add Node menu w2w/<group>; VAE-w2w nodes (never trained on the released space) are experimental; the custom
    preset's and expert inputs are advanced; everything else is neither."""
    expected = {"W2WLoadSpace": "w2w/space", "W2WSampleIdentity": "w2w/identity", "W2WApplyLoRA": "w2w/identity",
                "W2WIdentityHook": "w2w/identity",
                "W2WInvertImage": "w2w/inversion", "W2WVAEInvert": "w2w/inversion", "W2WVAEDecode": "w2w/vae",
                "W2WIDScore": "w2w/metrics"}
    schemas = {node_id: comfy_host.node_class(node_id).GET_SCHEMA() for node_id in comfy_host.pack_node_ids}
    assert {k: schemas[k].category for k in expected} == expected
    assert sorted(k for k, s in schemas.items() if s.is_experimental) == sorted(
        k for k in schemas if k.startswith("W2WVAE"))
    advanced = {(k, i.id) for k, s in schemas.items() for i in s.inputs if i.as_dict().get("advanced")}
    assert {("W2WInvertImage", name) for name in ("pcs", "steps", "lr", "resolution", "precision")} <= advanced
    assert not {(k, i) for k, i in advanced if i in ("image", "space", "model", "seed", "preset", "identity")}


def test_model_folders_list_the_converted_space_and_the_released_folder(comfy_host, space_files):
    import folder_paths

    assert str(comfy_host.models_dir / "w2w") in folder_paths.get_folder_paths("w2w")
    assert str(comfy_host.models_dir / "w2w" / "identities") in folder_paths.get_folder_paths("w2w_identities")
    choices = combo_options(comfy_host, "W2WLoadSpace", "space")
    assert SPACE_FILE in choices and SPACE_DIR + "/" in choices


def test_space_names_cannot_leave_the_model_folder_and_files_being_written_are_not_offered(comfy_host, space_files,
                                                                                          tmp_path):
    """The folder branch of a space name is joined by the pack itself (ComfyUI cleans only file names), and the
    Load node skips ComfyUI's list check (it validates its own input): '..', '.', empty parts and absolute paths are
    refused before any disk access, even where the folder exists. A hidden file (a write in progress) is never a
    choice."""
    import folder_paths

    load = comfy_host.node_class("W2WLoadSpace")
    outside = tmp_path / "outside"
    write_release(str(outside), pcs=PCS, models=40, seed=5)
    w2w_root = folder_paths.get_folder_paths("w2w")[0]
    sneaky = os.path.relpath(outside, w2w_root).replace(os.sep, "/") + "/"
    assert sneaky.startswith("../") and os.path.isdir(os.path.join(w2w_root, sneaky))
    for name in (sneaky, str(outside) + "/", SPACE_DIR + "/../" + SPACE_DIR + "/", "./" + SPACE_DIR + "/",
                 SPACE_DIR + "//x/"):
        with pytest.raises(Exception, match="not the name of a folder inside the w2w model folder"):
            load.execute(name, PCS)
    hidden = os.path.join(w2w_root, ".w2w-test-space.safetensors.k3j2.partial")
    visible = os.path.join(w2w_root, ".being-written.safetensors")
    for path in (hidden, visible):
        with open(path, "wb") as f:
            f.write(b"half")
    try:
        choices = combo_options(comfy_host, "W2WLoadSpace", "space")
        assert SPACE_FILE in choices and not [c for c in choices if c.startswith(".")]
    finally:
        for path in (hidden, visible):
            os.remove(path)


def test_released_folder_and_converted_file_load_as_the_same_space(comfy_host, space_files):
    load = comfy_host.node_class("W2WLoadSpace")
    from_dir = load.execute(SPACE_DIR + "/", PCS).result[0]
    from_file = load.execute(SPACE_FILE, PCS).result[0]
    assert from_dir.fingerprint == from_file.fingerprint
    assert torch.allclose(from_dir.components, from_file.components, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------- end to end
def test_graph_runs_end_to_end_under_inference_mode(e2e):
    image = e2e.output("10")
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.std()) > 0.01
    identity = e2e.output("4")
    assert identity.coefficients.is_inference()  # made inside the executor's torch.inference_mode()
    assert identity.history[0].startswith("sample seed=5") and identity.history[1].startswith("edit Male +1.5")
    assert len(e2e.image_files()) == 1


def test_apply_patches_exactly_the_64_targets_with_base_plus_27_BA(e2e, reference_space, sd15_standin):
    base, patched, identity = e2e.output("1"), e2e.output("5"), e2e.output("4")
    keys = target_keys(reference_space)
    assert len(keys) == 64
    assert sorted(patched.patches) == sorted(keys) and base.patches == {}

    weights = loaded_weights(patched, keys)
    file_weights = checkpoint_weights(sd15_standin, keys)
    deltas = reference_space.deltas(identity.coefficients.clone())  # {module: 27·B@A} float32, by the core
    for slot, key in zip(reference_space.layout.modules, keys):
        dtype = weights[key].dtype
        expected = file_weights[key].to(dtype).float() + deltas[slot.name]
        err = (weights[key].float() - expected).abs()
        assert bool((err <= tolerance(expected, dtype)).all()), f"{key}: max error {float(err.max()):.3g}"
        assert float(deltas[slot.name].abs().max()) > 1e-3  # the patch is visible, not lost in rounding


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_stock_lora_loader_on_the_saved_lora_gives_the_same_weights(comfy_host, e2e, reference_space, strength):
    """Apply w2w LoRA at `strength` = the stock LoraLoader on the file Save w2w LoRA wrote, at the same strength."""
    import folder_paths

    base, space, identity = e2e.output("1"), e2e.output("2"), e2e.output("4")
    patched = comfy_host.node_class("W2WApplyLoRA").execute(base, space, identity, strength).result[0]
    names = [n for n in folder_paths.get_filename_list("loras") if n.startswith("w2w-test/edited_")]
    assert len(names) == 1, names
    (stock,) = comfy_host.node_class("LoraLoaderModelOnly")().load_lora_model_only(base, names[0], strength)
    keys = target_keys(reference_space)
    assert sorted(stock.patches) == sorted(keys)
    ours, theirs = loaded_weights(patched, keys), loaded_weights(stock, keys)
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in keys)
    assert worst <= 1e-6, f"max difference {worst:.3g}"  # the same LoRA adapter math on the same float32 weights
    file_weights = checkpoint_weights(comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME, keys)
    moved = max(float((ours[k].float() - file_weights[k].float()).abs().max()) for k in keys)
    assert moved > 1e-3  # the strength reached the weights (0 would leave them as in the file)


def test_plain_apply_adds_no_per_call_weight_function(comfy_host, e2e, reference_space):
    """Apply's patches are baked when the model loads: no module recomputes its weight at each UNet call (delayed
    injection is the one feature that does, on the 64 targets only)."""
    import comfy.model_management as mm

    base, space, first, second = e2e.output("1"), e2e.output("2"), e2e.output("3"), e2e.output("4")
    apply = comfy_host.node_class("W2WApplyLoRA")

    def per_call_functions(model) -> int:
        mm.load_models_gpu([model], force_full_load=True)
        try:
            return sum(1 for m in model.model.modules()
                       if getattr(m, "weight_function", None) or getattr(m, "bias_function", None))
        finally:
            mm.unload_all_models()

    assert per_call_functions(apply.execute(base, space, second, 1.0).result[0]) == 0
    assert per_call_functions(apply.execute(base, space, first, 1.0, second, 0.3).result[0]) == 64


def test_a_stock_lora_downstream_adds_to_the_w2w_patch(comfy_host, e2e, reference_space, sd15_standin):
    import folder_paths

    patched = e2e.output("5")
    name = next(n for n in folder_paths.get_filename_list("loras") if n.startswith("w2w-test/edited_"))
    (stacked,) = comfy_host.node_class("LoraLoaderModelOnly")().load_lora_model_only(patched, name, 0.5)
    keys = target_keys(reference_space)
    weights = loaded_weights(stacked, keys)
    file_weights = checkpoint_weights(sd15_standin, keys)
    deltas = reference_space.deltas(e2e.output("4").coefficients.clone())
    for slot, key in zip(reference_space.layout.modules, keys):
        dtype = weights[key].dtype
        base = file_weights[key].to(dtype).float()
        expected = base + 1.5 * deltas[slot.name]  # w2w at 1.0, then the same identity as a stock LoRA at 0.5
        err = (weights[key].float() - expected).abs()
        # two sequential float32 additions: a few ulps of the largest operand
        bound = tolerance(expected, dtype) + 4 * torch.finfo(torch.float32).eps * (base.abs() + deltas[slot.name].abs())
        assert bool((err <= bound).all()), f"{key}: max error {float(err.max()):.3g}"
    assert len(patched.patches[keys[0]]) == 1  # the w2w MODEL itself still has only its own patch


def test_input_model_is_bit_identical_after_apply(e2e, reference_space, sd15_standin):
    base, patched = e2e.output("1"), e2e.output("5")
    keys = target_keys(reference_space)
    loaded_weights(patched, keys)  # the clone was loaded (patched in place) at least once
    after = loaded_weights(base, keys)
    file_weights = checkpoint_weights(sd15_standin, keys)
    for key in keys:
        assert torch.equal(after[key], file_weights[key].to(after[key].dtype)), key
    assert base.patches == {} and base.weight_wrapper_patches == {}
    assert patched.model is base.model  # a clone shares the module: only patches differ


# ---------------------------------------------------------------------------------------------- errors
def test_non_sd15_model_is_a_clear_error_and_stays_unpatched(comfy_host, e2e):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    class TinyXL(torch.nn.Module):  # SDXL-like: its first transformer block is at input_blocks.4
        def __init__(self):
            super().__init__()
            self.model_config = comfy.supported_models.SDXL({"model_channels": 320, "context_dim": 2048,
                                                              "adm_in_channels": 2816, "use_linear_in_transformer": True})
            self.diffusion_model = torch.nn.Module()
            self.diffusion_model.proj = torch.nn.Linear(640, 640)

    model = comfy.model_patcher.ModelPatcher(TinyXL(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"w2w spaces are for SD1\.5 UNets; this MODEL is SDXL"):
        comfy_host.node_class("W2WApplyLoRA").execute(model, e2e.output("2"), e2e.output("4"), 1.0)
    assert model.patches == {}


def test_missing_space_names_the_file_the_folder_and_the_download_command(comfy_host, e2e):
    graph = graph_with_lora_save()
    graph["2"]["inputs"]["space"] = "not-downloaded.safetensors"
    with pytest.raises(GraphError) as caught:
        comfy_host.run_graph(graph)
    message = str(caught.value)
    assert "not-downloaded.safetensors" in message and "python -m w2w download" in message
    assert str(comfy_host.models_dir / "w2w") in message


def test_identity_from_another_space_is_refused(comfy_host, e2e):
    stranger = Identity(torch.zeros(PCS), "0123456789abcdef")
    with pytest.raises(ValueError, match="belongs to space 0123456789abcdef"):
        comfy_host.node_class("W2WApplyLoRA").execute(e2e.output("1"), e2e.output("2"), stranger, 1.0)


def test_unknown_attribute_lists_the_space_attributes(comfy_host, e2e):
    node = comfy_host.node_class("W2WApplyEditDirection")
    with pytest.raises(ValueError, match=r"'Wavy_Hair' is not available.*Male"):
        node.execute(e2e.output("2"), e2e.output("3"), "Wavy_Hair", 1.0)


def test_a_misspelled_debias_name_is_named_as_such(comfy_host, e2e):
    node = comfy_host.node_class("W2WApplyEditDirection")
    with pytest.raises(ValueError, match=r"debias names 'Yung', not attribute.*Young.*correct the spelling"):
        node.execute(e2e.output("2"), e2e.output("3"), "Male", 1.0, debias="Yung, Eyeglasses")


@pytest.mark.parametrize("node_id, values", [
    ("W2WApplyLoRA", {"strength": float("nan")}), ("W2WApplyLoRA", {"edit_start": float("nan")}),
    ("W2WIdentityHook", {"strength": float("nan")}), ("W2WIdentityHook", {"edit_start": float("inf")}),
    ("W2WApplyEditDirection", {"strength": float("nan")}), ("W2WBlendIdentities", {"t": float("nan")}),
    ("W2WSampleIdentity", {"factor": float("nan")}), ("W2WApplyLoRA", {"strength": 6.0}),
])
def test_a_non_finite_or_out_of_range_number_is_refused_naming_the_input(comfy_host, e2e, node_id, values):
    """NaN passes ComfyUI's range check when a prompt is queued (it compares False both ways) and an API client can
    send it: the node names the input and its range instead of drawing NaN latents or failing in the sampler."""
    model, space, identity = e2e.output("1"), e2e.output("2"), e2e.output("4")
    args = {"W2WApplyLoRA": dict(model=model, space=space, identity=identity, strength=1.0, edited_identity=identity),
            "W2WIdentityHook": dict(space=space, identity=identity, strength=1.0, edited_identity=identity),
            "W2WApplyEditDirection": dict(space=space, identity=identity, attribute="Male", strength=1.0),
            "W2WBlendIdentities": dict(space=space, identity_a=identity, identity_b=identity, t=0.5),
            "W2WSampleIdentity": dict(space=space, seed=0, pcs=PCS, factor=1.0)}[node_id]
    (name, value), = values.items()
    with pytest.raises(ValueError, match=rf"{name} must be a finite number \(from .* to .*\), got {value}"):
        comfy_host.node_class(node_id).execute(**{**args, **values})
    patches = dict(model.patches)
    comfy_host.node_class(node_id).execute(**args)  # the same inputs with a good number run
    assert model.patches == patches


# ---------------------------------------------------------------------------------------------- identities
def test_save_and_load_identity_round_trip(comfy_host, e2e):
    import folder_paths

    identity = e2e.output("4")
    out = comfy_host.node_class("W2WSaveIdentity").execute(identity, "w2w-test/roundtrip")
    assert "roundtrip_00001_" in str(out.ui.as_dict()["text"])
    names = [n for n in folder_paths.get_filename_list("w2w_identities") if n.startswith("w2w-test/roundtrip_")]
    assert names == ["w2w-test/roundtrip_00001_.safetensors"]
    loaded = comfy_host.node_class("W2WLoadIdentity").execute(names[0]).result[0]
    assert torch.equal(loaded.coefficients, identity.coefficients)
    assert loaded.space_fingerprint == identity.space_fingerprint and loaded.history == identity.history
    # identities live under models/w2w but are not offered as spaces
    assert not any(n.startswith("identities/") for n in combo_options(comfy_host, "W2WLoadSpace", "space"))


def test_blend_endpoints_are_the_inputs(comfy_host, e2e):
    space, a, b = e2e.output("2"), e2e.output("3"), e2e.output("4")
    node = comfy_host.node_class("W2WBlendIdentities")
    assert torch.allclose(node.execute(space, a, b, 0.0).result[0].coefficients, a.coefficients, atol=1e-6)
    assert torch.allclose(node.execute(space, a, b, 1.0).result[0].coefficients, b.coefficients, atol=1e-6)


# ---------------------------------------------------------------------------------------------- delayed injection
def sample_latent(comfy_host, model, e2e, steps: int) -> torch.Tensor:
    """One KSampler call (64×64) with the graph's conditionings, under inference mode as in a real run."""
    positive, negative, latent = e2e.output("6"), e2e.output("7"), e2e.output("8")
    with torch.inference_mode():
        (out,) = comfy_host.node_class("KSampler")().sample(model, 5, steps, 3.0, "euler", "simple", positive,
                                                             negative, latent, denoise=1.0)
    return out["samples"].clone()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_delayed_injection_switches_identity_at_edit_start(comfy_host, e2e):
    apply = comfy_host.node_class("W2WApplyLoRA")
    base, space, first, second = e2e.output("1"), e2e.output("2"), e2e.output("3"), e2e.output("4")
    only_first = sample_latent(comfy_host, apply.execute(base, space, first, 1.0).result[0], e2e, 2)
    only_second = sample_latent(comfy_host, apply.execute(base, space, second, 1.0).result[0], e2e, 2)
    apart = relative(only_first, only_second)
    assert apart > 1e-2, f"the two identities give nearly the same latents ({apart:.3g}): the test cannot tell them apart"

    def delayed(edit_start):
        model = apply.execute(base, space, first, 1.0, second, edit_start).result[0]
        return sample_latent(comfy_host, model, e2e, 2)

    # Switch before the first step = the second identity throughout (weights computed per call instead of baked:
    # float32 rounding only); never = the first identity throughout (the wrapper returns the baked weight as is).
    assert relative(delayed(0.0), only_second) < 1e-3 * apart
    assert torch.equal(delayed(1.0), only_first)
    # "simple" 2-step sigmas: 14.6, 1.61; edit_start 0.4 switches at sigma 2.28 (t≈600): the second step only.
    halfway = delayed(0.4)
    assert relative(halfway, only_first) > 1e-2 * apart and relative(halfway, only_second) > 1e-2 * apart


@pytest.mark.parametrize("edit_start", [0.0, 0.3, 0.55, 1.0])
def test_delayed_injection_trajectory_uses_one_identity_per_step_switching_at_T(comfy_host, e2e, reference_space,
                                                                                  edit_start):
    """At every UNet call, record sigma and the weight the sampler really uses for one target: it is the first
    identity's (W + ΔW₁) while sigma > σ(T), the second's (W + ΔW₂) from then on, never anything in between, where
    T = 999·(1 − edit_start) is the paper's switch timestep (ComfyUI's percent_to_sigma)."""
    base, space, first, second = e2e.output("1"), e2e.output("2"), e2e.output("3"), e2e.output("4")
    model = comfy_host.node_class("W2WApplyLoRA").execute(base, space, first, 1.0, second, edit_start).result[0]
    slot = reference_space.layout.modules[10]
    key = slot.comfy_key
    module = model.model.get_submodule(key.removesuffix(".weight"))
    file_weight = checkpoint_weights(comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME, [key])[key].float()
    expected = {name: file_weight + reference_space.deltas(identity.coefficients.clone())[slot.name]
                for name, identity in (("first", first), ("second", second))}
    calls = []

    def record(executor, x, t, *args, **kwargs):  # runs inside the switch's own APPLY_MODEL wrapper
        weight = module.weight
        for f in module.weight_function:
            weight = f(weight)
        errors = {name: float((weight.float() - w).abs().max()) for name, w in expected.items()}
        calls.append((float(t.max()), min(errors, key=errors.get), min(errors.values())))
        return executor(x, t, *args, **kwargs)

    model.add_wrapper_with_key("apply_model", "w2w_test_recorder", record)
    sample_latent(comfy_host, model, e2e, 4)
    sampling = model.model.model_sampling
    threshold = sampling.percent_to_sigma(edit_start)
    if 0.0 < edit_start < 1.0:
        assert threshold == pytest.approx(float(sampling.sigma(torch.tensor(999.0 * (1.0 - edit_start)))), rel=1e-6)
    apart = float((expected["first"] - expected["second"]).abs().max())
    assert len(calls) >= 4 and apart > 1e-3
    for sigma, used, error in calls:
        assert used == ("second" if sigma <= threshold else "first"), (sigma, threshold, used)
        assert error <= 1e-5 * apart + 2 * torch.finfo(torch.float32).eps * float(file_weight.abs().max()), (sigma, error)
    used = [u for _, u, _ in calls]
    assert used == sorted(used, key=["first", "second"].index)  # one switch, never back


def test_delayed_injection_leaves_the_input_model_without_wrappers(comfy_host, e2e):
    base = e2e.output("1")
    before = (copy.copy(base.weight_wrapper_patches), copy.copy(base.wrappers))
    model = comfy_host.node_class("W2WApplyLoRA").execute(base, e2e.output("2"), e2e.output("3"), 1.0,
                                                          e2e.output("4"), 0.3).result[0]
    assert len(model.weight_wrapper_patches) == 64 and "apply_model" in model.wrappers
    assert (base.weight_wrapper_patches, base.wrappers) == before
