"""Invert Image to w2w inside the real ComfyUI, on the full-size random-weight SD1.5 stand-in at 64x64.

Graphs run through `execution.PromptExecutor` (under `torch.inference_mode()`, as in a real run). The space is a
synthetic one in the released 64-module layout with 16 PCs. Steps are few: one UNet forward+backward of the
full-size UNet costs about a second here.
"""
from __future__ import annotations

import gc
import importlib
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfyhost import SD15_STANDIN_NAME
from w2w.convert import convert_release
from w2w.synthetic import write_release

PCS = 16
SPACE_FILE = "w2w-invert-test-space.safetensors"
RES = 64


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def space_file(comfy_host, tmp_path_factory):
    root = tmp_path_factory.mktemp("w2w-invert-space")
    write_release(str(root / "release"), pcs=PCS, models=200, seed=11, weight_scale=0.02)
    convert_release(str(root / "release"), str(root / SPACE_FILE))
    comfy_host.stage_model("w2w", root / SPACE_FILE, SPACE_FILE)
    return root / SPACE_FILE


@pytest.fixture(scope="module")
def photos(comfy_host):
    """Input files: an 80x64 RGB 'photo', a 48x72 one, and an RGBA one whose transparent centre is the mask."""
    gen = np.random.default_rng(0)
    names = {}
    for name, (w, h) in (("invert-a.png", (80, 64)), ("invert-b.png", (48, 72))):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx / w, yy / h, 0.5 + 0.3 * np.sin(xx / 5.0)], -1) * 200 + gen.integers(0, 40, (h, w, 3))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(comfy_host.base_dir / "input" / name)
        names[name] = name
    rgba = np.array(Image.open(comfy_host.base_dir / "input" / "invert-a.png").convert("RGBA"))
    rgba[16:48, 24:56, 3] = 0  # LoadImage: mask = 1 - alpha, so the centre is the region the loss sees
    Image.fromarray(rgba).save(comfy_host.base_dir / "input" / "invert-masked.png")
    return names


class Executors:
    """The module's executor: the checkpoint is loaded once and cached between graphs. `fresh()` drops it (and
    the model it holds) before making a new one, so that two full-size UNets are never in memory at once."""

    def __init__(self, host):
        self.host = host
        self.current = host.new_executor()

    def fresh(self):
        self.current = None
        gc.collect()
        self.host.unload_models()
        self.current = self.host.new_executor()
        return self.current


@pytest.fixture(scope="module")
def executors(comfy_host):
    return Executors(comfy_host)


@pytest.fixture
def executor(executors):
    return executors.current


def invert_graph(image: str = "invert-a.png", steps: int = 4, lr: float = 1.0, seed: int = 3, preset: str = "custom",
                 pcs: int = PCS) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_STANDIN_NAME}},
        "2": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE_FILE, "pcs": PCS}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "4": {"class_type": "W2WInvertImage", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": ["3", 0], "space": ["2", 0], "preset": preset,
            "pcs": pcs, "steps": steps, "lr": lr, "seed": seed, "clip": ["1", 1], "prompt": "sks person",
            "resolution": RES, "face": "off"}},  # drawn gradients, no face: the centre crop
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }


def full_graph() -> dict:
    """Load Image → Invert → Edit → Apply → KSampler → VAEDecode → SaveImage (+ the loss curve preview)."""
    graph = invert_graph(steps=3)
    graph.update({
        "6": {"class_type": "W2WApplyEditDirection", "inputs": {"space": ["2", 0], "identity": ["4", 0],
                                                               "attribute": "Male", "strength": 1.0, "debias": "",
                                                               "attribute_override": ""}},
        "7": {"class_type": "W2WApplyLoRA", "inputs": {"model": ["1", 0], "space": ["2", 0], "identity": ["6", 0],
                                                      "strength": 1.0}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks person", "clip": ["1", 1]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "low quality, blurry", "clip": ["1", 1]}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 1, "cfg": 2.5, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["7", 0],
                                                   "positive": ["8", 0], "negative": ["9", 0],
                                                   "latent_image": ["10", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "w2w-invert-test", "images": ["12", 0]}},
    })
    return graph


