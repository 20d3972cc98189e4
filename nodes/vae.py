"""VAE-w2w nodes (w2w++, experimental): load a trained VAE, decode a latent (or a seed) to an identity, encode an
identity, interpolate. Inversion through the decoder is in :mod:`.inversion`.

A decoded identity is an ordinary W2W_IDENTITY of the space, so Apply, Save LoRA and every other identity node take
it unchanged. VAE files (``python -m w2w vae-train``) live in ``models/w2w_vae``.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..w2w.safeload import W2WFileError
from ..w2w.vae import VAELatent, decode_identity, encode_identity, interpolate, load_vae, sample_latents
from .folders import VAE_FOLDER, file_fingerprint, list_files, resolve_vae
from .sockets import (CATEGORY_VAE, SEED_MAX, IdentitySocket, LatentSocket, SpaceSocket, VAESocket, check_numbers,
                      schema)

SPACE_TIP = "The w2w space the VAE was trained on (Load w2w Space, with at least as many PCs as the VAE decodes)."
VAE_TIP = "A trained VAE-w2w (Load VAE-w2w)."
EXPERIMENTAL = " Experimental: no VAE-w2w has been trained on the released space yet (see docs/vae.md)."


class W2WVAELoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WVAELoad",
            display_name="Load VAE-w2w",
            category=CATEGORY_VAE,
            is_experimental=True,
            search_aliases=["w2w++", "weights2weights VAE"],
            description="Loads a VAE-w2w (w2w++: a variational autoencoder over a space's identities) from "
                        "models/w2w_vae. Train one with `python -m w2w vae-train`." + EXPERIMENTAL,
            inputs=[io.Combo.Input("vae_name", options=list_files(VAE_FOLDER),
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
        return schema(
            node_id="W2WVAEDecode",
            display_name="VAE-w2w Decode",
            category=CATEGORY_VAE,
            is_experimental=True,
            description="Decodes a VAE latent to an identity of the space. Without a latent it samples one from "
                        "N(0, I)·temperature with the seed (a new identity). A VAE trained on raw weights is projected "
                        "on the space's loaded PCs." + EXPERIMENTAL,
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                VAESocket.Input("w2w_vae", tooltip=VAE_TIP),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
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
    def execute(cls, space: SpaceSocket.Type, w2w_vae: VAESocket.Type, seed: int, temperature: float,
                latent: LatentSocket.Type | None = None) -> io.NodeOutput:
        check_numbers(cls, temperature=temperature)
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
        return schema(
            node_id="W2WVAEEncode",
            display_name="VAE-w2w Encode",
            category=CATEGORY_VAE,
            is_experimental=True,
            description="Encodes an identity of the space to the VAE's latent (the posterior mean)." + EXPERIMENTAL,
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                VAESocket.Input("w2w_vae", tooltip=VAE_TIP),
                IdentitySocket.Input("identity", tooltip="The identity to encode (same space as the VAE)."),
            ],
            outputs=[LatentSocket.Output(display_name="latent", tooltip="The identity's latent.")],
        )

    @classmethod
    def execute(cls, space: SpaceSocket.Type, w2w_vae: VAESocket.Type, identity: IdentitySocket.Type) -> io.NodeOutput:
        identity.check_space(space)
        mu, _ = encode_identity(w2w_vae, identity, space)
        return io.NodeOutput(VAELatent(mu, w2w_vae.fingerprint, (f"vae encode {identity.name or 'identity'}",)))


class W2WVAEInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WVAEInterpolate",
            display_name="VAE-w2w Interpolate",
            category=CATEGORY_VAE,
            is_experimental=True,
            description="Interpolates two latents of the same VAE: spherical (keeps the typical norm of N(0, I) "
                        "latents, so the midpoint stays a plausible identity) or linear." + EXPERIMENTAL,
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
    def execute(cls, w2w_vae: VAESocket.Type, latent_a: LatentSocket.Type, latent_b: LatentSocket.Type, t: float,
                mode: str) -> io.NodeOutput:
        check_numbers(cls, t=t)
        latent_a.check_vae(w2w_vae)
        latent_b.check_vae(w2w_vae)
        z = interpolate(latent_a.values, latent_b.values, t, mode)
        return io.NodeOutput(VAELatent(z, w2w_vae.fingerprint, (f"vae {mode} t={t:g}",)))


NODES = [W2WVAELoad, W2WVAEDecode, W2WVAEEncode, W2WVAEInterpolate]
