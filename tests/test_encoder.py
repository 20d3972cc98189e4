"""The face encoder (one-shot inversion): config checks, training on a toy problem, resuming, files, pairs folders,
rendering resumption, encoding, and the inversion callback the refinement curves read."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import struct

import pytest
import torch
from PIL import Image

from w2w.encoder import (EncoderConfig, EncoderMismatch, EncoderTrainConfig, PairSet, StopTraining, augment,
                         build_encoder, encode_photos, evaluate, load_encoder, read_encoder_metadata, relative_error,
                         retrieval_rows, save_encoder, split_groups, train_encoder)
from w2w.encoder_pairs import RenderSettings, load_pairs, read_manifest, render_pairs
from w2w.identity import Identity, load_identity, save_identity
from w2w.layout import Layout, ModuleSlot
from w2w.safeload import W2WFileError
from w2w.sampling import sample_identity
from w2w.space import load_space
from w2w_fixtures import make_release

P = 4  # coefficients of the toy problem
SIZE = 16  # toy photo side


pytestmark = pytest.mark.usefixtures("one_thread")


def small_layout() -> Layout:
    return Layout((ModuleSlot("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 40, 40, 0, 40),
                   ModuleSlot("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 40, 40, 80, 120)))


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    release = make_release(tmp_path_factory, "encoder_release", layout=small_layout(), pcs=8, models=300, seed=2)
    return load_space(release.folder)


@pytest.fixture(scope="module")
def other_space(tmp_path_factory):
    release = make_release(tmp_path_factory, "encoder_other", layout=small_layout(), pcs=8, models=300, seed=3)
    return load_space(release.folder)


def toy_pairs(space, identities: int, photos: int, seed: int) -> PairSet:
    """Photos whose four quadrants' brightness is linear in the first four coefficients (clipped at 3 std) (plus a random
    backdrop level and pixel noise): a mapping a small CNN can learn, with a known answer."""
    gen = torch.Generator().manual_seed(seed)
    betas = space.coef_mean[:P] + space.coef_std[:P] * torch.randn(identities, P, generator=gen)
    level = 0.5 + 0.15 * ((betas - space.coef_mean[:P]) / space.coef_std[:P]).clamp(-3, 3)  # (I, P) in [0.05, 0.95]
    owner = torch.arange(identities).repeat_interleave(photos)
    img = torch.zeros(len(owner), 3, SIZE, SIZE)
    h = SIZE // 2
    for k, (y, x) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
        img[:, :, y:y + h, x:x + h] = level[owner, k].view(-1, 1, 1, 1)
    img = 0.8 * img + 0.1 * torch.rand(len(owner), 1, 1, 1, generator=gen)
    img = (img + 0.02 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    full = torch.cat([betas, torch.zeros(identities, space.pcs - P)], 1)  # later PCs: the mean
    return PairSet((img * 255).round().to(torch.uint8), full[owner], owner, "toy")


def tiny_encoder(space, seed: int = 0):
    return build_encoder(space, P, "conv", image_size=SIZE, width=8, hidden=32, seed=seed)


FAST = EncoderTrainConfig(steps=150, batch=32, lr=3e-3, augment=0.0, holdout=0.2, eval_every=50,
                          checkpoint_every=50, seed=1)


@pytest.fixture(scope="module")
def trained(space):
    pairs = toy_pairs(space, 120, 3, seed=0)
    encoder = tiny_encoder(space)
    return pairs, train_encoder(encoder, pairs, FAST)


# ---- configuration ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"pcs": 0}, "pcs must be >= 1"),
    ({"pcs": 4, "backbone": "resnet"}, "backbone must be one of"),
    ({"pcs": 4, "image_size": 48}, "image_size must be 4 times a power of two"),
    ({"pcs": 4, "image_size": 4}, "image_size must be 4 times a power of two"),
    ({"pcs": 4, "face_fraction": 0.05}, "face_fraction"),
    ({"pcs": 4, "backbone": "facenet"}, "fingerprint of its FaceNet weights"),
])
def test_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**kwargs)


def test_build_needs_sampling_statistics_and_enough_pcs(space):
    with pytest.raises(ValueError, match="sampling statistics for 8"):
        build_encoder(space, 9)
    with pytest.raises(ValueError, match="sampling statistics"):
        build_encoder(dataclasses.replace(space, coef_mean=None, coef_std=None), 4)


def test_a_new_encoder_predicts_the_mean_model(space):
    """The head's last layer starts at zero: β = coef_mean for any photo, so training starts from inversion's start."""
    encoder = tiny_encoder(space)
    out = encoder(torch.rand(3, 3, 40, 24))  # any size: resized by the backbone
    assert torch.equal(out, space.coef_mean[:P].expand(3, -1))


# ---- training -----------------------------------------------------------------------------------------------
def test_training_converges_on_a_toy_problem(space, trained):
    """At the start every prediction is the mean, whose relative error is Σ(β−mean)²/Σstd² ≈ 1 by construction (the
    toy targets are drawn with the space's mean and std). Measured after 150 steps: held-out error 0.18, per-PC
    correlations 0.87-0.92; with shuffled targets (a broken trainer) held-out error 1.0-1.3 and |correlation| < 0.2.
    The thresholds (error < 0.35, correlation > 0.7) sit between the two with margin on both sides."""
    pairs, result = trained
    history = result.history
    assert [h.step for h in history] == [50, 100, 150]
    assert history[-1].loss < 0.3 * history[0].loss
    assert history[-1].val_error < 0.35
    held = torch.isin(pairs.groups, torch.tensor(result.holdout_groups))
    assert 0 < int(held.sum()) < len(pairs)
    with torch.no_grad():
        pred = result.encoder(pairs.images[held].float() / 255)
    target = pairs.targets[held, :P]
    for k in range(P):
        r = torch.corrcoef(torch.stack([pred[:, k], target[:, k]]))[0, 1]
        assert r > 0.7, (k, float(r))
    base = relative_error(space.coef_mean[:P].expand_as(target), target, space.coef_std).mean()
    assert 0.5 < float(base) < 1.5  # the mean model's error is ~1 on these targets: the scale above means something


def test_holdout_is_by_identity(trained):
    pairs, result = trained
    held = set(result.holdout_groups)
    assert len(held) == round(0.2 * 120)
    assert held <= set(pairs.groups.tolist())


def test_resumed_training_equals_an_uninterrupted_run(space, tmp_path):
    """Each step's batch comes from (seed, step) and the checkpoint holds model and optimiser state, so stopping
    after step 6 (the last checkpoint at 4) and resuming repeats steps 5-6 exactly: the same bytes as one run (on one
    thread, where CPU kernels are deterministic)."""
    pairs = toy_pairs(space, 30, 2, seed=4)
    cfg = dataclasses.replace(FAST, steps=12, checkpoint_every=4, eval_every=4)
    straight = train_encoder(tiny_encoder(space), pairs, cfg, workdir=str(tmp_path / "a"))

    def stop(step, total, stats):
        if step == 6:
            raise StopTraining

    with pytest.raises(StopTraining):
        train_encoder(tiny_encoder(space), pairs, cfg, workdir=str(tmp_path / "b"), callback=stop)
    logs = []
    resumed = train_encoder(tiny_encoder(space), pairs, cfg, workdir=str(tmp_path / "b"), log=logs.append)
    assert any("resuming at step 4/12" in line for line in logs), logs
    a, b = straight.encoder.state_dict(), resumed.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.step for h in resumed.history] == [4, 8, 12]
    fresh = tiny_encoder(space).state_dict()  # the comparison can fail: training moved the weights
    assert not torch.equal(fresh["head.4.weight"], a["head.4.weight"])
    with pytest.raises(ValueError, match="another encoder, space, pair set or configuration"):
        train_encoder(tiny_encoder(space), pairs, dataclasses.replace(cfg, lr=1e-2), workdir=str(tmp_path / "b"))


def test_keep_best_ends_with_the_lowest_held_out_error(space, tmp_path):
    """Targets shuffled across identities can only be memorised: the training loss falls while the held-out error
    rises after the first evaluations. keep_best ends with the weights of the lowest held-out evaluation (their error,
    recomputed, is that evaluation's), also after a resume; keep_best=False ends with the last step's."""
    pairs = toy_pairs(space, 24, 2, seed=6)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    shuffled = PairSet(pairs.images, pairs.targets.view(24, 2, -1)[perm].flatten(0, 1), pairs.groups, "shuffled")
    cfg = dataclasses.replace(FAST, steps=160, eval_every=20, checkpoint_every=20, lr=1e-2, holdout=0.25)
    _, held = split_groups(shuffled.groups, cfg.holdout, cfg.seed)

    def stop(step, total, stats):
        if step == 100:
            raise StopTraining

    with pytest.raises(StopTraining):
        train_encoder(tiny_encoder(space), shuffled, cfg, workdir=str(tmp_path), callback=stop)
    best = train_encoder(tiny_encoder(space), shuffled, cfg, workdir=str(tmp_path))
    last = train_encoder(tiny_encoder(space), shuffled, dataclasses.replace(cfg, keep_best=False))
    errors = {h.step: h.val_error for h in best.history}
    lowest = min(errors, key=errors.get)
    assert lowest != cfg.steps, errors  # the run over-fits, so the choice matters
    assert best.chosen_step == lowest and best.chosen.val_error == errors[lowest]
    assert evaluate(best.encoder, shuffled, held) == pytest.approx(errors[lowest], rel=1e-5)
    assert last.chosen_step == cfg.steps
    assert evaluate(last.encoder, shuffled, held) == pytest.approx(errors[cfg.steps], rel=1e-5)
    assert errors[cfg.steps] > errors[lowest] * 1.02


def test_aux_loss_is_added_with_its_weight(space):
    """A constant aux term leaves the gradients alone (same weights as without it) and adds weight·value to the loss."""
    pairs = toy_pairs(space, 20, 2, seed=5)
    cfg = dataclasses.replace(FAST, steps=4, eval_every=4, holdout=0.0)
    plain = train_encoder(tiny_encoder(space), pairs, cfg)
    calls = []

    def aux(encoder, step, gen):
        calls.append(step)
        return torch.tensor(2.0)

    with_aux = train_encoder(tiny_encoder(space), pairs, dataclasses.replace(cfg, aux_weight=0.5), aux=aux)
    assert calls == [0, 1, 2, 3]
    assert with_aux.final.loss == pytest.approx(plain.final.loss + 1.0, rel=1e-6)
    assert math.isnan(plain.final.val_error)


def test_augment_is_seeded_and_stays_an_image():
    x = torch.rand(5, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(augment(x, torch.Generator(), 0.0), x)


# ---- retrieval encoders: face recognition over the space's training models -----------------------------------
GALLERY = 40  # training models of the toy space with photos


def gallery_pairs(space, photos: int, seed: int) -> PairSet:
    """Photos of the space's first GALLERY training models, drawn as toy_pairs draws them from their coefficients
    (new noise per seed), each pair naming its model's row."""
    gen = torch.Generator().manual_seed(seed)
    betas = space.train_coefs[:GALLERY, :P]
    level = 0.5 + 0.15 * ((betas - space.coef_mean[:P]) / space.coef_std[:P]).clamp(-3, 3)
    owner = torch.arange(GALLERY).repeat_interleave(photos)
    img = torch.zeros(len(owner), 3, SIZE, SIZE)
    h = SIZE // 2
    for k, (y, x) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
        img[:, :, y:y + h, x:x + h] = level[owner, k].view(-1, 1, 1, 1)
    img = (0.8 * img + 0.1 + 0.02 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    return PairSet((img * 255).round().to(torch.uint8), space.train_coefs[owner], owner, "gallery", rows=owner.clone())


RETRIEVE = dataclasses.replace(FAST, steps=200, lr=3e-3, holdout=0.2, margin=0.1, scale=16.0)


def retrieval_encoder(space, pairs: PairSet, cfg: EncoderTrainConfig = RETRIEVE, **kwargs):
    return build_encoder(space, P, "conv", image_size=SIZE, width=8, hidden=32, head="retrieve", embed=16,
                         gallery_rows=retrieval_rows(pairs, cfg.holdout, cfg.seed), **kwargs)


@pytest.fixture(scope="module")
def retrieved(space):
    pairs = gallery_pairs(space, 4, seed=0)
    result = train_encoder(retrieval_encoder(space, pairs), pairs, RETRIEVE)
    return pairs, result


def test_retrieval_encoder_recognises_the_training_models_it_learned(space, retrieved):
    """On new photos of the gallery's models, the top-1 encoder answers that model's own training coefficients
    (exactly: a row of the space, not a regression). Chance is 1/32; measured 1.0 after 200 steps; an untrained
    encoder (random prototypes) gets about chance. The held-out models are not in the gallery."""
    pairs, result = retrieved
    encoder = result.encoder
    held = set(result.holdout_groups)
    rows = encoder.gallery_rows.tolist()
    assert len(held) == round(0.2 * GALLERY) and not held & set(rows) and len(rows) == GALLERY - len(held)
    fresh = gallery_pairs(space, 2, seed=9)
    keep = torch.isin(fresh.rows, encoder.gallery_rows)
    with torch.no_grad():
        beta = encoder(fresh.images[keep].float() / 255)
        untrained = retrieval_encoder(space, pairs)(fresh.images[keep].float() / 255)
    own = space.train_coefs[fresh.rows[keep], :P]
    hits = (beta == own).all(1).float().mean()
    chance = (untrained == own).all(1).float().mean()
    assert float(hits) > 0.9, float(hits)
    assert float(chance) < 0.3, float(chance)
    every = space.train_coefs[encoder.gallery_rows, :P]
    assert all(bool((every == b).all(1).any()) for b in beta)  # top-1: always some gallery model's coefficients


def test_retrieval_blends_the_top_k_by_similarity(space, retrieved):
    """top_k = the whole gallery at a huge temperature gives the gallery's mean; with_retrieval copies the encoder
    (the original keeps its settings)."""
    _, result = retrieved
    encoder = result.encoder
    x = torch.rand(3, 3, SIZE, SIZE)
    blend = encoder.with_retrieval(encoder.config.gallery, 1e6)
    assert encoder.config.top_k == 1 and blend.config.top_k == encoder.config.gallery
    with torch.no_grad():
        mean = space.train_coefs[encoder.gallery_rows, :P].mean(0)
        assert torch.allclose(blend(x), mean.expand(3, -1), atol=1e-5)
        soft = encoder.with_retrieval(3, 0.05)(x)
        sims, index = encoder.similarities(encoder.features(x)).topk(3, dim=1)
        w = torch.softmax(sims / 0.05, 1)
        expect = (w.unsqueeze(-1) * space.train_coefs[encoder.gallery_rows[index], :P]).sum(1)
        assert torch.allclose(soft, expect, atol=1e-6)
    with pytest.raises(ValueError, match="top_k must be in 1.."):
        encoder.with_retrieval(encoder.config.gallery + 1, 0.05)
    with pytest.raises(ValueError, match="belong to retrieval encoders"):
        tiny_encoder(space).with_retrieval(1, 0.05)


def test_retrieval_file_stores_row_numbers_and_needs_its_space(space, other_space, retrieved, tmp_path):
    """The file holds the gallery as row numbers (the coefficients are the space's) and loads only with its space,
    with training coefficients; fp16 keeps the row numbers exact."""
    _, result = retrieved
    path = str(tmp_path / "retrieve.safetensors")
    save_encoder(result.encoder, path, dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("gallery_rows").dtype == torch.int64
        assert torch.equal(f.get_tensor("gallery_rows"), result.encoder.gallery_rows)
    assert "gallery_coefs" not in keys and "prototypes" in keys
    loaded = load_encoder(path, space)
    assert torch.equal(loaded.gallery_coefs, space.train_coefs[result.encoder.gallery_rows, :P])
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.encoder(x), atol=0.05 * float(space.coef_std[:P].max()))
    with pytest.raises(EncoderMismatch, match="loaded with that space"):
        load_encoder(path)
    with pytest.raises(EncoderMismatch, match="was trained for the w2w space"):
        load_encoder(path, other_space)
    with pytest.raises(EncoderMismatch, match="training coefficients"):
        load_encoder(path, dataclasses.replace(space, train_coefs=None))


def test_retrieval_needs_pairs_of_training_models_and_its_own_gallery(space):
    pairs = gallery_pairs(space, 2, seed=1)
    with pytest.raises(ValueError, match="name none"):
        retrieval_rows(toy_pairs(space, 10, 2, seed=0), 0.2, 0)
    with pytest.raises(ValueError, match="needs gallery rows"):
        build_encoder(space, P, head="retrieve")
    wrong = build_encoder(space, P, "conv", image_size=SIZE, width=8, hidden=32, head="retrieve", embed=16,
                          gallery_rows=torch.arange(GALLERY))  # includes the held-out models
    with pytest.raises(ValueError, match="not the training models these pairs show"):
        train_encoder(wrong, pairs, dataclasses.replace(RETRIEVE, steps=2))
    with pytest.raises(EncoderMismatch, match="outside"):
        build_encoder(space, P, head="retrieve", gallery_rows=torch.tensor([0, space.train_coefs.shape[0]]))


@pytest.mark.parametrize("kwargs, message", [
    ({"pcs": 4, "head": "classify"}, "head must be one of"),
    ({"pcs": 4, "head": "retrieve"}, "needs gallery >= 1"),
    ({"pcs": 4, "head": "retrieve", "gallery": 5, "top_k": 6}, "top_k must be in 1..5"),
    ({"pcs": 4, "head": "retrieve", "gallery": 5, "temperature": 0.0}, "temperature must be a positive"),
])
def test_retrieval_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**kwargs)


# ---- files --------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(space, trained, tmp_path):
    _, result = trained
    path = str(tmp_path / "enc.safetensors")
    save_encoder(result.encoder, path, info={"steps": 150})
    loaded = load_encoder(path, space)
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.encoder(x))
    meta = read_encoder_metadata(path)
    assert meta["space_fingerprint"] == space.fingerprint and meta["pcs"] == str(P) and meta["backbone"] == "conv"
    assert loaded.info == {"steps": 150} and loaded.config == result.encoder.config


def test_float16_file_holds_the_rounded_weights(space, trained, tmp_path):
    """float16 storage rounds every weight once (relative error ≤ 2⁻¹¹) and keeps the output's centre and scale in
    float32: the loaded encoder is exactly the original with its weights rounded to float16."""
    _, result = trained
    path = str(tmp_path / "enc16.safetensors")
    save_encoder(result.encoder, path, dtype=torch.float16)
    loaded = load_encoder(path, space)
    rounded = tiny_encoder(space)
    rounded.load_state_dict({k: (v if k.startswith("coef_") else v.half().float())
                             for k, v in result.encoder.state_dict().items()})
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), rounded.eval()(x))
        assert not torch.equal(loaded(x), result.encoder(x))  # the rounding is visible: the check above means something
    assert os.path.getsize(path) < 0.6 * os.path.getsize(_save32(result.encoder, tmp_path))


