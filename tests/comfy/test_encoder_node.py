"""Encode Face to w2w in the real ComfyUI, and the fast preset of Invert Image to w2w that refines its identity.

The encoder is a small conv encoder built by the test for a synthetic 16-PC space in the released layout, with a
non-zero head (a fresh one would always give the mean). Its identity is checked against the encoder applied by the
test itself to a centre crop it makes with plain torch.
"""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyhost import SD15_STANDIN_NAME, GraphError
from w2w.convert import convert_release
from w2w.encoder import build_encoder, save_encoder
from w2w.space import load_space
from w2w.synthetic import write_release

PCS = 16
P = 8
SIZE = 16
SPACE_FILE = "w2w-encoder-test-space.safetensors"
OTHER_SPACE_FILE = "w2w-encoder-other-space.safetensors"
ENCODER_FILE = "w2w-encoder-test.safetensors"


@pytest.fixture(scope="module")
def spaces(comfy_host, tmp_path_factory):
    root = tmp_path_factory.mktemp("w2w-encoder-spaces")
    for name, seed in ((SPACE_FILE, 11), (OTHER_SPACE_FILE, 12)):
        write_release(str(root / name[:-12]), pcs=PCS, models=200, seed=seed, weight_scale=0.02)
        convert_release(str(root / name[:-12]), str(root / name))
        comfy_host.stage_model("w2w", root / name, name)
    return load_space(str(root / SPACE_FILE)), load_space(str(root / OTHER_SPACE_FILE))


@pytest.fixture(scope="module")
def encoder(comfy_host, spaces, tmp_path_factory):
    space, _ = spaces
    enc = build_encoder(space, P, "conv", image_size=SIZE, width=8, hidden=16, seed=3)
    with torch.no_grad():  # a head that depends on the photo
        enc.head[-1].weight.copy_(torch.randn(enc.head[-1].weight.shape, generator=torch.Generator().manual_seed(0)))
    path = tmp_path_factory.mktemp("w2w-encoders") / ENCODER_FILE
    save_encoder(enc.eval(), str(path))
    comfy_host.stage_model("w2w_encoders", path, ENCODER_FILE)
    return enc


@pytest.fixture(scope="module")
def photos(comfy_host):
    gen = np.random.default_rng(1)
    for name, (w, h) in (("encode-a.png", (48, 40)), ("encode-b.png", (48, 40))):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx / w, yy / h, 0.5 + 0.4 * np.cos(xx / 4.0)], -1) * 220 + gen.integers(0, 35, (h, w, 3))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(comfy_host.base_dir / "input" / name)


def encode_graph(space: str = SPACE_FILE, batch: bool = False) -> dict:
    graph = {
        "1": {"class_type": "W2WLoadSpace", "inputs": {"space": space, "pcs": PCS}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "encode-a.png"}},
        "3": {"class_type": "W2WEncodeFace", "inputs": {"image": ["2", 0], "space": ["1", 0], "encoder": ENCODER_FILE,
                                                       "face": "off"}},
        "4": {"class_type": "W2WSaveIdentity", "inputs": {"identity": ["3", 0], "filename_prefix": "encoded"}},
    }
    if batch:
        graph["5"] = {"class_type": "LoadImage", "inputs": {"image": "encode-b.png"}}
        graph["6"] = {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["5", 0]}}
        graph["3"]["inputs"]["image"] = ["6", 0]
    return graph


def centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, 3) -> (N, 3, size, size) as the inversion's face: off framing is documented: the shorter
    side resized to ``size`` (antialiased bilinear), then the centre square."""
    x = image.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


def test_node_is_registered(comfy_host):
    assert "W2WEncodeFace" in comfy_host.pack_node_ids
    schema = comfy_host.node_class("W2WEncodeFace").GET_SCHEMA()
    assert schema.category == "w2w/inversion" and schema.description
    assert all(getattr(i, "tooltip", None) for i in schema.inputs)


def test_encode_face_gives_an_identity_of_the_space(comfy_host, spaces, encoder, photos):
    """The identity is the encoder applied to the centre-cropped photo: the same float32 operations as the test's own
    crop, so equal up to float32 rounding of a differently ordered sum (default float32 tolerances)."""
    space, _ = spaces
    result = comfy_host.run_graph(encode_graph())
    identity, image = result.output("3", 0), result.output("2", 0)
    assert identity.space_fingerprint == space.fingerprint and identity.pcs == P
    with torch.no_grad():
        expected = encoder(centre_crop(image, SIZE))[0]
    torch.testing.assert_close(identity.coefficients, expected)
    assert not torch.allclose(expected, space.coef_mean[:P])  # the head depends on the photo: not the mean model
    assert identity.history[0].startswith("encode photos=1 pcs=8 backbone=conv")


def test_a_batch_of_photos_gives_the_mean_prediction(comfy_host, spaces, encoder, photos):
    result = comfy_host.run_graph(encode_graph(batch=True))
    identity, a, b = result.output("3", 0), result.output("2", 0), result.output("5", 0)
    with torch.no_grad():
        per_photo = encoder(centre_crop(torch.cat([a, b]), SIZE))
    assert (per_photo[0] - per_photo[1]).abs().max() > 1e-3
    torch.testing.assert_close(identity.coefficients, per_photo.mean(0))


RETRIEVAL_FILE = "w2w-encoder-retrieval-test.safetensors"


def test_a_retrieval_encoder_answers_a_training_model_of_the_loaded_space(comfy_host, spaces, photos,
                                                                          tmp_path_factory):
    """A retrieval encoder stores row numbers of the space's training models; the node loads their coefficients from
    the space it is given: the identity is exactly the training model the encoder ranks first for the photo."""
    space, _ = spaces
    rows = torch.tensor([3, 10, 50, 120, 199])
    enc = build_encoder(space, P, "conv", image_size=SIZE, width=8, hidden=16, seed=4, head="retrieve", embed=8,
                        gallery_rows=rows)
    path = tmp_path_factory.mktemp("w2w-retrieval") / RETRIEVAL_FILE
    save_encoder(enc.eval(), str(path))
    comfy_host.stage_model("w2w_encoders", path, RETRIEVAL_FILE)
    graph = encode_graph()
    graph["3"]["inputs"]["encoder"] = RETRIEVAL_FILE
    result = comfy_host.run_graph(graph)
    identity, image = result.output("3", 0), result.output("2", 0)
    with torch.no_grad():
        x = centre_crop(image, SIZE)
        first = int(enc.similarities(enc.features(x)).argmax(1)[0])
    torch.testing.assert_close(identity.coefficients, space.train_coefs[rows[first], :P])
    with pytest.raises(GraphError, match="was trained for the w2w space .* not for the loaded space"):
        comfy_host.run_graph({**graph, "1": {"class_type": "W2WLoadSpace",
                                             "inputs": {"space": OTHER_SPACE_FILE, "pcs": PCS}}})


def test_an_encoder_of_another_space_is_refused(comfy_host, spaces, encoder, photos):
    with pytest.raises(GraphError, match="was trained for the w2w space .* not for the loaded space"):
        comfy_host.run_graph(encode_graph(space=OTHER_SPACE_FILE))


def test_a_missing_encoder_file_says_how_to_make_one(comfy_host, spaces, photos):
    graph = encode_graph()
    graph["3"]["inputs"]["encoder"] = "nope.safetensors"
    with pytest.raises(GraphError, match="train-encoder"):
        comfy_host.run_graph(graph)


def invert_graph(preset: str, with_init: bool, steps: int = 2) -> dict:
    graph = encode_graph()
    graph.update({
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_STANDIN_NAME}},
        "11": {"class_type": "W2WInvertImage", "inputs": {
            "model": ["10", 0], "vae": ["10", 2], "image": ["2", 0], "space": ["1", 0], "preset": preset,
            "pcs": PCS, "steps": steps, "lr": 0.1, "seed": 0, "clip": ["10", 1], "prompt": "sks person",
            "resolution": 64, "face": "off"}},
        "12": {"class_type": "W2WSaveIdentity", "inputs": {"identity": ["11", 0], "filename_prefix": "refined"}},
    })
    if with_init:
        graph["11"]["inputs"]["init_identity"] = ["3", 0]
    return graph


def test_fast_preset_needs_an_encoded_identity(comfy_host, spaces, encoder, photos):
    with pytest.raises(GraphError, match="fast preset .* init_identity to Encode Face to w2w"):
        comfy_host.run_graph(invert_graph("fast", with_init=False))


def test_fast_preset_optimises_the_loaded_pcs_up_to_its_own(comfy_host, spaces):
    import sys

    inversion = sys.modules[comfy_host.node_class("W2WInvertImage").__module__]
    identity_module = comfy_host.pack_module("w2w.identity")
    invert_module = comfy_host.pack_module("w2w.invert")
    space, _ = spaces
    base = invert_module.PRESETS["fast"]
    init = identity_module.Identity(torch.zeros(P), space.fingerprint)
    assert inversion.fast_settings(base, space, init).pcs == PCS  # 16 loaded < 10,000
    assert inversion.fast_settings(base, type("S", (), {"pcs": 20_000})(), init).pcs == base.pcs
    with pytest.raises(ValueError, match="Encode Face to w2w"):
        inversion.fast_settings(base, space, None)


@pytest.mark.slow
def test_fast_preset_refines_the_encoded_identity(comfy_host, spaces, encoder, photos):
    """Encode Face → Invert (fast): the preset's 100 steps from the encoder's identity, over the 16 loaded PCs."""
    gc.collect()
    result = comfy_host.run_graph(invert_graph("fast", with_init=True))
    encoded, refined = result.output("3", 0), result.output("11", 0)
    assert refined.pcs == PCS and refined.space_fingerprint == encoded.space_fingerprint
    assert refined.history[0].startswith("encode photos=1")
    assert refined.history[-1].startswith("invert images=1 pcs=16 steps=100 lr=0.1")
    assert not torch.equal(refined.coefficients[:P], encoded.coefficients)


def test_a_replaced_facenet_file_reruns_every_node_that_reads_it(comfy_host, encoder, tmp_path):
    """ComfyUI runs a node again only when its fingerprint_inputs changes. A FaceNet file replaced by a copy that keeps
    its size and modification time (cp -p, rsync -t) must change it for each node that reads the file: Encode Face,
    Invert Image with an identity loss (also when the strength is a link, unknown at fingerprint time) and ID Score."""
    name = "w2w-fingerprint-test-facenet.pt"
    source = tmp_path / "facenet.pt"
    source.write_bytes(b"a" * 64)
    comfy_host.stage_model("facenet", source, name)
    encode = comfy_host.pack_module("nodes.encoder").W2WEncodeFace
    invert = comfy_host.pack_module("nodes.inversion").W2WInvertImage
    score = comfy_host.pack_module("nodes.idscore").W2WIDScore

    def prints():
        return (encode.fingerprint_inputs(image=None, space=None, encoder=ENCODER_FILE, facenet_weights=name),
                invert.fingerprint_inputs(identity_loss=0.5, facenet_weights=name),
                invert.fingerprint_inputs(identity_loss=None, facenet_weights=name),
                score.fingerprint_inputs(None, None, facenet_weights=name))

    before = prints()
    assert prints() == before  # stable while nothing changes: cached runs stay cached
    assert invert.fingerprint_inputs(identity_loss=0.0, facenet_weights=name) == ""  # the file is not read
    kept = source.stat()
    replacement = tmp_path / "replacement.pt"
    replacement.write_bytes(b"b" * 64)
    os.utime(replacement, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    os.replace(replacement, source)  # same size, same modification time, new content
    assert source.stat().st_size == kept.st_size and source.stat().st_mtime_ns == kept.st_mtime_ns
    after = prints()
    assert [a != b for a, b in zip(after, before)] == [True, True, True, True], (before, after)
