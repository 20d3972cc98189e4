"""The miniature w2w world at toy size: faces, micro UNet + LoRA injection, resumable training, tables, demo, artifacts."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from w2w.micro import faces
from w2w.micro.model import MicroConfig, MicroUNet, TextEncoder, micro_layout, tokenize
from w2w.micro.train import LoraConfig, identity_images, train_loras
from w2w.micro.world import ARTIFACTS, DEFAULT_DIR, build_world, load_world, toy_config

TINY = MicroConfig(channels=(8, 16, 16), context=8, heads=2)


def test_faces_are_deterministic_and_attributes_follow_the_parameters():
    p = faces.identity_params(42)
    assert faces.identity_params(42) == p
    a, b = faces.render(p, 1), faces.render(p, 1)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, faces.render(p, 2))  # another photo of the same person differs
    for seed in range(300):
        q = faces.identity_params(seed)
        attrs = dict(zip(faces.ATTRIBUTES, faces.attributes(q)))
        assert attrs["Beard"] <= attrs["Male"]  # only men have beards here
        assert attrs["Blond_Hair"] == float(q.hair == "blond")
        assert attrs["Eyeglasses"] == float(q.glasses)
    share = np.mean([faces.attributes(faces.identity_params(s)) for s in range(300)], 0)
    assert ((share > 0.05) & (share < 0.95)).all(), share  # every attribute varies across people


def test_tokenize_rejects_unknown_words_and_long_captions():
    assert tokenize(["photo sks person"]).tolist()[0][:3] == [1, 5, 2]
    with pytest.raises(ValueError, match="unknown word 'dog'"):
        tokenize(["photo dog"])
    with pytest.raises(ValueError, match="more than"):
        tokenize([["photo"] * 9])


def test_per_item_factors_equal_one_model_at_a_time():
    torch.manual_seed(0)
    unet = MicroUNet(TINY)
    layout = micro_layout(unet)
    assert layout.dim == sum(m.in_features + m.out_features for m in layout.modules)
    assert len(layout.modules) == 4 * len(unet.transformer_blocks())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    ctx = TextEncoder(8)(tokenize(["photo sks person"] * 2)).detach()
    w = torch.randn(2, layout.dim) * 0.3
    with torch.no_grad():
        plain = unet(x, t, ctx)
        with unet.patched(layout.factors(w), layout.scale):
            both = unet(x, t, ctx)
        singles = []
        for i in range(2):
            with unet.patched(layout.factors(w[i]), layout.scale):
                singles.append(unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]))
        after = unet(x, t, ctx)
    torch.testing.assert_close(both, torch.cat(singles), rtol=1e-4, atol=1e-5)
    assert (both - plain).abs().max() > 1e-3  # the factors do change the model
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # and are gone afterwards


def test_side_by_side_loras_are_independent():
    """Identity 0's LoRA does not depend on what identity 1 was trained on (own parameters, own Adam state)."""
    torch.manual_seed(0)
    unet, text = MicroUNet(TINY), TextEncoder(8)
    for p in list(unet.parameters()) + list(text.parameters()):
        p.requires_grad_(False)
    cfg = LoraConfig(images=2, steps=3, per_step=2, lr=1e-2)
    a, b, c = (identity_images(s, 2) for s in (1, 2, 3))
    w_ab = train_loras(unet, text, [a, b], cfg, seed=5)
    w_ac = train_loras(unet, text, [a, c], cfg, seed=5)
    torch.testing.assert_close(w_ab[0], w_ac[0], rtol=1e-5, atol=1e-6)
    assert (w_ab[1] - w_ac[1]).abs().max() > 0


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    logs: list[str] = []
    world = build_world(str(root / "work"), str(root / "out"), toy_config(), log=logs.append)
    return root, world, logs