def _save32(encoder, tmp_path) -> str:
    path = str(tmp_path / "enc32.safetensors")
    save_encoder(encoder, path)
    return path


def test_loading_refuses_another_space_and_too_few_pcs(space, other_space, trained, tmp_path):
    _, result = trained
    path = _save32(result.encoder, tmp_path)
    with pytest.raises(EncoderMismatch, match=f"trained for the w2w space {space.fingerprint}.*train-encoder"):
        load_encoder(path, other_space)
    small = dataclasses.replace(space, components=space.components[:2])
    with pytest.raises(EncoderMismatch, match="predicts 4 coefficients but the space is loaded with 2 PCs"):
        load_encoder(path, small)
    with pytest.raises(EncoderMismatch, match="trained for the w2w space"):
        encode_photos(result.encoder, torch.rand(1, 3, SIZE, SIZE), other_space)


def _rewrite_metadata(src: str, dst: str, **changes) -> None:
    """A copy of a safetensors file with some metadata values replaced (the header is plain JSON)."""
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header["__metadata__"].update(changes)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("change, error, message", [
    ({"format": "w2w-vae"}, W2WFileError, "not a w2w encoder file"),
    ({"format_version": "2"}, W2WFileError, "encoder format '2'"),
    ({"pcs": "5"}, W2WFileError, "metadata disagree"),
    ({"config": "{not json"}, W2WFileError, "malformed encoder metadata"),
])
def test_loading_refuses_damaged_metadata(space, trained, tmp_path, change, error, message):
    _, result = trained
    bad = str(tmp_path / "bad.safetensors")
    _rewrite_metadata(_save32(result.encoder, tmp_path), bad, **change)
    with pytest.raises(error, match=message):
        load_encoder(bad, space)


