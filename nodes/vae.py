"""VAE-w2w nodes: load a trained VAE, decode a latent (or a seed) to an identity, encode an identity, interpolate,
and invert photos through the decoder.

A decoded identity is an ordinary W2W_IDENTITY of the space, so Apply, Save LoRA and every other identity node take
it unchanged. VAE files (``python -m w2w vae-train``) live in ``models/w2w_vae``.
"""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

from ..w2w.safeload import W2WFileError
from ..w2w.vae import (LatentParam, VAELatent, decode_identity, encode_identity, interpolate, load_vae,
                       sample_latents)
from .common import CATEGORY, IdentitySocket, SpaceSocket, check_targets, file_fingerprint

log = logging.getLogger(__name__)

VAE_FOLDER = "w2w_vae"  # folder_paths name: models/w2w_vae

# Values: w2w.vae.W2WVAE (a trained, frozen VAE) and w2w.vae.VAELatent (a latent tied to its VAE).
VAESocket = io.Custom("W2W_VAE")
LatentSocket = io.Custom("W2W_VAE_LATENT")

SPACE_TIP = "The w2w space the VAE was trained on (Load w2w Space, with at least as many PCs as the VAE decodes)."
VAE_TIP = "A trained VAE-w2w (Load VAE-w2w)."


def register_vae_folder() -> None:
    """Register ``models/w2w_vae`` for .safetensors VAE files (idempotent)."""
    import folder_paths

    folder_paths.add_model_folder_path(VAE_FOLDER, os.path.join(folder_paths.models_dir, VAE_FOLDER))
    folder_paths.folder_names_and_paths[VAE_FOLDER][1].add(".safetensors")


def list_vaes() -> list[str]:
    import folder_paths

    register_vae_folder()
    return sorted(folder_paths.get_filename_list(VAE_FOLDER))


def resolve_vae(name: str) -> str:
    import folder_paths

    register_vae_folder()
    path = folder_paths.get_full_path(VAE_FOLDER, name)
    if path is None:
        raise W2WFileError(f"VAE-w2w file {name!r} not found in {', '.join(folder_paths.get_folder_paths(VAE_FOLDER))}: "
                           "train one with `python -m w2w vae-train SPACE --out models/w2w_vae/NAME.safetensors`")
    return path


class W2WVAELoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="W2WVAELoad",
            display_name="Load VAE-w2w",
            category=CATEGORY,
            description="Loads a VAE-w2w (w2w++: a variational autoencoder over a space's identities) from "
                        "models/w2w_vae. Train one with `python -m w2w vae-train`.",
            inputs=[io.Combo.Input("vae_name", options=list_vaes(),
                                   tooltip="A .safetensors file written by `python -m w2w vae-train`.")],
            outputs=[VAESocket.Output(display_name="w2w_vae", tooltip="The VAE (frozen).")],
        )

    @classmethod
    def validate_inputs(cls, vae_name: str) -> bool | str:
        try:
            resolve_vae(vae_name)
        except W2WFileError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, vae_name: str):
        return file_fingerprint(resolve_vae(vae_name))

    @classmethod
    def execute(cls, vae_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_vae(resolve_vae(vae_name)))


