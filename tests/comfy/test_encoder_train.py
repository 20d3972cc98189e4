"""`python -m w2w train-encoder` end to end on the real space's path: pairs rendered by a real ComfyUI server (Sample
Identity → Apply w2w LoRA → KSampler → VAE Decode, the random-weight SD1.5 stand-in at 64 px and 1 step), the
encoder trained on them, then used by Encode Face to w2w on the same server. Tiny settings: it tests the machinery,
not quality (the stand-in's images are noise)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from demo.run import ComfyServer, prepare_base_dir
from w2w.cli import main as w2w_main
from w2w.convert import convert_release
from w2w.encoder import load_encoder
from w2w.encoder_pairs import read_manifest
from w2w.identity import load_identity
from w2w.sampling import sample_identity
from w2w.space import load_space
from w2w.synthetic import write_release

PCS = 16
SPACE = "w2w-encoder-e2e-space.safetensors"


def post(server, graph: dict, timeout: float = 900) -> dict:
    prompt_id = server.post_prompt(graph)
    return server.wait_history(prompt_id, timeout)


@pytest.mark.slow
def test_train_encoder_renders_through_comfyui_and_the_node_uses_it(comfyui_path, sd15_standin, tmp_path, capsys):
    write_release(str(tmp_path / "release"), pcs=PCS, models=200, seed=21, weight_scale=0.02)
    space_file = tmp_path / SPACE
    convert_release(str(tmp_path / "release"), str(space_file))
    space = load_space(str(space_file))
    base, work, out = tmp_path / "base", tmp_path / "work", tmp_path / "encoder.safetensors"
    prepare_base_dir(base, None, [("checkpoints", sd15_standin), ("w2w", space_file)])
    command = ["train-encoder", str(space_file), "--workdir", str(work), "--out", str(out),
               "--server-space", SPACE, "--checkpoint", sd15_standin.name, "--identities", "3",
               "--renders-per-identity", "2", "--sample-pcs", str(PCS), "--pcs", str(PCS), "--size", "64",
               "--steps", "1", "--face", "off", "--image-size", "16", "--width", "8", "--hidden", "16",
               "--train-steps", "10", "--batch", "4", "--holdout", "0.34", "--threads", "1"]
    with ComfyServer(comfyui_path, base, extra_args=("--fp16-unet",)) as server:
        wrong = command[:command.index("--server-space") + 1] + ["nope.safetensors"] + \
            command[command.index("--server-space") + 2:]
        assert w2w_main(wrong + ["--render-server", server.url]) == 2
        assert "has no w2w space 'nope.safetensors'" in capsys.readouterr().err

        assert w2w_main(command + ["--render-server", server.url]) == 0
        printed = capsys.readouterr().out
        assert "rendered 6/6 pairs" in printed and "wrote " + str(out) in printed

        # the pairs: 6 renders of 3 sampled identities, each identity the one Sample Identity gives for its seed
        entries = read_manifest(str(work / "rendered"))
        assert len(entries) == 6
        pixels = {}
        for e in entries:
            with Image.open(work / "rendered" / e["image"]) as im:
                assert im.size == (64, 64)
                pixels[e["image"]] = np.asarray(im.convert("RGB"), dtype=np.float32)
        for i in range(3):
            saved = load_identity(str(work / "rendered" / f"identities/{i:07d}.safetensors"))
            assert torch.equal(saved.coefficients, sample_identity(space, i, PCS).coefficients)
        a, b = pixels["renders/0000000-0.png"], pixels["renders/0000000-1.png"]
        assert np.abs(a - b).mean() > 1.0  # two noise seeds of one identity: two images

        encoder = load_encoder(str(out), space)
        assert encoder.pcs == PCS and encoder.info["pairs"].startswith("6 pairs of 3 identities")

        # the node on the same server: the encoder staged in models/w2w_encoders, a photo in input/
        (base / "models" / "w2w_encoders").mkdir(parents=True, exist_ok=True)
        (base / "models" / "w2w_encoders" / "e2e.safetensors").symlink_to(out)
        Image.fromarray(pixels["renders/0000002-1.png"].astype(np.uint8)).save(base / "input" / "face.png")
        graph = {
            "1": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE, "pcs": PCS}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
            "3": {"class_type": "W2WEncodeFace", "inputs": {"image": ["2", 0], "space": ["1", 0],
                                                           "encoder": "e2e.safetensors", "face": "off"}},
            "4": {"class_type": "W2WSaveIdentity", "inputs": {"identity": ["3", 0], "filename_prefix": "e2e"}},
        }
        post(server, graph)
        saved = sorted((base / "models" / "w2w" / "identities").glob("e2e_*.safetensors"))
        assert len(saved) == 1
        encoded = load_identity(str(saved[0]))
        photo = torch.from_numpy(pixels["renders/0000002-1.png"] / 255.0).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            expected = encoder(torch.nn.functional.interpolate(photo, size=(16, 16), mode="bilinear",
                                                               align_corners=False, antialias=True))[0]
        assert encoded.space_fingerprint == space.fingerprint
        # PNG round trip of the photo is exact (uint8 in, uint8 out), the framing is a plain resize of a square photo
        torch.testing.assert_close(encoded.coefficients, expected, rtol=1e-5, atol=1e-5)

    # the same command again, the server gone: the pairs are complete, the training is finished: the same encoder
    before = out.read_bytes()
    assert w2w_main(command + ["--render-server", "http://127.0.0.1:9"]) == 0
    assert "resuming at step 10/10" in capsys.readouterr().out
    assert out.read_bytes() == before