def test_loading_refuses_broken_files(space, trained, tmp_path):
    _, result = trained
    good = _save32(result.encoder, tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:-100])
    with pytest.raises(W2WFileError, match="not a readable .safetensors"):
        load_encoder(str(truncated), space)
    with pytest.raises(W2WFileError, match="not found"):
        load_encoder(str(tmp_path / "missing.safetensors"), space)
    nan = tmp_path / "nan.safetensors"
    broken = tiny_encoder(space)
    with torch.no_grad():
        broken.head[0].weight[0, 0] = float("nan")
    save_encoder(broken, str(nan))
    with pytest.raises(W2WFileError, match="NaN or infinite"):
        load_encoder(str(nan), space)
    ident = tmp_path / "identity.safetensors"
    save_identity(Identity(torch.ones(3), space.fingerprint), str(ident))
    with pytest.raises(W2WFileError, match="not a w2w encoder file"):
        load_encoder(str(ident), space)


def test_encode_photos_averages_the_photos_of_one_person(space, trained):
    _, result = trained
    x = torch.rand(3, 3, SIZE, SIZE)
    ident = encode_photos(result.encoder, x, space)
    with torch.no_grad():
        per_photo = result.encoder(x)
    torch.testing.assert_close(ident.coefficients, per_photo.mean(0), rtol=0, atol=0)
    assert ident.space_fingerprint == space.fingerprint and ident.pcs == P
    assert ident.history[-1].startswith("encode photos=3 pcs=4 backbone=conv")
    assert (per_photo[0] - per_photo[1]).abs().max() > 0  # the photos give different predictions


