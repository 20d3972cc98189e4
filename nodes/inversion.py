"""The inversion nodes (paper §3.4, App. C; w2w++ through a VAE decoder): the identity whose model best denoises
photos of one person.

Both nodes share one runner, :func:`run_inversion` (photos → latents, text condition, progress, previews, Cancel,
the trainable MODEL clone of :mod:`.patching`); they differ only in the inputs they expose and in what is optimised —
PCA coefficients (Invert Image to w2w) or a VAE latent (Invert Image to VAE-w2w, a ``w2w.vae.LatentParam``). The
optimisation is the core's (``w2w.invert``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..w2w.diffusion import alphas_cumprod_from_sigmas
from ..w2w.invert import PRECISIONS, PRESETS, InversionResult, InvertSettings, invert
from ..w2w.vae import LatentParam, VAELatent
from .idscore import AUTO as FACENET_AUTO, facenet_fingerprint, weights_choices
from .patching import ComfyDenoiser, check_targets, trainable_clone
from .routes import send_event, send_progress_text
from .sockets import (CATEGORY_INVERSION, SEED_MAX, IdentitySocket, LatentSocket, SpaceSocket, VAESocket, advanced,
                      comfyui_version, schema)

log = logging.getLogger(__name__)

CUSTOM = "custom"
FAST = "fast"  # refines init_identity (Encode Face to w2w), over the PCs the space is loaded with (up to the preset's)
PRESET_CHOICES = ["reference", "out-of-distribution", FAST, CUSTOM]
DEFAULT_PROMPT = "sks person"
PREVIEW_EVERY = 10  # steps between two previews of the current identity's reconstruction
PREVIEW_MIN_SIDE = 128  # previews are enlarged (nearest) to at least this side to stay readable on the node
PROGRESS_EVENT = "w2w.invert.progress"  # {node, step, total, loss}: shown on the node by web/js/w2w.js
LOG_EVERY = 50
IDENTITY_LOSS_BYTES = 3 * 2**30  # room asked for the identity loss: the decoder and FaceNet (float32, 0.3 GB) and
# the decoder's activations kept for its backward pass on the face's window at 512 px (an estimate)
FACE_AUTO, FACE_OFF = "auto", "off"
FACE_CHOICES = (FACE_AUTO, FACE_OFF)
RANDOM_CROP_ROOM = 1.125  # random_crop: frame a square this much larger and crop `resolution` of it at every step


# ---- images and masks --------------------------------------------------------------------------------------
def _resize_short_side_and_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): shorter side to ``size`` (antialiased bilinear), then a centre crop."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top: top + size, left: left + size]


def rgb_images(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, C) with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) -> (N, H, W, 3) RGB."""
    if image is None or image.dim() not in (3, 4) or image.shape[0] == 0 or image.numel() == 0:
        shape = None if image is None else tuple(image.shape)
        raise ValueError(f"Invert Image to w2w got an empty image batch (shape {shape}): connect Load Image "
                         "(several photos of the same person can be batched with Batch Images)")
    x = image.detach().float()
    if x.dim() == 3:  # (N, H, W): grey
        x = x[..., None]
    channels = x.shape[-1]
    if channels in (2, 4):  # drop alpha, as PIL's convert("RGB") does
        x = x[..., :-1]
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    if x.shape[-1] != 3:
        raise ValueError(f"images have {channels} channels; expected 1 (grey), 2, 3 (RGB) or 4 (RGBA)")
    return x.clamp(0.0, 1.0)