def pack_modules(comfy_host):
    """The pack's own node-side helpers (nodes.inversion + nodes.patching, as one namespace) and its w2w.invert and
    w2w.diffusion modules, as ComfyUI imported them."""
    inversion = sys.modules[comfy_host.node_class("W2WInvertImage").__module__]
    root = inversion.__name__.rsplit(".nodes.", 1)[0]
    patching = sys.modules[f"{root}.nodes.patching"]
    helpers = types.SimpleNamespace(prepare_images=inversion.prepare_images,
                                    prepare_image_mask=inversion.prepare_image_mask,
                                    frame_photos=inversion.frame_photos, device_memory_for=inversion.device_memory_for,
                                    encode_posterior=inversion.encode_posterior,
                                    facecrop=importlib.import_module(f"{root}.w2w.facecrop"),
                                    static_clone=patching.static_clone,
                                    trainable_clone=patching.trainable_clone, ComfyDenoiser=patching.ComfyDenoiser,
                                    _ours=patching._ours)
    return helpers, sys.modules[f"{root}.w2w.invert"], sys.modules[f"{root}.w2w.diffusion"]


def unet_weights_from_file(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}


def assert_model_untouched(model, checkpoint, ours) -> None:
    """Every UNet weight equals the checkpoint's and no wrapper of ours is left on a module.

    (requires_grad is checked where only our node touched the model: the stock LoRA patching of Apply re-creates
    the patched parameters with requires_grad=False when it loads and unloads them.)"""
    state = model.model.state_dict()
    expected = unet_weights_from_file(checkpoint)
    assert set(expected) <= set(state)
    changed = [k for k, v in expected.items() if not torch.equal(state[k].to(v.dtype), v)]
    assert changed == [], f"{len(changed)} weights changed, e.g. {changed[:3]}"
    leftovers = [n for n, m in model.model.named_modules()
                 for f in list(getattr(m, "weight_function", [])) + list(getattr(m, "bias_function", [])) if ours(f)]
    assert leftovers == [], f"weight wrappers left on {leftovers[:3]}"


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shape", [(2, 64, 80, 3), (1, 90, 40, 4), (1, 50, 50, 1), (3, 33, 47), (1, 40, 64, 2)])
def test_images_of_any_size_and_channels_become_square_rgb(comfy_host, shape):
    node_module, _, _ = pack_modules(comfy_host)
    image = torch.rand(shape)
    out = node_module.prepare_images(image, 32)
    assert out.shape == (shape[0], 32, 32, 3)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    if len(shape) == 3 or shape[-1] <= 2:  # grey in, grey out
        assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])


def test_centre_crop_keeps_the_centre_and_the_mask_follows_the_image(comfy_host):
    node_module, _, _ = pack_modules(comfy_host)
    image = torch.zeros(1, 40, 80, 3)
    image[:, :, 20:60] = 1.0  # the central square of a landscape image
    assert torch.allclose(node_module.prepare_images(image, 40), torch.ones(1, 40, 40, 3))
    mask = image[..., 0].clone()
    torch.testing.assert_close(node_module.prepare_image_mask(mask, image, 40), torch.ones(1, 40, 40))


def test_image_and_mask_errors(comfy_host):
    node_module, _, _ = pack_modules(comfy_host)
    with pytest.raises(ValueError, match="empty image batch"):
        node_module.prepare_images(torch.zeros(0, 64, 64, 3), 64)
    image = torch.rand(2, 64, 48, 3)
    with pytest.raises(ValueError, match="the mask is 64x64 but the images are 48x64"):
        node_module.prepare_image_mask(torch.ones(1, 64, 64), image, 32)
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        node_module.prepare_image_mask(torch.ones(3, 64, 48), image, 32)
    with pytest.raises(ValueError, match="empty"):
        node_module.prepare_image_mask(torch.zeros(64, 48), image, 32)


def test_invert_then_edit_apply_and_sample(comfy_host, space_file, photos, executor):
    result = comfy_host.run_graph(full_graph(), executor=executor)
    identity = result.output("4", 0)
    curve = result.output("4", 1)
    space = result.output("2", 0)
    assert identity.pcs == PCS and identity.space_fingerprint == space.fingerprint
    assert identity.history[-1].startswith("invert images=1 pcs=16 steps=3")
    assert torch.isfinite(identity.coefficients).all() and identity.coefficients.abs().max() > 0
    assert curve.shape == (1, 192, 384, 3) and 0.0 <= float(curve.min()) and float(curve.max()) <= 1.0
    assert len(result.image_files()) >= 2 and all(f.is_file() for f in result.image_files())
    node_module, _, _ = pack_modules(comfy_host)
    comfy_host.unload_models()  # KSampler left the model loaded with Apply's patches; unloading restores the weights
    assert_model_untouched(result.output("1", 0), comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME,
                           node_module._ours)