# ---- FaceNet backbone (random weights: mechanics only) ------------------------------------------------------
@pytest.fixture(scope="module")
def facenet_files(tmp_path_factory):
    pytest.importorskip("facenet_pytorch", reason="the FaceNet backbone needs facenet-pytorch: "
                        "pip install --no-deps -r requirements-idscore.txt")
    from w2w.metrics.standins import save_random_facenet

    root = tmp_path_factory.mktemp("facenet")
    return (save_random_facenet(str(root / "a.pt"), seed=0), save_random_facenet(str(root / "b.pt"), seed=1))


def test_facenet_encoder_stores_only_its_head_and_checks_the_weights(space, facenet_files, tmp_path):
    weights, other = facenet_files
    encoder = build_encoder(space, P, "facenet", hidden=16, facenet_weights=weights)
    pairs = toy_pairs(space, 8, 2, seed=6)
    train_encoder(encoder, pairs, dataclasses.replace(FAST, steps=3, eval_every=3, holdout=0.25))
    path = str(tmp_path / "facenet-enc.safetensors")
    save_encoder(encoder, path)
    assert os.path.getsize(path) < 200_000  # the head only: FaceNet itself is ~90 MB
    with pytest.raises(W2WFileError, match="needs the FaceNet weights file"):
        load_encoder(path, space)
    with pytest.raises(EncoderMismatch, match="trained on FaceNet weights"):
        load_encoder(path, space, facenet_weights=other)
    loaded = load_encoder(path, space, facenet_weights=weights)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder.eval()(x), rtol=0, atol=0)