def prepare_images(image: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI IMAGE -> (N, size, size, 3) RGB: shorter side to ``size``, centre crop."""
    out = _resize_short_side_and_crop(rgb_images(image).permute(0, 3, 1, 2), size)
    return out.clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def checked_mask(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """ComfyUI MASK (H, W) or (N|1, H, W) of the input images, validated -> (N|1, H, W) float."""
    m = mask.detach().float()
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise ValueError(f"mask must be (H, W) or (N, H, W), got shape {tuple(mask.shape)}")
    images, height, width = image.shape[0], image.shape[1], image.shape[2]
    if float(m.max()) <= 0.0:
        raise ValueError("the mask is empty (all 0): Load Image gives an empty mask for an image without a painted or "
                         "transparent area. Paint the region the loss should see (e.g. the face) in the mask editor, "
                         "or disconnect mask")
    if tuple(m.shape[-2:]) != (height, width):
        raise ValueError(f"the mask is {m.shape[-1]}x{m.shape[-2]} but the images are {width}x{height}: use the mask "
                         "of the same Load Image (or resize both the same way)")
    if m.shape[0] not in (1, images):
        raise ValueError(f"{m.shape[0]} masks for {images} images: give one mask for all images or one per image")
    return m


def prepare_image_mask(mask: torch.Tensor | None, image: torch.Tensor, size: int) -> torch.Tensor | None:
    """ComfyUI MASK of the input images -> (N|1, size, size), cropped exactly like the images (centre crop)."""
    if mask is None:
        return None
    return _resize_short_side_and_crop(checked_mask(mask, image)[:, None], size)[:, 0].clamp(0.0, 1.0)


@dataclass(frozen=True)
class Framed:
    """The photos as the inversion sees them, and how they were framed."""

    pixels: torch.Tensor  # (N', size, size, 3)
    masks: torch.Tensor | None  # (N'|1, size, size)
    note: str  # one line for the node and the log: what was done
    frames: tuple = ()  # w2w.facecrop.FaceFrame per kept photo (face framing only)


def frame_photos(image: torch.Tensor, mask: torch.Tensor | None, size: int, face: str = FACE_AUTO,
                 face_mask: bool = False, room: float = 1.0) -> Framed:
    """Frame every photo: around its largest face (``face`` auto, MTCNN) or by a centre crop (off, or auto without
    facenet-pytorch, which the note then says). Photos without a face are left out when others have one; a batch
    without any face is an error naming the photos. A connected mask is cropped like its photo; otherwise
    ``face_mask`` weights the loss by a feathered mask around each detected face. ``room`` > 1 frames a square that
    much larger (at ``room`` × ``size`` pixels, a multiple of 8) for random ``size`` crops of it at every step."""
    if face not in FACE_CHOICES:
        raise ValueError(f"face must be one of {FACE_CHOICES}, got {face!r}")
    scale, size = room, size if room == 1.0 else 8 * round(size * room / 8)
    rgb = rgb_images(image)
    painted = None if mask is None else checked_mask(mask, image)
    if face == FACE_AUTO:
        from ..w2w import facecrop

        try:
            frames = facecrop.detect_frames(rgb, scale=facecrop.PORTRAIT_SCALE * scale)
        except ImportError:
            note = ("face: auto needs the face detector (facenet-pytorch, MTCNN weights included): "
                    f"`{facecrop.DETECTOR_INSTALL}`; used the centre crop instead")
            log.warning("w2w inversion: %s", note)
            return Framed(prepare_images(image, size), prepare_image_mask(mask, image, size), note)
        kept = [i for i, f in enumerate(frames) if f is not None]
        missing = [i + 1 for i, f in enumerate(frames) if f is None]
        if not kept:
            raise facecrop.NoFaceError(
                f"no face found in photo{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                f"{len(frames)}: use a photo where the face is visible (at least ~20 px), or set face to off to "
                "invert the centre crop")
        pixels = torch.stack([facecrop.crop_square(rgb[i], frames[i].square, size) for i in kept])
        if painted is not None:  # one mask for the batch is cropped with each photo's own square, as its photo
            per_photo = [painted[0] if painted.shape[0] == 1 else painted[i] for i in kept]
            masks = torch.stack([facecrop.crop_square(m[..., None], frames[i].square, size)[..., 0]
                                 for m, i in zip(per_photo, kept)])
        elif face_mask:
            masks = torch.stack([facecrop.face_mask(frames[i], size) for i in kept])
        else:
            masks = None
        note = f"face framing: {len(kept)} of {len(frames)} photo(s)"
        if missing:
            note += f"; no face in photo(s) {', '.join(map(str, missing))}: left out"
            log.warning("w2w inversion: %s", note)
        return Framed(pixels.contiguous(), masks, note, tuple(frames[i] for i in kept))
    if face_mask and painted is None:
        raise ValueError("face_mask needs face: auto (the mask is drawn around the detected face); connect a painted "
                         "mask instead, or set face to auto")
    return Framed(prepare_images(image, size), prepare_image_mask(mask, image, size), "centre crop (face: off)")


def loss_curve_image(losses, width: int = 384, height: int = 192) -> torch.Tensor:
    """A small plot of the loss per step (grey) and its running mean (blue) as a ComfyUI IMAGE (1, H, W, 3)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    values = [v for v in losses if math.isfinite(v)]
    left, top, right, bottom = 8, 20, width - 8, height - 8
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    if values:
        window = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
        lo, hi = min(values), max(values)
        span = hi - lo if hi > lo else 1.0

        def point(i, v):
            x = left + (right - left) * (i / max(1, len(values) - 1))
            return x, bottom - (bottom - top) * (v - lo) / span

        for series, colour in ((values, (170, 170, 170)), (smooth, (30, 90, 200))):
            draw.line([point(i, v) for i, v in enumerate(series)], fill=colour, width=1 if series is values else 2)
        draw.text((left, 4), f"loss  first {smooth[0]:.4f}  last {smooth[-1]:.4f}  ({len(values)} steps)",
                  fill=(40, 40, 40))
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.float() / 255.0)[None]