def test_loss_at_fixed_timesteps_and_noise_decreases(comfy_host, space_file, photos, executor):
    result = comfy_host.run_graph(invert_graph(steps=10, lr=1.0, seed=1), executor=executor)
    identity, space = result.output("4", 0), result.output("2", 0)
    model, clip, vae = (result.output("1", i) for i in range(3))
    image = result.output("3", 0)
    node_module, core, diffusion = pack_modules(comfy_host)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        context = clip.encode_from_tokens_scheduled(clip.tokenize("sks person"))[0][0][:1].clone()
        latents = model.model.process_latent_in(vae.encode(node_module.prepare_images(image, RES))).clone().float()
        draws = [(torch.tensor([t]), torch.randn(latents.shape, generator=gen)) for t in range(25, 1000, 125)]
        with node_module.trainable_clone(model, space) as (patcher, board):
            sigmas = patcher.model.model_sampling.sigmas.clone().float()
            abar = diffusion.alphas_cumprod_from_sigmas(sigmas)
            denoiser = node_module.ComfyDenoiser(patcher, board, sigmas)
            fmap = core.FactorMap(space, PCS)

            def loss(beta):
                return sum(float(core.step_loss(fmap, denoiser, beta, latents, t, noise, context, abar))
                           for t, noise in draws) / len(draws)

            before, after = loss(torch.zeros(PCS)), loss(identity.coefficients)
    assert after < before, (before, after)
    assert len(set(round(x, 6) for x in [before, after])) == 2
    assert_model_untouched(model, comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME, node_module._ours)


def test_mask_and_multi_image_batch(comfy_host, space_file, photos, executor):
    graph = invert_graph(image="invert-masked.png", steps=2)
    graph["4"]["inputs"]["mask"] = ["3", 1]
    masked = comfy_host.run_graph(graph, executor=executor).output("4", 0)
    assert masked.history[-1].startswith("invert images=1") and masked.history[-1].endswith("masked")

    graph = invert_graph(steps=2)
    graph["13"] = {"class_type": "LoadImage", "inputs": {"image": "invert-b.png"}}
    graph["14"] = {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["13", 0]}}
    graph["4"]["inputs"]["image"] = ["14", 0]
    batch = comfy_host.run_graph(graph, executor=executor).output("4", 0)
    assert batch.history[-1].startswith("invert images=2")
    assert not torch.equal(batch.coefficients, masked.coefficients)


def test_gradient_checkpointing_changes_memory_not_results(comfy_host, space_file, photos, executor):
    """The same inversion with and without recomputing the blocks in backward: the same coefficients (the same float
    operations, in another order of memory use), and the shared modules keep no checkpointing forward afterwards."""
    runs = {}
    for flag in (False, True):
        graph = invert_graph(steps=2, lr=0.5)
        graph["4"]["inputs"]["gradient_checkpointing"] = flag
        result = comfy_host.run_graph(graph, executor=executor)
        runs[flag], model = result.output("4", 0).coefficients.clone(), result.output("1", 0)
    assert float(runs[False].norm()) > 0
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-6)
    assert not [n for n, m in model.model.named_modules() if "forward" in m.__dict__]


def test_random_crop_frames_larger_and_crops_at_every_step(comfy_host, space_file, photos, executor):
    graph = invert_graph(steps=2)
    graph["4"]["inputs"]["random_crop"] = True
    result = comfy_host.run_graph(graph, executor=executor)
    # resolution 64 -> a 72 px framing (1/8 larger), latents 9 x 9, a new 8 x 8 latent window at every step
    assert "crop=8" in result.output("4", 0).history[-1]