class W2WVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="W2WVAEDecode",
            display_name="VAE-w2w Decode",
            category=CATEGORY,
            description="Decodes a VAE latent to an identity of the space. Without a latent it samples one from "
                        "N(0, I)·temperature with the seed (a new identity). A VAE trained on raw weights is projected "
                        "on the space's loaded PCs.",
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                VAESocket.Input("w2w_vae", tooltip=VAE_TIP),
                io.Int.Input("seed", default=0, min=0, max=0xFFFF_FFFF_FFFF_FFFF, control_after_generate=True,
                             tooltip="Seed of the sampled latent (ignored when a latent is connected)."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Scales the sampled latent: 0 gives the decoder's centre, <1 typical identities, "
                                       ">1 unusual ones (ignored when a latent is connected)."),
                LatentSocket.Input("latent", optional=True,
                                   tooltip="A latent to decode (VAE-w2w Encode or Interpolate) instead of sampling."),
            ],
            outputs=[
                IdentitySocket.Output(display_name="identity", tooltip="The decoded identity (use it with Apply)."),
                LatentSocket.Output(display_name="latent", tooltip="The latent that was decoded."),
            ],
        )

    @classmethod
    def execute(cls, space, w2w_vae, seed: int, temperature: float, latent=None) -> io.NodeOutput:
        name = "vae"
        if latent is None:
            z = sample_latents(w2w_vae.latent, 1, seed, temperature)[0]
            latent = VAELatent(z, w2w_vae.fingerprint, (f"vae sample seed={seed} temperature={temperature:g}",))
            name = f"vae-{seed}"
        latent.check_vae(w2w_vae)
        step = " | ".join(latent.history + ("vae decode",))
        return io.NodeOutput(decode_identity(w2w_vae, space, latent.values, name=name, step=step), latent)


class W2WVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="W2WVAEEncode",
            display_name="VAE-w2w Encode",
            category=CATEGORY,
            description="Encodes an identity of the space to the VAE's latent (the posterior mean).",
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                VAESocket.Input("w2w_vae", tooltip=VAE_TIP),
                IdentitySocket.Input("identity", tooltip="The identity to encode (same space as the VAE)."),
            ],
            outputs=[LatentSocket.Output(display_name="latent", tooltip="The identity's latent.")],
        )

    @classmethod
    def execute(cls, space, w2w_vae, identity) -> io.NodeOutput:
        identity.check_space(space)
        mu, _ = encode_identity(w2w_vae, identity, space)
        return io.NodeOutput(VAELatent(mu, w2w_vae.fingerprint, (f"vae encode {identity.name or 'identity'}",)))


class W2WVAEInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="W2WVAEInterpolate",
            display_name="VAE-w2w Interpolate",
            category=CATEGORY,
            description="Interpolates two latents of the same VAE: spherical (keeps the typical norm of N(0, I) "
                        "latents, so the midpoint stays a plausible identity) or linear.",
            inputs=[
                VAESocket.Input("w2w_vae", tooltip=VAE_TIP),
                LatentSocket.Input("latent_a", tooltip="Latent A (t = 0)."),
                LatentSocket.Input("latent_b", tooltip="Latent B (t = 1)."),
                io.Float.Input("t", default=0.5, min=-1.0, max=2.0, step=0.05,
                               tooltip="0 gives A, 1 gives B; outside 0..1 extrapolates."),
                io.Combo.Input("mode", options=["slerp", "linear"], default="slerp",
                               tooltip="slerp: along the great circle (Shoemake 1985); linear: (1 - t)·A + t·B."),
            ],
            outputs=[LatentSocket.Output(display_name="latent", tooltip="The interpolated latent.")],
        )

    @classmethod
    def execute(cls, w2w_vae, latent_a, latent_b, t: float, mode: str) -> io.NodeOutput:
        latent_a.check_vae(w2w_vae)
        latent_b.check_vae(w2w_vae)
        z = interpolate(latent_a.values, latent_b.values, t, mode)
        return io.NodeOutput(VAELatent(z, w2w_vae.fingerprint, (f"vae {mode} t={t:g}",)))