# ---- progress ---------------------------------------------------------------------------------------------
def preview_image(model, x0: torch.Tensor | None):
    """ProgressBar preview ("JPEG", PIL image, max side) of a predicted latent: linear latent->RGB, no VAE decode."""
    from PIL import Image

    fmt = getattr(model.model, "latent_format", None)
    if x0 is None or getattr(fmt, "latent_rgb_factors", None) is None:
        return None
    import latent_preview

    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None))
    with torch.no_grad():
        kind, image, max_side = previewer.decode_latent_to_preview_image("JPEG", x0[:1].detach().float().cpu())
    scale = max(1, -(-PREVIEW_MIN_SIDE // max(1, min(image.size))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return kind, image, max_side


def encode_cond(clip, conditioning, prompt: str) -> torch.Tensor:
    """The cross-attention context (1, tokens, 768) from CONDITIONING, or from CLIP and the prompt."""
    if conditioning is not None:
        if not conditioning:
            raise ValueError("the conditioning input is empty")
        return conditioning[0][0][:1]
    if clip is None:
        raise ValueError("Invert Image to w2w needs a text encoder: connect clip (it encodes the prompt, "
                         f"default '{DEFAULT_PROMPT}') or a conditioning")
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0][:1]


def _settings(preset: str, pcs: int, steps: int, lr: float, seed: int) -> InvertSettings:
    if preset == CUSTOM:
        return InvertSettings(pcs=pcs, steps=steps, lr=lr, weight_decay=PRESETS["reference"].weight_decay, seed=seed)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESET_CHOICES}")
    base = PRESETS[preset]
    return InvertSettings(pcs=base.pcs, steps=base.steps, lr=base.lr, weight_decay=base.weight_decay, seed=seed)


def fast_settings(settings: InvertSettings, space, init) -> InvertSettings:
    """The fast preset refines an encoder's identity: it needs ``init`` and optimises the PCs the space is loaded with,
    up to the preset's (never fewer than the identity has)."""
    if init is None:
        raise ValueError("the fast preset refines a face encoder's guess in a few steps: connect init_identity to "
                         "Encode Face to w2w (or choose the reference preset to invert from the mean identity)")
    return dataclasses.replace(settings, pcs=max(init.pcs, min(settings.pcs, space.pcs)))


# ---- the runner both nodes call -----------------------------------------------------------------------------
@contextlib.contextmanager
def device_memory_for(nbytes: int, device, mm=None):
    """Make room for ``nbytes`` of our own tensors on ``device`` the way ComfyUI's nodes do — ask the model management
    to free it (unloading or offloading models) before, empty the allocator's cache after — so the basis copies of
    an inversion never push a loaded model out of VRAM behind ComfyUI's back. Nothing to do on a CPU."""
    if mm is None:
        import comfy.model_management as mm
    on_device = torch.device(device).type != "cpu"
    if on_device:
        mm.free_memory(nbytes + mm.minimum_inference_memory(), torch.device(device))
    try:
        yield
    finally:
        if on_device:
            mm.soft_empty_cache()