def test_vae_sample_reads_the_posterior_through_vae_encode(comfy_host, space_file, photos):
    """encode_posterior: the mean equals VAE Encode's latents (the posterior's mode) and the std is positive and finite,
    from the same encode call with the KL regulariser passed through once (restored afterwards)."""
    import comfy.sd

    helpers, _, _ = pack_modules(comfy_host)
    # the stand-in's VAE alone, as ComfyUI's VAELoader builds one: not a second whole checkpoint beside the one the
    # module's executor holds
    prefix = "first_stage_model."
    with safe_open(str(comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME), framework="pt") as f:
        vae_sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=vae_sd)
        pixels = torch.rand(2, RES, RES, 3, generator=torch.Generator().manual_seed(5))
        mean, std = helpers.encode_posterior(vae, pixels)
        mode = vae.encode(pixels)
    torch.testing.assert_close(mean, mode)
    assert std.shape == mode.shape and bool(torch.isfinite(std).all()) and float(std.min()) > 0
    assert "forward" not in vae.first_stage_model.regularization.__dict__


def test_vae_sample_inverts_on_fresh_posterior_samples(comfy_host, space_file, photos, executor):
    """vae_sample: the inversion draws a fresh posterior sample every step (core: tests/test_invert_core.py), seeded:
    the same inputs give the same identity, which differs from the run on the posterior's mean."""
    runs = {}
    for name, sample in (("mean", False), ("sample", True), ("again", True)):
        graph = invert_graph(steps=2)
        graph["4"]["inputs"]["vae_sample"] = sample
        runs[name] = comfy_host.run_graph(graph, executor=executor).output("4", 0)
    assert "vae_sample" in runs["sample"].history[-1] and "vae_sample" not in runs["mean"].history[-1]
    assert torch.equal(runs["sample"].coefficients, runs["again"].coefficients)
    assert not torch.equal(runs["sample"].coefficients, runs["mean"].coefficients)


def test_half_precision_basis_products_in_the_executor(comfy_host, space_file, photos, executor):
    """precision=float16: the products with the basis in half precision, β float32; close to the float32 run."""
    runs, model = {}, None
    for precision in ("auto", "float16"):
        graph = invert_graph(steps=3, lr=0.5)
        graph["4"]["inputs"]["precision"] = precision
        result = comfy_host.run_graph(graph, executor=executor)
        runs[precision], model = result.output("4", 0), result.output("1", 0)
    assert "basis=" not in runs["auto"].history[-1]  # a 16-PC space is cheap: auto stays float32
    assert runs["float16"].history[-1].endswith("basis=float16")
    full, half = runs["auto"].coefficients, runs["float16"].coefficients
    assert half.dtype == torch.float32 and float(full.norm()) > 0
    # the UNet passes are the same in both runs; only the basis products differ, by at most 2u each (u = 2^-11, float16's
    # unit roundoff), and the trajectory stays within 4u as in tests/test_invert_core.py
    assert float((half - full).norm()) < 4 * 2.0 ** -11 * float(full.norm())
    node_module, _, _ = pack_modules(comfy_host)
    assert_model_untouched(model, comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME, node_module._ours)


def test_cancel_leaves_the_model_identical_and_a_rerun_equals_a_fresh_run(comfy_host, space_file, photos, executors):
    import comfy.model_management
    import comfy.utils

    node_module, _, _ = pack_modules(comfy_host)
    checkpoint = comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME
    seen = []

    def cancel_at_step_3(value, total, preview, node_id=None):
        if node_id == "4":
            seen.append(value)
            if value == 3:
                comfy.model_management.interrupt_current_processing(True)

    graph = invert_graph(steps=6, seed=7)
    executor = executors.fresh()  # a model no other test has patched
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(cancel_at_step_3)
    try:
        cancelled = comfy_host.run_graph(graph, check=False, executor=executor)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert not cancelled.success
    assert any(event == "execution_interrupted" for event, _ in cancelled.messages), cancelled.messages
    # Cancel pressed while step 3 is reported: step 4 may run (the check is at the step boundary) but it is never
    # reported and nothing after it runs, i.e. the node stops within one step
    assert seen == [1, 2, 3], seen
    model = cancelled.output("1", 0)
    assert_model_untouched(model, checkpoint, node_module._ours)
    flags = [p.requires_grad for p in model.model.parameters()]
    assert len(set(flags)) == 1  # as loaded: only our node touched this model, and it put every flag back

    after_cancel = comfy_host.run_graph(graph, executor=executor)  # same cached MODEL object as the cancelled run
    assert after_cancel.output("1", 0) is model
    assert_model_untouched(model, checkpoint, node_module._ours)
    assert [p.requires_grad for p in model.model.parameters()] == flags
    coefficients = after_cancel.output("4", 0).coefficients.clone()
    del model, cancelled, after_cancel, executor
    fresh = comfy_host.run_graph(graph, executor=executors.fresh())  # empty caches: the checkpoint is loaded again
    assert torch.equal(coefficients, fresh.output("4", 0).coefficients)


