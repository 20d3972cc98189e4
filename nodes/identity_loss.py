"""The identity loss of Invert Image to w2w on a ComfyUI host: FaceNet on the VAE-decoded clean latents.

At every step the UNet predicts the clean latents x̂0 (ComfyUI's ``denoised``); they are decoded by a private,
differentiable copy of the checkpoint's VAE decoder and embedded by FaceNet (VGGFace2, frozen), and 1 − cos with the
photo's own embedding is added to the diffusion loss (:class:`w2w.invert.IdentityLoss`).

Why a private decoder: ComfyUI builds its models under ``torch.inference_mode()``, so the VAE's weights are inference
tensors that autograd refuses to save for a backward pass; and on hosts with dynamic VRAM the managed VAE pages its
weights in per operation. A plain ``AutoencoderKL`` rebuilt from the VAE's state dict outside inference mode is never
managed by ComfyUI and runs as plain PyTorch. The SD1.5 VAE (a KL autoencoder) is the one supported.
"""
from __future__ import annotations

import torch

from ..w2w.encoder import FaceNetBackbone, _facenet_state
from ..w2w.invert import IdentityLoss
from .sockets import comfyui_version

FACE_FRACTION = 0.6  # the central part of the inversion's face framing that FaceNet sees (the encoder's default)
MARGIN = 4  # latent pixels decoded around that part (the decoder's convolutions see past the crop's edge)


def _sd15_ddconfig(state: dict) -> dict:
    """The ``ddconfig`` of ComfyUI's SD-style KL VAE for this state dict (as comfy.sd.VAE derives it)."""
    ch_mult = [1, 2, 4, 4] if "decoder.up.3.block.0.conv1.weight" in state else [1, 2, 4]
    return {"double_z": True, "z_channels": int(state["decoder.conv_in.weight"].shape[1]), "resolution": 256,
            "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": ch_mult, "num_res_blocks": 2, "attn_resolutions": [],
            "dropout": 0.0}


def private_decoder(vae, device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A differentiable copy of ``vae``'s KL autoencoder (ComfyUI VAE), frozen, on ``device``: call it inside
    ``torch.inference_mode(False)``. ``vae`` is left as it is."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, AutoencoderKL):
        raise ValueError(f"the identity loss decodes with the checkpoint's SD1.5 VAE (a KL autoencoder); this VAE "
                         f"({type(model).__name__}) on ComfyUI {comfyui_version()} is not one: set identity_loss to 0")
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if "post_quant_conv.weight" not in state or "decoder.conv_in.weight" not in state:
        raise ValueError(f"the VAE on ComfyUI {comfyui_version()} has no SD-style decoder weights "
                         "(decoder.*, post_quant_conv.*): set identity_loss to 0")
    with torch.inference_mode(False):
        copy = AutoencoderKL(ddconfig=_sd15_ddconfig(state), embed_dim=int(state["post_quant_conv.weight"].shape[1]))
        missing, unexpected = copy.load_state_dict(state, strict=False)
        if [k for k in missing if k.startswith(("decoder.", "post_quant_conv."))]:
            raise ValueError(f"the VAE's decoder does not load into an SD1.5 KL decoder on ComfyUI {comfyui_version()} "
                             f"(missing {missing[:3]}): set identity_loss to 0")
        copy.encoder = None  # only the decoder is used
        return copy.eval().requires_grad_(False).to(device, dtype)


def facenet(weights_path: str, device) -> torch.nn.Module:
    """FaceNet (VGGFace2) from a local weights file, frozen, on ``device``: images in [0, 1] -> unit embeddings
    (the whole image, resized to 160 px)."""
    with torch.inference_mode(False):
        return FaceNetBackbone(_facenet_state(weights_path), 1.0).to(device)


def face_window(height: int, width: int) -> tuple[slice, slice, int, int]:
    """(rows, cols) of the latents decoded — the central FACE_FRACTION square plus MARGIN, inside the latents — and
    (offset, side) in latent pixels of that square within the decoded window."""
    side = max(1, round(min(height, width) * FACE_FRACTION))
    top, left = (height - side) // 2, (width - side) // 2
    margin = min(MARGIN, top, left)
    return (slice(top - margin, top + side + margin), slice(left - margin, left + side + margin), margin, side)


def identity_loss(model, vae, weights_path: str, device, strength: float) -> IdentityLoss:
    """The :class:`IdentityLoss` of ``strength`` (balanced: 1 = its gradient the diffusion loss's size at the start)
    for inversion latents in ``model``'s units: process_latent_out, the private decoder on the face's window only
    (the central FACE_FRACTION of the framing, where FaceNet looks, and a margin), FaceNet."""
    decoder = private_decoder(vae, device)
    net = facenet(weights_path, device)
    latent_out = model.model.process_latent_out

    def embed(latents: torch.Tensor) -> torch.Tensor:
        rows, cols, margin, side = face_window(*latents.shape[-2:])
        z = latent_out(latents[..., rows, cols].float())
        images = ((decoder.decode(z.to(device, torch.float32)) + 1.0) / 2.0).clamp(0.0, 1.0)
        scale = images.shape[-1] // z.shape[-1]  # pixels per latent pixel (8 for SD1.5)
        face = images[..., margin * scale:(margin + side) * scale, margin * scale:(margin + side) * scale]
        return net(face)

    return IdentityLoss(embed, strength, balance=True)