def basis_bytes(space, pcs: int, precision: str, device, dtype) -> int:
    """Bytes of the basis copies an inversion over ``pcs`` PCs puts on ``device`` (w2w.products)."""
    from ..w2w.products import basis_dtype_for

    storage = basis_dtype_for(precision, device, dtype, pcs, space.dim)
    copies = 2 if torch.device(device).type == "cpu" and storage != torch.float32 else 1  # CPU half: + transposed copy
    return copies * pcs * space.dim * torch.empty((), dtype=storage).element_size()


def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's posterior for ``pixels`` (ComfyUI IMAGE), in the VAE's own latent units.

    ComfyUI's ``VAE.encode`` returns the posterior's mode (= its mean); its standard deviation is read through the
    same call with the KL regulariser passed through for once, so tiling, batching and devices stay ComfyUI's. The
    mean of that pass must equal ``VAE.encode``'s result: on a host where the encode path differs this fails with a
    clear message instead of sampling from the wrong distribution.
    """
    try:
        from comfy.ldm.models.autoencoder import DiagonalGaussianRegularizer
    except ImportError:  # pragma: no cover - every supported ComfyUI has it
        DiagonalGaussianRegularizer = None
    regulariser = getattr(getattr(vae, "first_stage_model", None), "regularization", None)
    if DiagonalGaussianRegularizer is None or not isinstance(regulariser, DiagonalGaussianRegularizer):
        kind = type(getattr(vae, "first_stage_model", vae)).__name__
        raise ValueError(f"vae_sample needs a KL autoencoder (SD1.5's VAE); this VAE ({kind}) on ComfyUI "
                         f"{comfyui_version()} has no Gaussian posterior to sample: turn vae_sample off")
    mode = vae.encode(pixels)
    regulariser.forward = lambda z: (z, None)  # the moments themselves, for this one call
    try:
        moments = vae.encode(pixels)
    finally:
        del regulariser.forward
    if moments.shape[1] != 2 * mode.shape[1] or moments.shape[2:] != mode.shape[2:]:
        raise RuntimeError(f"vae_sample: the VAE's posterior has shape {tuple(moments.shape)} for latents "
                           f"{tuple(mode.shape)} on ComfyUI {comfyui_version()}: turn vae_sample off")
    mean, logvar = moments.float().chunk(2, dim=1)
    if not torch.allclose(mean, mode.float(), rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"vae_sample: the posterior's mean differs from VAE Encode's latents on ComfyUI "
                           f"{comfyui_version()} (its encode path changed): turn vae_sample off")
    return mode, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def run_inversion(node_id, model, vae, image, space, settings: InvertSettings, *, clip=None, conditioning=None,
                  prompt: str = DEFAULT_PROMPT, mask=None, resolution: int = 512, precision: str = "auto",
                  face: str = FACE_AUTO, face_mask: bool = False, random_crop: bool = False,
                  vae_sample: bool = False, checkpointing: bool = True, init=None,
                  make_param: Callable[[], LatentParam] | None = None, name: str = "inverted",
                  label: str = "w2w inversion", identity_strength: float = 0.0,
                  facenet_weights: str = FACENET_AUTO) -> tuple[InversionResult, LatentParam | None, Framed]:
    """Invert ``image`` into ``space`` on a trainable clone of ``model``; ``model`` and every input stay unchanged.

    Frames the photos (:func:`frame_photos`), drives a ProgressBar with previews of the current reconstruction, sends
    the step/loss event the web extension shows, logs every ``LOG_EVERY`` steps and stops at the next step on Cancel.
    ``make_param`` builds the parametrisation to optimise instead of β (called where autograd may record, i.e.
    outside inference mode); it is returned with the result and the framing. ``identity_strength`` > 0 adds the
    identity loss (:mod:`.identity_loss`: FaceNet from ``facenet_weights`` on the decoded clean latents) at that
    strength relative to the diffusion loss.
    """
    import comfy.model_management as mm
    import comfy.utils

    keys = check_targets(model, space)
    if identity_strength < 0 or not math.isfinite(identity_strength):
        raise ValueError(f"identity_loss must be a number >= 0 (0 = off), got {identity_strength}")
    facenet_path = None
    if identity_strength > 0:
        from .idscore import resolve_weights

        facenet_path = resolve_weights(facenet_weights)  # a missing file fails here, before any work
    framed = frame_photos(image, mask, resolution, face, face_mask, RANDOM_CROP_ROOM if random_crop else 1.0)
    if random_crop:  # a new resolution-sized crop of the larger framing at every step, as the reference
        settings = dataclasses.replace(settings, crop=resolution // getattr(vae, "downscale_ratio", 8))
    log.info("%s: %s", label, framed.note)
    send_progress_text(node_id, framed.note)  # e.g. that face framing fell back to the centre crop, and why
    context = encode_cond(clip, conditioning, prompt)
    latent_std = None
    if vae_sample:  # a fresh posterior sample at every step, as the reference (the std scaled as the latents are)
        mean, std = encode_posterior(vae, framed.pixels)
        latents = model.model.process_latent_in(mean)
        latent_std = (model.model.process_latent_in(std) - model.model.process_latent_in(torch.zeros_like(std))).abs()
    else:
        latents = model.model.process_latent_in(vae.encode(framed.pixels))
    pbar = comfy.utils.ProgressBar(settings.steps, node_id=node_id)
    denoiser = None

    def progress(step: int, total: int, info: dict) -> None:
        mm.throw_exception_if_processing_interrupted()
        show = step == total or step % PREVIEW_EVERY == 0
        pbar.update_absolute(step, total, preview_image(model, denoiser.last_x0) if show else None)
        loss = float(info["loss"])
        send_event(PROGRESS_EVENT, {"node": node_id, "step": step, "total": total, "loss": loss})
        extra = f" · identity {info['identity_loss']:.3f}" if "identity_loss" in info else ""
        send_progress_text(node_id, f"step {step}/{total} · loss {loss:.4f}{extra}")
        if step == total or step % LOG_EVERY == 0:
            log.info("%s: step %d/%d, loss %.5f", label, step, total, info["loss"])

    with torch.inference_mode(False), torch.enable_grad():
        param = None if make_param is None else make_param()
        with trainable_clone(model, space, keys, checkpointing) as (patcher, board):
            device = mm.get_torch_device()
            dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
            pcs = settings.pcs if param is None else param.pcs
            extra = IDENTITY_LOSS_BYTES if identity_strength > 0 else 0
            with device_memory_for(basis_bytes(space, pcs, precision, device, dtype) + extra, device, mm):
                sigmas = patcher.model.model_sampling.sigmas.detach().clone().float()
                denoiser = ComfyDenoiser(patcher, board, sigmas.to(device))
                masks = framed.masks
                identity = None
                if identity_strength > 0:
                    from .identity_loss import identity_loss

                    identity = identity_loss(model, vae, facenet_path, device, identity_strength)
                result = invert(space, denoiser,
                                latents.detach().clone().to(device, torch.float32), context.detach().clone().to(device),
                                settings, mask=None if masks is None else masks.clone(), init=init,
                                alphas_cumprod=alphas_cumprod_from_sigmas(sigmas), device=device, dtype=dtype,
                                callback=progress, name=name, param=param, precision=precision,
                                latent_std=None if latent_std is None else latent_std.float(), identity=identity)
    return result, param, framed


def framing_preview(framed: Framed, cls):
    """The photos as the inversion saw them (face crops or centre crops, masked areas darkened), on the node."""
    from comfy_api.latest import ui

    shown = framed.pixels
    if framed.masks is not None:
        shown = shown * (0.25 + 0.75 * framed.masks[..., None].expand_as(shown))
    return ui.PreviewImage(shown, cls=cls)


def text_condition_inputs() -> list:
    """The optional text-condition inputs of both nodes: clip + prompt, or conditioning."""
    return [
        io.Clip.Input("clip", optional=True, tooltip="Text encoder for the prompt (or connect conditioning)."),
        io.Conditioning.Input("conditioning", optional=True,
                              tooltip="Instead of clip + prompt: the conditioning to invert with."),
        io.String.Input("prompt", default=DEFAULT_PROMPT, optional=True,
                        tooltip="Prompt encoded with clip during inversion (paper: 'sks person')."),
    ]


def precision_input():
    """The optional precision input of the inversion nodes (w2w.products.basis_dtype_for)."""
    return advanced(io.Combo.Input(
        "precision", options=list(PRECISIONS), default="auto", optional=True,
        tooltip="Precision of the products with the basis (the coefficients stay float32). auto: the model's dtype on "
                "a GPU; on a CPU float16 for a large basis when this PyTorch has fast half-precision products and the "
                "RAM allows (two half copies = one float32 copy, 4 GB at 10,000 PCs; the basis work takes ~0.6x the time). "
                "float32: exact, and no extra memory on a CPU."))


def resolution_input():
    return advanced(io.Int.Input("resolution", default=512, min=64, max=2048, step=8, optional=True,
                                 tooltip="Side of the square crop the photos are resized to (paper: 512)."))


def face_inputs() -> list:
    """How the photos are framed (around the detected face, or a centre crop), the face mask, and memory."""
    return [
        io.Combo.Input("face", options=list(FACE_CHOICES), default=FACE_AUTO, optional=True,
                       tooltip="auto: find the largest face in every photo (MTCNN, weights ship with facenet-pytorch, "
                               "nothing is downloaded) and invert a square portrait around it (2x the face box, as "
                               "the space's training portraits); photos without a face are left out. Without "
                               "facenet-pytorch it falls back to the centre crop and says so. off: shorter side to "
                               "resolution, centre crop."),
        advanced(io.Boolean.Input("face_mask", default=False, optional=True,
                                  tooltip="With face auto and no mask connected: weight the loss by a feathered mask "
                                          "around the detected face, so hair, clothes and background count less.")),
        advanced(io.Boolean.Input("random_crop", default=False, optional=True,
                                  tooltip="As the reference inversion: frame a square 1/8 larger and optimise on a new "
                                          "random resolution-sized crop of it at every step (small shifts of the "
                                          "face), instead of one fixed crop.")),
        advanced(io.Boolean.Input("vae_sample", default=False, optional=True,
                                  tooltip="As the reference inversion: a fresh sample of the VAE's posterior at every "
                                          "step instead of its mean (SD1.5's VAE; small noise on the latents).")),
        advanced(io.Boolean.Input("gradient_checkpointing", default=True, optional=True,
                                  tooltip="Recompute each UNet block in the backward pass instead of keeping its "
                                          "weights and activations: about half the memory of an inversion (no second "
                                          "copy of the UNet) for one more forward pass per step (~+30 % time). Off: "
                                          "faster when memory allows.")),
    ]


def mask_input():
    return io.Mask.Input("mask", optional=True,
                         tooltip="Optional: the loss only sees where the mask is 1 (e.g. the face); same size as "
                                 "the images, one mask for all or one per image.")


def loss_curve_output():
    return io.Image.Output(display_name="loss_curve", tooltip="The loss per step (grey) and its running mean (blue).")



class W2WInvertImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WInvertImage",
            display_name="Invert Image to w2w",
            category=CATEGORY_INVERSION,
            search_aliases=["w2w inversion", "face to identity", "photo to LoRA", "weights2weights invert"],
            description="Finds the identity in the w2w space whose model best reconstructs the photo(s) (paper §3.4): "
                        "optimises the PCA coefficients with the diffusion loss while UNet, VAE and text encoder stay "
                        "frozen. Batch several photos of one person for a multi-image inversion. The input MODEL is "
                        "left unchanged; Cancel stops at the next step.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 MODEL the space was trained on (Realistic Vision v5.1 for the "
                                                "released space)."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint: encodes the photos to latents."),
                io.Image.Input("image", tooltip="One photo, or a batch of photos of the same person. Any size and aspect, "
                                                "RGB, RGBA or grey: resized (shorter side = resolution) and centre-cropped."),
                SpaceSocket.Input("space", tooltip="The w2w space (load it with pcs >= the PCs optimised here: 10,000 "
                                                   "for the reference preset)."),
                io.Combo.Input("preset", options=PRESET_CHOICES, default="reference",
                               tooltip="reference: 10,000 PCs, lr 0.1, 400 steps (paper, photos). out-of-distribution: "
                                       "1000 PCs, lr 1, 800 steps (paintings, cartoons). fast: refine init_identity "
                                       "from Encode Face to w2w, 100 steps, lr 0.1, over the PCs the space is loaded "
                                       "with (up to 10,000). custom: use pcs, steps and lr below (they are ignored by "
                                       "the other presets)."),
                advanced(io.Int.Input("pcs", default=10_000, min=1, max=100_000,
                                      tooltip="custom preset: number of PCs (coefficients) optimised.")),
                advanced(io.Int.Input("steps", default=400, min=1, max=10_000,
                                      tooltip="custom preset: optimisation steps.")),
                advanced(io.Float.Input("lr", default=0.1, min=1e-5, max=10.0, step=0.001,
                                        tooltip="custom preset: Adam learning rate (weight decay 1e-10 as the paper).")),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the timesteps and noise; the same inputs and seed give the same identity."),
                *text_condition_inputs(),
                mask_input(),
                IdentitySocket.Input("init_identity", optional=True,
                                     tooltip="Optional start point (default: the mean identity, all coefficients 0); "
                                             "the fast preset needs one (Encode Face to w2w)."),
                resolution_input(),
                precision_input(),
                *face_inputs(),
                advanced(io.Float.Input("identity_loss", default=0.0, min=0.0, max=10.0, step=0.05, optional=True,
                                        tooltip="Adds a face-identity loss (as PuLID): FaceNet's embedding of the "
                                                "decoded reconstruction at each step against the photo's. 1 = its "
                                                "gradient as large as the diffusion loss's at the start; 0 = off (the "
                                                "paper). In the miniature world, from Encode Face to w2w it passed a "
                                                "400-step inversion in 10 steps (docs/encoder.md); untested on real "
                                                "photos. Needs facenet-pytorch and the FaceNet weights (models/facenet)"
                                                "; costs a VAE decode per step.")),
                advanced(io.Combo.Input("facenet_weights", options=weights_choices(), default=FACENET_AUTO,
                                        optional=True,
                                        tooltip="identity_loss: the FaceNet VGGFace2 weights (models/facenet; auto: "
                                                "the released file name there or in the torch hub cache).")),
            ],
            outputs=[
                IdentitySocket.Output(display_name="identity", tooltip="The inverted identity."),
                loss_curve_output(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, identity_loss: float = 0.0, facenet_weights: str = FACENET_AUTO, **_):
        """The identity loss reads a FaceNet file that its name does not fingerprint: a replaced file re-runs."""
        if identity_loss is not None and identity_loss <= 0:  # None: a linked value, unknown here
            return ""
        return facenet_fingerprint(facenet_weights)

    @classmethod
    def execute(cls, model: io.Model.Type, vae: io.Vae.Type, image: io.Image.Type, space: SpaceSocket.Type,
                preset: str, pcs: int, steps: int, lr: float, seed: int, clip: io.Clip.Type | None = None,
                conditioning: io.Conditioning.Type | None = None, prompt: str = DEFAULT_PROMPT,
                mask: io.Mask.Type | None = None, init_identity: IdentitySocket.Type | None = None,
                resolution: int = 512, precision: str = "auto", face: str = FACE_AUTO,
                face_mask: bool = False, random_crop: bool = False, vae_sample: bool = False,
                gradient_checkpointing: bool = True, identity_loss: float = 0.0,
                facenet_weights: str = FACENET_AUTO) -> io.NodeOutput:
        settings = _settings(preset, pcs, steps, lr, seed)
        if preset == FAST:
            settings = fast_settings(settings, space, init_identity)
        if settings.pcs > space.pcs:
            raise ValueError(f"the {preset} preset optimises {settings.pcs:,} PCs but the space is loaded with "
                             f"{space.pcs:,}: raise pcs in Load w2w Space to {settings.pcs:,}, or use the custom preset "
                             f"with pcs <= {space.pcs:,}")
        result, _, framed = run_inversion(cls.hidden.unique_id, model, vae, image, space, settings, clip=clip,
                                          conditioning=conditioning, prompt=prompt, mask=mask, resolution=resolution,
                                          precision=precision, face=face, face_mask=face_mask,
                                          random_crop=random_crop, vae_sample=vae_sample,
                                          checkpointing=gradient_checkpointing, init=init_identity,
                                          identity_strength=identity_loss, facenet_weights=facenet_weights)
        return io.NodeOutput(result.identity, loss_curve_image(result.losses), ui=framing_preview(framed, cls))


class W2WVAEInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WVAEInvert",
            display_name="Invert Image to VAE-w2w",
            category=CATEGORY_INVERSION,
            is_experimental=True,
            search_aliases=["w2w++ inversion", "VAE-w2w invert"],
            description="Inversion through the VAE decoder (w2w++): optimises a latent z (or a Gaussian N(μ, σ²) over "
                        "it) with the diffusion loss plus the prior term, so the result stays where the VAE puts "
                        "identities. Same runner as Invert Image to w2w; UNet, VAE and text encoder stay frozen. "
                        "Experimental: no VAE-w2w has been trained on the released space yet.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 MODEL the space was trained on."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint: encodes the photos to latents."),
                io.Image.Input("image", tooltip="One photo, or a batch of photos of the same person."),
                SpaceSocket.Input("space", tooltip="The w2w space the VAE was trained on (Load w2w Space, with at least "
                                                   "as many PCs as the VAE decodes)."),
                VAESocket.Input("w2w_vae", tooltip="A trained VAE-w2w (Load VAE-w2w)."),
                io.Int.Input("steps", default=400, min=1, max=10_000, tooltip="Optimisation steps (paper: 400)."),
                io.Float.Input("lr", default=0.05, min=1e-5, max=10.0, step=0.001,
                               tooltip="Adam learning rate on the latent (latent units are ~N(0, 1))."),
                advanced(io.Float.Input(
                    "prior_weight", default=1e-3, min=0.0, max=10.0, step=1e-4,
                    tooltip="Weight of the prior term (½|z|², or the KL with gaussian) against the diffusion loss (a "
                            "per-pixel mean, ~0.1): higher keeps the identity typical.")),
                advanced(io.Boolean.Input(
                    "gaussian", default=False,
                    tooltip="Optimise a Gaussian N(μ, σ²) over the latent with a KL prior (w2w++ eq. 7) instead of a "
                            "single latent; the result decodes μ.")),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of timesteps and noise; the same inputs and seed give the same identity."),
                *text_condition_inputs(),
                mask_input(),
                LatentSocket.Input("init_latent", optional=True,
                                   tooltip="Optional start point (default: the latent origin, the VAE's centre)."),
                resolution_input(),
                precision_input(),
                *face_inputs(),
            ],
            outputs=[
                IdentitySocket.Output(display_name="identity", tooltip="The inverted identity (decoded μ)."),
                LatentSocket.Output(display_name="latent", tooltip="The inverted latent μ."),
                loss_curve_output(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, vae: io.Vae.Type, image: io.Image.Type, space: SpaceSocket.Type,
                w2w_vae: VAESocket.Type, steps: int, lr: float, prior_weight: float, gaussian: bool, seed: int,
                clip: io.Clip.Type | None = None, conditioning: io.Conditioning.Type | None = None,
                prompt: str = DEFAULT_PROMPT, mask: io.Mask.Type | None = None,
                init_latent: LatentSocket.Type | None = None, resolution: int = 512,
                precision: str = "auto", face: str = FACE_AUTO, face_mask: bool = False,
                random_crop: bool = False, vae_sample: bool = False,
                gradient_checkpointing: bool = True) -> io.NodeOutput:
        if init_latent is not None:
            init_latent.check_vae(w2w_vae)
        settings = InvertSettings(steps=steps, lr=lr, weight_decay=0.0, seed=seed)

        def make_param() -> LatentParam:
            start = None if init_latent is None else init_latent.values.clone()
            return LatentParam(w2w_vae, space, start, gaussian=gaussian, prior_weight=prior_weight,
                               generator=torch.Generator().manual_seed(seed))

        result, param, framed = run_inversion(cls.hidden.unique_id, model, vae, image, space, settings, clip=clip,
                                              conditioning=conditioning, prompt=prompt, mask=mask,
                                              resolution=resolution, precision=precision, face=face,
                                              face_mask=face_mask, random_crop=random_crop,
                                              vae_sample=vae_sample, checkpointing=gradient_checkpointing,
                                              make_param=make_param, name="vae-inverted",
                                              label="VAE-w2w inversion")
        latent = VAELatent(param.mu.detach().clone(), w2w_vae.fingerprint, (result.identity.history[-1],))
        return io.NodeOutput(result.identity, latent, loss_curve_image(result.losses), ui=framing_preview(framed, cls))


NODES = [W2WInvertImage, W2WVAEInvert]