def test_trainable_clone_restores_requires_grad_and_wrappers_exactly(comfy_host, space_file, photos, executor):
    result = comfy_host.run_graph(invert_graph(steps=1), executor=executor)
    model, space = result.output("1", 0), result.output("2", 0)
    node_module, _, _ = pack_modules(comfy_host)
    params = list(model.model.parameters())
    with torch.inference_mode():  # a pattern no load would produce: every third parameter frozen
        for i, p in enumerate(params):
            p.requires_grad_(i % 3 != 0)
    before = [p.requires_grad for p in params]
    with torch.inference_mode(False):
        with node_module.trainable_clone(model, space) as (patcher, board):
            assert not any(p.requires_grad for p in params)
            assert sum(isinstance(f, type(board.wrappers[0])) for _, m in patcher.model.named_modules()
                       for f in getattr(m, "weight_function", [])) == 64
    assert [p.requires_grad for p in params] == before
    with torch.inference_mode():
        for p in params:
            p.requires_grad_(True)
    assert_model_untouched(model, comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME, node_module._ours)


@pytest.mark.parametrize("change, message", [
    ({"preset": "reference"}, "raise pcs in Load w2w Space to 10,000"),
    ({"mask": ["3", 1]}, "the mask is empty"),  # Load Image of an opaque file gives an all-zero mask
])
def test_clear_errors(comfy_host, space_file, photos, executor, change, message):
    graph = invert_graph(steps=1)
    graph["4"]["inputs"].update(change)
    result = comfy_host.run_graph(graph, check=False, executor=executor)
    assert not result.success
    assert message in result.error()["exception_message"]


# ---------------------------------------------------------------------------------------------- face framing
def astronaut_canvas(side: int = 192) -> torch.Tensor:
    """The public-domain astronaut photo (scikit-image) pasted small and off-centre into a large grey canvas."""
    data = pytest.importorskip("skimage.data", reason="scikit-image is a test requirement: pip install scikit-image")
    small = np.asarray(Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS))
    canvas = np.full((768, 1152, 3), 118, np.uint8)
    canvas[430: 430 + side, 820: 820 + side] = small
    return torch.from_numpy(canvas).float()[None] / 255.0


def test_face_off_is_the_old_centre_crop(comfy_host):
    helpers, _, _ = pack_modules(comfy_host)
    image = torch.rand(2, 48, 80, 3)
    framed = helpers.frame_photos(image, None, 32, "off")
    assert torch.equal(framed.pixels, helpers.prepare_images(image, 32)) and framed.masks is None
    with pytest.raises(ValueError, match="face_mask needs face: auto"):
        helpers.frame_photos(image, None, 32, "off", face_mask=True)


def test_face_auto_frames_the_face_and_reports_photos_without_one(comfy_host):
    pytest.importorskip("facenet_pytorch", reason="pip install --no-deps -r requirements-idscore.txt")
    helpers, _, _ = pack_modules(comfy_host)
    photo = astronaut_canvas()
    framed = helpers.frame_photos(photo, None, 64, "auto", face_mask=True)
    (frame,) = framed.frames
    torch.testing.assert_close(framed.pixels[0], helpers.facecrop.crop_square(photo[0], frame.square, 64))
    assert framed.masks.shape == (1, 64, 64) and float(framed.masks.max()) == 1.0 and float(framed.masks.min()) == 0.0
    assert framed.note == "face framing: 1 of 1 photo(s)"
    both = helpers.frame_photos(torch.cat([photo, torch.full_like(photo, 0.5)]), None, 64, "auto")
    assert both.pixels.shape == (1, 64, 64, 3) and "no face in photo(s) 2: left out" in both.note
    with pytest.raises(ValueError, match=r"no face found in photo 1 of 1: .* set face to off"):
        helpers.frame_photos(torch.full_like(photo, 0.5), None, 64, "auto")