def test_toy_world_builds_saves_and_loads(toy_world):
    root, world, _ = toy_world
    cfg = toy_config()
    assert world.weights.shape == (cfg.models, world.layout.dim)
    assert world.heldout_weights.shape == (cfg.heldout, world.layout.dim)
    assert world.space.pcs == cfg.models - 1 and world.space.layout == world.layout
    assert set(world.space.directions) <= set(faces.ATTRIBUTES) and world.space.directions
    for name in ARTIFACTS:
        assert (root / "out" / name).is_file()
    loaded = load_world(str(root / "out"))
    torch.testing.assert_close(loaded.weights, world.weights, rtol=1e-3, atol=1e-3)  # stored as fp16
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([300])
    with torch.no_grad():
        ctx = loaded.context("photo sks person")
        torch.testing.assert_close(loaded.unet(x, t, ctx), world.unet(x, t, world.context("photo sks person")),
                                   rtol=2e-2, atol=2e-2)
    assert loaded.space.fingerprint == world.space.fingerprint


def test_toy_world_resumes_and_refuses_other_settings(toy_world):
    root, world, _ = toy_world
    logs: list[str] = []
    again = build_world(str(root / "work"), None, toy_config(), log=logs.append)
    assert any("resuming" in line for line in logs), logs
    torch.testing.assert_close(again.weights, world.weights, rtol=0, atol=0)
    other = toy_config()
    other = type(other)(**{**other.__dict__, "models": other.models + 1})
    with pytest.raises(ValueError, match="another configuration"):
        build_world(str(root / "work"), None, other, log=logs.append)


def test_missing_artifacts_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="micro_world.py"):
        load_world(str(tmp_path))


@pytest.mark.slow
def test_toy_tables_and_demo(toy_world, tmp_path):
    from demo.cli import main
    from w2w.micro.tables import EvalConfig, run_tables, to_markdown

    root, world, _ = toy_world
    tables = run_tables(world, EvalConfig(samples=3, seeds=2, ddim_steps=2, edit_people=3, invert_steps=2,
                                          references=2, curve_sizes=(5, 10), curve_people=1), log=lambda s: None)
    for key in ("sampling", "editing", "inversion", "pca_vs_vae", "models_curve"):
        assert tables[key], key
    inversion = {r["method"]: r for r in tables["inversion"]}
    assert inversion["w2w inversion, 1 photo"]["parameters optimised"] == world.space.pcs
    assert inversion["DreamBooth LoRA, 1 photo"]["parameters optimised"] == world.layout.dim
    assert all(np.isfinite(r["ID score"]) and -1 <= r["ID score"] <= 1 for r in tables["inversion"])
    assert [r["models in the space"] for r in tables["models_curve"]] == [5, 10]
    md = to_markdown(tables)
    assert "Editing vs prompting" in md and "| w2w edit |" in md and "| w2w edit, strength 4 |" in md
    out = tmp_path / "demo"
    assert main(["--micro", "--micro-dir", str(root / "out"), "--out", str(out)]) == 0
    from PIL import Image

    sheet = Image.open(out / "w2w-micro-contact-sheet.png")
    assert sheet.size[0] > 300 and sheet.size[1] > 300


SHIPPED = Path(DEFAULT_DIR)


@pytest.mark.skipif(not (SHIPPED / ARTIFACTS[0]).is_file(), reason="models/micro artifacts are not in this checkout")
def test_shipped_artifacts_are_small_and_load():
    total = sum(os.path.getsize(SHIPPED / name) for name in ARTIFACTS if (SHIPPED / name).is_file())
    assert total <= 25 * 2**20, f"micro artifacts take {total / 2**20:.1f} MB (limit 25 MB)"
    world = load_world(str(SHIPPED))
    assert world.weights.shape[0] == world.config.models and world.space.pcs == world.config.models - 1
    from w2w.micro.judge import judge_quality

    q = judge_quality(world.judge, identities=24, photos=3)
    assert q["verification_auc"] > 0.9, q  # the shipped judge tells people apart on unseen faces