# ---- pairs folders ------------------------------------------------------------------------------------------
def _png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(folder, space, people: int = 3, photos: int = 2) -> None:
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in range(people):
        save_identity(sample_identity(space, i, pcs=8), os.path.join(folder, f"p{i}.safetensors"))
        for j in range(photos):
            (folder / f"p{i}-{j}.png").write_bytes(_png((40 * i, 20 * j, 200)))
            lines.append(json.dumps({"image": f"p{i}-{j}.png", "identity": f"p{i}.safetensors"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")


def test_pairs_folder_loads_framed_photos_and_identities(space, tmp_path):
    write_pairs(tmp_path / "pairs", space)
    pairs = load_pairs([str(tmp_path / "pairs")], space, 16, "off", cache_dir=str(tmp_path / "cache"))
    assert pairs.images.shape == (6, 3, 16, 16) and pairs.images.dtype == torch.uint8
    assert pairs.groups.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(3):
        torch.testing.assert_close(pairs.targets[2 * i], sample_identity(space, i, pcs=8).coefficients)
    assert tuple(int(v) for v in pairs.images[2, :, 8, 8]) == (40, 0, 200)  # a flat colour survives the resize
    again = load_pairs([str(tmp_path / "pairs")], space, 16, "off", cache_dir=str(tmp_path / "cache"),
                       log=(logs := []).append)
    assert torch.equal(again.images, pairs.images) and any("read from" in line for line in logs)


def test_pairs_can_name_the_training_model_they_show(space, tmp_path):
    """A "row" in pairs.jsonl (a retrieval encoder's class) is read, kept by the cache, and checked against the space."""
    folder = tmp_path / "pairs"
    write_pairs(folder, space)
    lines = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    for i, entry in enumerate(lines[:4]):
        entry["row"] = 7 + i // 2
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    pairs = load_pairs([str(folder)], space, 16, "off", cache_dir=str(tmp_path / "cache"))
    assert pairs.rows.tolist() == [7, 7, 8, 8, -1, -1]
    cached = load_pairs([str(folder)], space, 16, "off", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(cached.rows, pairs.rows)
    assert retrieval_rows(pairs, 0.0, 0).tolist() == [7, 8]
    lines[0]["row"] = space.train_coefs.shape[0]
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    with pytest.raises(W2WFileError, match="not a training model of the space"):
        load_pairs([str(folder)], space, 16, "off")
    lines[0]["row"] = 2  # a photo of a training model needs no identity file: its coefficients are the space's
    del lines[0]["identity"]
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    by_row = load_pairs([str(folder)], space, 16, "off")
    assert by_row.rows.tolist() == [2, 7, 8, 8, -1, -1]
    torch.testing.assert_close(by_row.targets[0], space.train_coefs[2])
    assert by_row.groups[0] not in by_row.groups[1:]
    with pytest.raises(W2WFileError, match="training coefficients"):
        load_pairs([str(folder)], dataclasses.replace(space, train_coefs=None), 16, "off")
    (folder / "pairs.jsonl").write_text('{"image": "p0-0.png", "row": null}\n')
    with pytest.raises(W2WFileError, match="line 1: expected"):
        read_manifest(str(folder))
    for bad in (-1, "3", 1.5, True):
        lines[0]["row"] = bad
        (folder / "pairs.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
        with pytest.raises(W2WFileError, match="must be a non-negative integer"):
            read_manifest(str(folder))


def test_train_encoder_command_learns_a_retrieval_encoder_from_row_pairs(tmp_path_factory, tmp_path):
    """The real-space command with photos that name training models by row only (no identity files): the space is
    loaded with its training coefficients and the written encoder's gallery is those models, minus the held out."""
    from w2w.cli import main as w2w_main

    release = make_release(tmp_path_factory, "encoder_cli_release", layout=small_layout(), pcs=8, models=300, seed=2)
    folder = tmp_path / "pairs"
    folder.mkdir()
    lines = []
    for row in range(10):
        for j in range(2):
            (folder / f"m{row}-{j}.png").write_bytes(_png((20 * row, 100 + 30 * j, 60)))
            lines.append(json.dumps({"image": f"m{row}-{j}.png", "row": 5 + row}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "retrieve.safetensors"
    assert w2w_main(["train-encoder", release.folder, "--pairs", str(folder), "--head", "retrieve", "--face", "off",
                     "--pcs", "4", "--image-size", "16", "--width", "8", "--hidden", "16", "--embed", "8",
                     "--train-steps", "2", "--batch", "4", "--holdout", "0.2", "--workdir", str(tmp_path / "w"),
                     "--out", str(out)]) == 0
    space = load_space(release.folder)
    encoder = load_encoder(str(out), space)
    rows = encoder.gallery_rows.tolist()
    assert encoder.config.head == "retrieve" and len(rows) == 8 and set(rows) < set(range(5, 15))
    torch.testing.assert_close(encoder.gallery_coefs, space.train_coefs[encoder.gallery_rows, :4])


def test_pairs_of_another_space_are_refused(space, other_space, tmp_path):
    write_pairs(tmp_path / "pairs", space)
    with pytest.raises(EncoderMismatch, match="belongs to space"):
        load_pairs([str(tmp_path / "pairs")], other_space, 16, "off")


def test_manifest_errors_and_a_torn_last_line(tmp_path):
    with pytest.raises(W2WFileError, match="lacks pairs.jsonl"):
        read_manifest(str(tmp_path))
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "identity": "a.safetensors"}\n{"image": "b.p')
    assert [e["image"] for e in read_manifest(str(tmp_path))] == ["a.png"]
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(W2WFileError, match="line 1"):
        read_manifest(str(tmp_path))


class FakeRenderer:
    """Stands in for ComfyRenderer (same attributes): a flat image per (i, j); fails once at call ``fail_at``."""

    def __init__(self, settings, fail_at=None):
        self.settings, self.fail_at, self.calls = settings, fail_at, []

    def check(self):
        pass

    def render(self, i, j):
        self.calls.append((i, j))
        if len(self.calls) == self.fail_at:
            raise ConnectionError("server went away")
        return _png((10 * i, 10 * j, 0), (24, 24))


def test_rendering_resumes_where_it_stopped(space, tmp_path):
    settings = RenderSettings("ckpt.safetensors", "space.safetensors", space.fingerprint, identities=3,
                              renders_per_identity=2, sample_pcs=8, seed=7)
    folder = str(tmp_path / "rendered")
    with pytest.raises(ConnectionError):
        render_pairs(FakeRenderer(settings, fail_at=4), space, folder)
    assert len(read_manifest(folder)) == 3
    again = FakeRenderer(settings)
    assert render_pairs(again, space, folder) == 6
    assert again.calls == [(1, 1), (2, 0), (2, 1)]  # only the missing images
    entries = read_manifest(folder)
    assert sorted(e["image"] for e in entries) == [f"renders/{i:07d}-{j}.png" for i in range(3) for j in range(2)]
    for i in range(3):
        saved = load_identity(os.path.join(folder, f"identities/{i:07d}.safetensors"))
        assert torch.equal(saved.coefficients, sample_identity(space, 7 + i, 8).coefficients)
    other = dataclasses.replace(settings, steps=30)
    with pytest.raises(ValueError, match="rendered with other settings"):
        render_pairs(FakeRenderer(other), space, folder)


def test_render_settings_are_checked():
    with pytest.raises(ValueError, match="'sks'"):
        RenderSettings("c", "s", "f", 1, prompts=("a photo of a person",))
    with pytest.raises(ValueError, match="multiple of 8"):
        RenderSettings("c", "s", "f", 1, size=100)


# ---- the inversion callback the refinement curves read ------------------------------------------------------
def test_inversion_callback_gives_the_coefficients_of_each_step(space):
    from w2w.invert import InvertSettings, invert

    class Toy:
        def __call__(self, x_t, t, cond, factors):
            a, b = factors[0]
            return x_t * (1 + (b @ a).mean())

    seen = {}
    settings = InvertSettings(pcs=4, steps=3, lr=0.05, seed=0)
    result = invert(space, Toy(), torch.randn(1, 4, 4, 4), None, settings,
                    callback=lambda s, n, info: seen.__setitem__(s, info["coefficients"].clone()))
    assert sorted(seen) == [1, 2, 3]
    assert torch.equal(seen[3], result.identity.coefficients)
    assert not torch.equal(seen[1], seen[3])