def test_one_mask_for_a_batch_is_cropped_with_each_photos_own_face_square(comfy_host):
    """face: auto frames every photo around its own face; a single MASK given for the whole batch is cropped with
    each photo's square, as the photo is, not with the first photo's."""
    pytest.importorskip("facenet_pytorch", reason="pip install --no-deps -r requirements-idscore.txt")
    helpers, _, _ = pack_modules(comfy_host)
    photo = astronaut_canvas()
    photos = torch.cat([photo, photo.flip(2)])  # the face right, then left
    mask = torch.zeros(photo.shape[1:3])
    mask[:, : photo.shape[2] // 2] = 1.0  # the left half of every photo
    framed = helpers.frame_photos(photos, mask, 64, "auto")
    assert len(framed.frames) == 2 and framed.masks.shape == (2, 64, 64)
    for frame, got in zip(framed.frames, framed.masks):
        torch.testing.assert_close(got, helpers.facecrop.crop_square(mask[..., None], frame.square, 64)[..., 0])
    assert float(framed.masks[0].mean()) < 0.1 and float(framed.masks[1].mean()) > 0.9  # face right: unmasked


def test_face_auto_without_the_detector_falls_back_to_the_centre_crop_and_says_how_to_install_it(comfy_host,
                                                                                                  monkeypatch):
    helpers, _, _ = pack_modules(comfy_host)

    def missing(*args, **kwargs):
        raise ImportError("No module named 'facenet_pytorch'")

    monkeypatch.setattr(helpers.facecrop, "detect_frames", missing)
    image = torch.rand(1, 48, 80, 3)
    framed = helpers.frame_photos(image, None, 32, "auto")
    assert torch.equal(framed.pixels, helpers.prepare_images(image, 32))
    assert "pip install --no-deps -r requirements-idscore.txt" in framed.note and "centre crop" in framed.note


def test_basis_memory_is_asked_of_the_model_management_and_given_back(comfy_host):
    """On a (fake) GPU the runner asks ComfyUI to free room for the basis copies before, and empties the cache after,
    also when the inversion fails; on the CPU it asks nothing."""
    helpers, _, _ = pack_modules(comfy_host)
    calls = []
    fake_mm = types.SimpleNamespace(free_memory=lambda n, d: calls.append(("free", n, d.type)),
                                    minimum_inference_memory=lambda: 1000,
                                    soft_empty_cache=lambda: calls.append(("empty",)))
    with helpers.device_memory_for(4_000_000, "cuda", fake_mm):
        assert calls == [("free", 4_001_000, "cuda")]
    assert calls[-1] == ("empty",)
    with pytest.raises(RuntimeError, match="boom"):
        with helpers.device_memory_for(10, "cuda", fake_mm):
            raise RuntimeError("boom")
    assert calls[-1] == ("empty",) and len(calls) == 4
    with helpers.device_memory_for(4_000_000, "cpu", fake_mm):
        pass
    assert len(calls) == 4


def test_inversion_clones_ask_newer_hosts_for_the_plain_patcher(comfy_host):
    """Late-2026 ComfyUI (dynamic VRAM, read from 0.38.1's model_patcher.py): a dynamic patcher offers its cached
    plain delegate (get_non_dynamic_delegate) and clone(disable_dynamic=True); 0.3.64's clone() takes no argument.
    Stand-ins with each signature, as the newer host's dynamic patcher needs an NVIDIA GPU to exist."""
    helpers, _, _ = pack_modules(comfy_host)

    class Dynamic:  # ModelPatcherDynamic
        def is_dynamic(self):
            return True

        def get_non_dynamic_delegate(self):
            return "plain delegate"

        def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
            return "plain" if disable_dynamic else "dynamic"

    class NewPlain:  # ModelPatcher of 0.38 (CPU, or dynamic VRAM off)
        def is_dynamic(self):
            return False

        def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
            return "plain"

    class Old:  # ModelPatcher of 0.3.64
        def clone(self):
            return "plain"

    assert helpers.static_clone(Dynamic()) == "plain delegate"
    assert helpers.static_clone(NewPlain()) == "plain"
    assert helpers.static_clone(Old()) == "plain"

    class CustomLoaded(Dynamic):  # a dynamic MODEL whose loader did not record cached_patcher_init (0.38.1's message)
        def get_non_dynamic_delegate(self):
            raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")

    with pytest.raises(ValueError, match="Load Checkpoint.*--disable-dynamic-vram"):
        helpers.static_clone(CustomLoaded())

    class Broken(Dynamic):  # any other failure is not ours to reword
        def get_non_dynamic_delegate(self):
            raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        helpers.static_clone(Broken())


# ---------------------------------------------------------------------------------------------- identity loss
def identity_loss_module(comfy_host):
    inversion = sys.modules[comfy_host.node_class("W2WInvertImage").__module__]
    return importlib.import_module(inversion.__name__.rsplit(".", 1)[0] + ".identity_loss")


def test_private_vae_decoder_equals_vae_decode_and_carries_gradients(comfy_host, space_file, photos, executor):
    """The identity loss decodes with a private copy of the checkpoint's VAE decoder: under the executor's inference
    mode ComfyUI's own VAE cannot record a backward pass; the copy gives VAE Decode's pixels, and gradients."""
    result = comfy_host.run_graph(invert_graph(steps=1), executor=executor)
    vae, image = result.output("1", 2), result.output("3", 0)
    module = identity_loss_module(comfy_host)
    before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    with torch.inference_mode():  # as the executor runs nodes
        pixels = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(RES, RES)).movedim(1, -1)
        z = vae.encode(pixels)
        reference = vae.decode(z)
        decoder = module.private_decoder(vae, "cpu")
        with torch.inference_mode(False), torch.enable_grad():
            latents = z.clone().float().requires_grad_(True)
            decoded = ((decoder.decode(latents) + 1.0) / 2.0).clamp(0.0, 1.0)
            decoded.square().sum().backward()
    assert decoded.shape[1:] == (3, RES, RES)
    tolerance = 2e-2 if vae.vae_dtype != torch.float32 else 1e-4  # ComfyUI decodes in bfloat16 where it can
    torch.testing.assert_close(decoded.detach().movedim(1, -1), reference.float(), rtol=0, atol=tolerance)
    assert latents.grad is not None and float(latents.grad.abs().sum()) > 0
    assert all(torch.equal(v, before[k]) for k, v in vae.first_stage_model.state_dict().items())