class W2WVAEInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .invert import precision_input, text_condition_inputs

        return io.Schema(
            node_id="W2WVAEInvert",
            display_name="Invert Image to VAE-w2w",
            category=CATEGORY,
            description="Inversion through the VAE decoder (w2w++): optimises a latent z (or a Gaussian N(μ, σ²) over "
                        "it) with the diffusion loss plus the prior term, so the result stays where the VAE puts "
                        "identities. Same loop as Invert Image to w2w; UNet, VAE and text encoder stay frozen.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 MODEL the space was trained on."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint: encodes the photos to latents."),
                io.Image.Input("image", tooltip="One photo, or a batch of photos of the same person."),
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                VAESocket.Input("w2w_vae", tooltip=VAE_TIP),
                io.Int.Input("steps", default=400, min=1, max=10_000, tooltip="Optimisation steps (paper: 400)."),
                io.Float.Input("lr", default=0.05, min=1e-5, max=10.0, step=0.001,
                               tooltip="Adam learning rate on the latent (latent units are ~N(0, 1))."),
                io.Float.Input("prior_weight", default=1e-3, min=0.0, max=10.0, step=1e-4,
                               tooltip="Weight of the prior term (½|z|², or the KL with gaussian) against the "
                                       "diffusion loss (a per-pixel mean, ~0.1): higher keeps the identity typical."),
                io.Boolean.Input("gaussian", default=False,
                                 tooltip="Optimise a Gaussian N(μ, σ²) over the latent with a KL prior (w2w++ eq. 7) "
                                         "instead of a single latent; the result decodes μ."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFF_FFFF_FFFF_FFFF, control_after_generate=True,
                             tooltip="Seed of timesteps and noise; the same inputs and seed give the same identity."),
                *text_condition_inputs(),
                io.Mask.Input("mask", optional=True, tooltip="Optional: the loss only sees where the mask is 1."),
                LatentSocket.Input("init_latent", optional=True,
                                   tooltip="Optional start point (default: the latent origin, the VAE's centre)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8, optional=True,
                             tooltip="Side of the square crop the photos are resized to (paper: 512)."),
                precision_input(),
            ],
            outputs=[
                IdentitySocket.Output(display_name="identity", tooltip="The inverted identity (decoded μ)."),
                LatentSocket.Output(display_name="latent", tooltip="The inverted latent μ."),
                io.Image.Output(display_name="loss_curve", tooltip="The loss per step and its running mean."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, image, space, w2w_vae, steps: int, lr: float, prior_weight: float, gaussian: bool,
                seed: int, clip=None, conditioning=None, prompt: str = "sks person", mask=None, init_latent=None,
                resolution: int = 512, precision: str = "auto") -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..w2w.diffusion import alphas_cumprod_from_sigmas
        from ..w2w.invert import InvertSettings, invert
        from .invert import (ComfyDenoiser, encode_cond, loss_curve_image, prepare_image_mask, prepare_images,
                             trainable_clone)

        check_targets(model, space)
        if init_latent is not None:
            init_latent.check_vae(w2w_vae)
        settings = InvertSettings(steps=steps, lr=lr, weight_decay=0.0, seed=seed)
        pixels = prepare_images(image, resolution)
        masks = prepare_image_mask(mask, image, resolution)
        context = encode_cond(clip, conditioning, prompt)
        latents = model.model.process_latent_in(vae.encode(pixels))
        pbar = comfy.utils.ProgressBar(steps, node_id=cls.hidden.unique_id)

        def progress(step: int, total: int, info: dict) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(step, total)
            if step == total or step % 50 == 0:
                log.info("VAE-w2w inversion: step %d/%d, loss %.5f", step, total, info["loss"])

        with torch.inference_mode(False), torch.enable_grad():
            param = LatentParam(w2w_vae, space, None if init_latent is None else init_latent.values.clone(),
                                gaussian=gaussian, prior_weight=prior_weight,
                                generator=torch.Generator().manual_seed(seed))
            with trainable_clone(model, space) as (patcher, board):
                device = mm.get_torch_device()
                dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
                sigmas = patcher.model.model_sampling.sigmas.detach().clone().float()
                result = invert(space, ComfyDenoiser(patcher, board, sigmas.to(device)),
                                latents.detach().clone().to(device, torch.float32), context.detach().clone().to(device),
                                settings, mask=None if masks is None else masks.clone(),
                                alphas_cumprod=alphas_cumprod_from_sigmas(sigmas), device=device, dtype=dtype,
                                callback=progress, name="vae-inverted", param=param, precision=precision)
            latent = VAELatent(param.mu.detach().clone(), w2w_vae.fingerprint, (result.identity.history[-1],))
        return io.NodeOutput(result.identity, latent, loss_curve_image(result.losses))


NODES = [W2WVAELoad, W2WVAEDecode, W2WVAEEncode, W2WVAEInterpolate, W2WVAEInvert]
