"""VAE-w2w nodes inside the real ComfyUI: Load → Decode (seed) → Apply → KSampler → VAEDecode, and the latent
round trip Encode → Interpolate → Decode. The VAE is a tiny one trained by the test on a synthetic space."""
from __future__ import annotations

import pytest
import torch

from comfyhost import SD15_STANDIN_NAME
from w2w.convert import convert_release
from w2w.space import load_space
from w2w.synthetic import write_release
from w2w.vae import TrainConfig, decode_identity, load_vae, sample_latents, save_vae, train_from_space

PCS = 16
SPACE_FILE = "w2w-vae-test-space.safetensors"
VAE_FILE = "w2w-vae-test.safetensors"


@pytest.fixture(scope="module")
def vae_files(comfy_host, tmp_path_factory):
    """A synthetic space (released layout, 16 PCs) and a 4-unit VAE over its coefficients, staged in the model folders."""
    root = tmp_path_factory.mktemp("w2w-vae")
    release = root / "release"
    write_release(str(release), pcs=PCS, models=300, seed=4, weight_scale=0.05)
    space_path = root / SPACE_FILE
    convert_release(str(release), str(space_path))
    space = load_space(str(space_path), PCS)
    vae = train_from_space(space, latent=4, hidden=(32,), train=TrainConfig(epochs=4, seed=0)).vae
    vae_path = root / VAE_FILE
    save_vae(vae, str(vae_path))
    comfy_host.stage_model("w2w", space_path, SPACE_FILE)
    comfy_host.stage_model("w2w_vae", vae_path, VAE_FILE)
    return space, load_vae(str(vae_path))


def decode_graph(seed: int, temperature: float = 1.0) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_STANDIN_NAME}},
        "2": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE_FILE, "pcs": PCS}},
        "3": {"class_type": "W2WVAELoad", "inputs": {"vae_name": VAE_FILE}},
        "4": {"class_type": "W2WVAEDecode", "inputs": {"space": ["2", 0], "w2w_vae": ["3", 0], "seed": seed,
                                                       "temperature": temperature}},
        "5": {"class_type": "W2WApplyLoRA", "inputs": {"model": ["1", 0], "space": ["2", 0], "identity": ["4", 0],
                                                      "strength": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks person", "clip": ["1", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 1, "cfg": 3.0, "sampler_name": "euler",
                                                  "scheduler": "normal", "denoise": 1.0, "model": ["5", 0],
                                                  "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"filename_prefix": "w2w-vae-test", "images": ["10", 0]}},
    }


def test_vae_nodes_are_registered_with_tooltips(comfy_host, vae_files):
    for node_id in ("W2WVAELoad", "W2WVAEDecode", "W2WVAEEncode", "W2WVAEInterpolate"):
        schema = comfy_host.node_class(node_id).INPUT_TYPES()
        for group in schema.values():
            for name, spec in group.items():
                if isinstance(spec, tuple) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_decode_apply_ksampler(comfy_host, vae_files):
    space, vae = vae_files
    result = comfy_host.run_graph(decode_graph(seed=7))
    image = result.output("10")
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all() and float(image.std()) > 0.01
    identity = result.output("4")
    expected = decode_identity(vae, space, sample_latents(4, 1, seed=7)[0])
    assert identity.space_fingerprint == space.fingerprint
    torch.testing.assert_close(identity.coefficients.clone(), expected.coefficients, rtol=1e-5, atol=1e-6)
    patched = result.output("5")
    assert len(patched.patches) == 64  # Apply took the decoded identity unchanged
    assert len(result.image_files()) == 1


def test_encode_interpolate_decode_round_trip(comfy_host, vae_files):
    space, vae = vae_files
    graph = {
        "2": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE_FILE, "pcs": PCS}},
        "3": {"class_type": "W2WVAELoad", "inputs": {"vae_name": VAE_FILE}},
        "4": {"class_type": "W2WVAEDecode", "inputs": {"space": ["2", 0], "w2w_vae": ["3", 0], "seed": 1,
                                                       "temperature": 1.0}},
        "5": {"class_type": "W2WVAEDecode", "inputs": {"space": ["2", 0], "w2w_vae": ["3", 0], "seed": 2,
                                                       "temperature": 0.5}},
        "6": {"class_type": "W2WVAEInterpolate", "inputs": {"w2w_vae": ["3", 0], "latent_a": ["4", 1],
                                                            "latent_b": ["5", 1], "t": 1.0, "mode": "slerp"}},
        "7": {"class_type": "W2WVAEDecode", "inputs": {"space": ["2", 0], "w2w_vae": ["3", 0], "seed": 0,
                                                       "temperature": 1.0, "latent": ["6", 0]}},
        "8": {"class_type": "W2WVAEEncode", "inputs": {"space": ["2", 0], "w2w_vae": ["3", 0], "identity": ["7", 0]}},
        "9": {"class_type": "W2WVAEDecode", "inputs": {"space": ["2", 0], "w2w_vae": ["3", 0], "seed": 0,
                                                       "temperature": 1.0, "latent": ["8", 0]}},
        "10": {"class_type": "W2WSaveIdentity", "inputs": {"identity": ["9", 0], "filename_prefix": "w2w-vae-rt"}},
    }
    result = comfy_host.run_graph(graph)
    b = result.output("5", 1).values.clone()
    torch.testing.assert_close(b, 0.5 * sample_latents(4, 1, seed=2)[0])
    torch.testing.assert_close(result.output("6").values.clone(), b, rtol=1e-5, atol=1e-6)  # slerp at t = 1 is B
    torch.testing.assert_close(result.output("7").coefficients.clone(), result.output("5").coefficients.clone())
    encoded = result.output("8")
    assert encoded.values.shape == (4,) and encoded.vae_fingerprint == vae.fingerprint
    assert result.output("9").history[-1].startswith("vae encode")  # decoded again from the encoded latent


def test_invert_through_the_decoder(comfy_host, vae_files):
    """A few steps of Invert Image to VAE-w2w on the stand-in: the latent moves, the identity is its decoding."""
    import numpy as np
    from PIL import Image

    space, vae = vae_files
    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([xx / 64, yy / 64, 0.5 + 0.3 * np.sin(xx / 5.0)], -1) * 255
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(comfy_host.base_dir / "input" / "vae-invert.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_STANDIN_NAME}},
        "2": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE_FILE, "pcs": PCS}},
        "3": {"class_type": "W2WVAELoad", "inputs": {"vae_name": VAE_FILE}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "vae-invert.png"}},
        "5": {"class_type": "W2WVAEInvert", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "image": ["4", 0], "space": ["2", 0], "w2w_vae": ["3", 0],
            "steps": 3, "lr": 0.5, "prior_weight": 1e-3, "gaussian": False, "seed": 1, "clip": ["1", 1],
            "prompt": "sks person", "resolution": 64, "face": "off"}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
        "7": {"class_type": "W2WSaveIdentity", "inputs": {"identity": ["5", 0], "filename_prefix": "w2w-vae-inv"}},
    }
    result = comfy_host.run_graph(graph)
    identity, latent = result.output("5", 0), result.output("5", 1)
    z = latent.values.clone()
    assert float(z.abs().max()) > 0.05  # three Adam steps of lr 0.5 moved it off the origin
    expected = decode_identity(vae, space, z)
    torch.testing.assert_close(identity.coefficients.clone(), expected.coefficients, rtol=1e-4, atol=1e-5)
    assert "vae-latent=4 point" in identity.history[-1]
    assert identity.space_fingerprint == space.fingerprint