def test_identity_loss_in_the_executor(comfy_host, space_file, photos, executor, tmp_path_factory):
    """identity_loss > 0: FaceNet (random stand-in weights in models/facenet) on the decoded clean latents joins the
    loss at the balanced weight (noted in the identity's history); 0 is the plain inversion; the MODEL and the VAE
    stay unchanged."""
    pytest.importorskip("facenet_pytorch", reason="pip install --no-deps -r requirements-idscore.txt")
    from w2w.metrics.faces import FACENET_FILENAME
    from w2w.metrics.standins import save_random_facenet

    weights = save_random_facenet(str(tmp_path_factory.mktemp("facenet") / FACENET_FILENAME), seed=5)
    comfy_host.stage_model("facenet", weights, FACENET_FILENAME)
    runs = {}
    for strength in (0.0, 1.0):
        graph = invert_graph(steps=2, lr=0.5)
        graph["4"]["inputs"].update(identity_loss=strength, facenet_weights=FACENET_FILENAME)
        result = comfy_host.run_graph(graph, executor=executor)
        runs[strength] = result.output("4", 0)
    plain = comfy_host.run_graph(invert_graph(steps=2, lr=0.5), executor=executor).output("4", 0)
    module = identity_loss_module(comfy_host)  # FaceNet looks at the central 60 %: only that (+ a margin) is decoded
    assert module.face_window(64, 64) == (slice(9, 55), slice(9, 55), 4, 38)
    assert module.face_window(RES // 8, RES // 8) == (slice(0, 7), slice(0, 7), 1, 5)
    assert torch.equal(runs[0.0].coefficients, plain.coefficients) and "identity_loss" not in plain.history[-1]
    assert "identity_loss=" in runs[1.0].history[-1]
    assert not torch.allclose(runs[1.0].coefficients, plain.coefficients)
    node_module, _, _ = pack_modules(comfy_host)
    assert_model_untouched(result.output("1", 0), comfy_host.models_dir / "checkpoints" / SD15_STANDIN_NAME,
                           node_module._ours)
