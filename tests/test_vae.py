"""VAE-w2w: training against collapse, the planted-manifold check against PCA, save/load, determinism, streaming,
use (decode/encode/sample/interpolate) and inversion through the decoder with a tiny stand-in denoiser."""
import dataclasses
import json
import math
import os
import time

import numpy as np

import pytest
import torch

from w2w.identity import Identity, IdentityMismatch
from w2w.layout import Layout, ModuleSlot
from w2w.safeload import W2WFileError
from w2w.space import load_space
from w2w.stfile import write_safetensors
from w2w.vae import (LatentParam, informative_units, StopTraining, TrainConfig, VAEConfig, WeightsMatrix, active_units, decode_identity,
                     decode_weights, encode_identity, interpolate, load_vae, pca_reconstruction_error,
                     reconstruction_error, sample_latents, save_vae, train_from_space, train_vae)
from w2w.synthetic import planted_manifold
from w2w_fixtures import make_release

PCS, INTRINSIC, N_TRAIN, N_TEST = 32, 3, 1500, 400
pytestmark = pytest.mark.usefixtures("one_thread")


FAST = TrainConfig(epochs=30, batch_size=64, lr=3e-3, warmup_epochs=3, ramp_epochs=8, holdout=0.1, seed=0)


@pytest.fixture(scope="module")
def manifold():
    """Coefficients of a released-layout space lying on a planted 3-D non-linear manifold: train and test rows."""
    x = planted_manifold(N_TRAIN + N_TEST, PCS, INTRINSIC, seed=3, features=48)
    return x[:N_TRAIN], x[N_TRAIN:]


@pytest.fixture(scope="module")
def space(tmp_path_factory, manifold):
    release = make_release(tmp_path_factory, "vae_release", pcs=PCS, models=N_TRAIN)
    base = load_space(release.folder)
    train = manifold[0]
    return dataclasses.replace(base, train_coefs=train, coef_mean=train.mean(0), coef_std=train.std(0))


@pytest.fixture(scope="module")
def trained(space):
    t0 = time.perf_counter()
    result = train_from_space(space, latent=INTRINSIC, hidden=(64, 32), train=FAST)
    return result, time.perf_counter() - t0


def small_layout() -> Layout:
    """Two rank-1 modules, 160 weights: a layout small enough to train on raw weights in a test."""
    return Layout((ModuleSlot("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 40, 40, 0, 40),
                   ModuleSlot("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 40, 40, 80, 120)))


# ---- training and the planted manifold -------------------------------------------------------------------------
def test_tiny_vae_trains_on_cpu_in_seconds(trained):
    result, seconds = trained
    assert seconds < 60, f"training took {seconds:.1f}s"
    assert len(result.history) == FAST.epochs and not result.stopped
    assert result.history[-1].loss < 0.7 * result.history[0].loss
    assert all(math.isfinite(h.loss) and 0 <= h.active <= INTRINSIC for h in result.history)


def test_vae_beats_pca_on_planted_nonlinear_manifold(trained, manifold):
    result, _ = trained
    train, test = manifold
    vae_err = reconstruction_error(result.vae, test, train.mean(0))
    pca_err = pca_reconstruction_error(train, test, INTRINSIC)
    active, variance = active_units(result.vae, test)
    print(f"held-out relative error at k={INTRINSIC}: VAE {vae_err:.3f}, PCA {pca_err:.3f}; active {active}/{INTRINSIC}")
    assert vae_err < 0.8 * pca_err
    assert active >= math.ceil(0.5 * INTRINSIC), variance
    assert informative_units(result.vae, test) >= math.ceil(0.5 * INTRINSIC)
    assert result.final.informative >= math.ceil(0.5 * INTRINSIC)  # the training record says so too


def test_isotropic_gaussian_gives_pca_no_edge_and_is_reported(space):
    """Without low-dimensional structure the VAE cannot beat PCA (both keep about k/d of the variance)."""
    gen = torch.Generator().manual_seed(7)
    data = torch.randn(N_TRAIN + N_TEST, PCS, generator=gen)
    train, test = data[:N_TRAIN], data[N_TRAIN:]
    config = VAEConfig("coefs", PCS, 8, (64, 32), space.fingerprint)
    vae = train_vae(train, config=config, train=FAST).vae
    vae_err, pca_err = reconstruction_error(vae, test, train.mean(0)), pca_reconstruction_error(train, test, 8)
    print(f"isotropic Gaussian, k=8: VAE {vae_err:.3f}, PCA {pca_err:.3f}")
    assert pca_err == pytest.approx(1 - 8 / PCS, abs=0.05)
    assert vae_err > 0.95 * pca_err


def test_free_bits_and_warmup_keep_units_active_where_plain_elbo_collapses(space, manifold):
    """A strong KL weight from step 0 without free bits closes units; warm-up + ramp + free bits keep them."""
    train = manifold[0]
    config = VAEConfig("coefs", PCS, 8, (64, 32), space.fingerprint)
    harsh = TrainConfig(epochs=12, batch_size=64, beta=40.0, warmup_epochs=0, ramp_epochs=0, free_bits=0.0, seed=0)
    guarded = TrainConfig(epochs=12, batch_size=64, beta=40.0, warmup_epochs=3, ramp_epochs=6, free_bits=2.0, seed=0)
    collapsed = train_vae(train, config=config, train=harsh).final
    kept = train_vae(train, config=config, train=guarded).final
    assert kept.active >= 4 and kept.active > collapsed.active, (kept, collapsed)
    assert kept.informative > collapsed.informative, (kept, collapsed)


def test_beta_schedule_warmup_then_ramp():
    cfg = TrainConfig(beta=0.5, warmup_epochs=2, ramp_epochs=4)
    assert [cfg.beta_at(e) for e in (0, 1.9, 2, 4, 6, 9)] == [0, 0, 0, 0.25, 0.5, 0.5]
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(holdout=1.0)


def test_keep_best_returns_the_epoch_with_the_lowest_heldout_error(space, tmp_path):
    """keep_best: the VAE holds the weights of the full-KL epoch whose held-out error is lowest (its held-out error,
    recomputed on the rows train_vae held back, is that epoch's), the file records the epoch, and the settings it
    cannot work with are refused."""
    from w2w.vae import chosen_stats, describe_vae, heldout_rows

    cfg = TrainConfig(epochs=12, batch_size=64, lr=3e-2, warmup_epochs=1, ramp_epochs=2, holdout=0.2, seed=4,
                      keep_best=True)
    result = train_from_space(space, latent=2, hidden=(64, 64), train=cfg)
    errors = [h.heldout_error for h in result.history]
    eligible = range(cfg.warmup_epochs + cfg.ramp_epochs - 1, len(errors))
    best = min(eligible, key=lambda i: errors[i])
    assert result.chosen_epoch == best + 1 and result.chosen.heldout_error == errors[best]
    assert result.chosen_epoch < len(result.history)  # this run's error rose at the end: the choice is exercised
    held = heldout_rows(space.train_coefs.shape[0], cfg)
    assert int(held.sum()) == round(0.2 * space.train_coefs.shape[0])
    vae = result.vae
    assert reconstruction_error(vae, space.train_coefs[held], vae.shift) == pytest.approx(errors[best], rel=1e-5)
    last = train_from_space(space, latent=2, hidden=(64, 64), train=dataclasses.replace(cfg, keep_best=False))
    assert last.chosen_epoch == len(last.history) and last.chosen == last.final
    assert last.history[best].heldout_error == errors[best]  # the same run up to the choice
    path = str(tmp_path / "best.safetensors")
    save_vae(vae, path)
    back = load_vae(path)
    assert back.chosen_epoch == best + 1 and chosen_stats(back) == result.chosen
    assert describe_vae(back)["chosen_epoch"] == best + 1
    assert describe_vae(back)["heldout_error"] == pytest.approx(errors[best])
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(holdout=0.0, keep_best=True)
    with pytest.raises(ValueError, match="rising after all 5 epochs"):
        TrainConfig(epochs=5, warmup_epochs=2, ramp_epochs=3, keep_best=True)


def test_active_units_reported_every_epoch_and_callback_can_stop(space):
    seen = []

    def callback(step, total, info):
        if info is not None:
            seen.append(info)
            if info.epoch == 3:
                raise StopTraining

    result = train_from_space(space, latent=2, hidden=(16,), train=TrainConfig(epochs=10, seed=1), callback=callback)
    assert result.stopped and len(result.history) == 3 == len(seen)
    assert all(isinstance(h.active, int) and not math.isnan(h.heldout_error) for h in result.history)


def test_determinism_same_seed_same_bytes(space):
    cfg = TrainConfig(epochs=3, seed=11)
    a = train_from_space(space, latent=4, hidden=(32,), train=cfg).vae.state_dict()
    b = train_from_space(space, latent=4, hidden=(32,), train=cfg).vae.state_dict()
    c = train_from_space(space, latent=4, hidden=(32,), train=TrainConfig(epochs=3, seed=12)).vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.0.weight"], c["decoder.0.weight"])


def test_training_does_not_touch_global_rng(space):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_from_space(space, latent=2, hidden=(8,), train=TrainConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)


# ---- save / load ---------------------------------------------------------------------------------------------
def test_save_load_round_trip(trained, tmp_path, manifold):
    vae = trained[0].vae
    path = str(tmp_path / "vae.safetensors")
    save_vae(vae, path)
    back = load_vae(path)
    assert back.config == vae.config and back.train_config == vae.train_config
    assert back.history == vae.history
    z = sample_latents(INTRINSIC, 5, seed=2)
    assert torch.equal(back.decode(z), vae.decode(z))
    assert torch.equal(back.encode(manifold[1][:4])[0], vae.encode(manifold[1][:4])[0])


def test_float16_file_holds_the_rounded_weights(trained, tmp_path):
    """dtype=float16: weights stored rounded to float16 (about half the file), read back as float32; the whitening
    buffers stay float32 and exact."""
    vae = trained[0].vae
    full, half = str(tmp_path / "full.safetensors"), str(tmp_path / "half.safetensors")
    save_vae(vae, full)
    save_vae(vae, half, dtype=torch.float16)
    assert os.path.getsize(half) < 0.6 * os.path.getsize(full)
    back = load_vae(half)
    params = dict(vae.named_parameters())
    for name, value in back.state_dict().items():
        assert value.dtype == torch.float32, name
        want = params[name].detach().half().float() if name in params else vae.state_dict()[name]
        assert torch.equal(value, want), name
    with pytest.raises(ValueError, match="float32 or float16"):
        save_vae(vae, half, dtype=torch.bfloat16)


def test_load_refuses_other_files(tmp_path):
    other = str(tmp_path / "other.safetensors")
    write_safetensors(other, {"x": torch.zeros(2)}, {"format": "w2w-identity"})
    with pytest.raises(W2WFileError, match="not a w2w VAE file"):
        load_vae(other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(W2WFileError):
        load_vae(str(broken))


@pytest.mark.parametrize("damage", ["scale 0", "shift NaN", "weight Inf", "train_config unknown key",
                                    "train_config zero epochs", "input_dim not whole", "config asks for 400 TB"])
def test_a_damaged_vae_file_is_a_file_error_before_anything_is_allocated(tmp_path, damage):
    """What load_state_dict skips (the constructor's value checks) is checked after loading; metadata of the wrong
    kind is a file error; the config's shapes are compared with the stored tensors on the meta device, so a small
    file whose config asks for a huge network allocates nothing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from w2w.vae import VAEConfig, W2WVAE, save_vae

    good = str(tmp_path / "good.safetensors")
    save_vae(W2WVAE(VAEConfig("coefs", 12, 4, (16,), "0123456789abcdef")), good)
    with safe_open(good, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    cfg = json.loads(meta["config"])
    weight = next(k for k in tensors if k.endswith("weight"))
    t, m = {
        "scale 0": ({"scale": torch.zeros(12)}, {}),
        "shift NaN": ({"shift": torch.full((12,), float("nan"))}, {}),
        "weight Inf": ({weight: torch.full_like(tensors[weight], float("inf"))}, {}),
        "train_config unknown key": ({}, {"train_config": '{"bogus": 1}'}),
        "train_config zero epochs": ({}, {"train_config": '{"epochs": 0}'}),
        "input_dim not whole": ({}, {"config": json.dumps({**cfg, "input_dim": 12.5})}),
        "config asks for 400 TB": ({}, {"config": json.dumps({**cfg, "input_dim": 10 ** 9, "hidden": [100000]})}),
    }[damage]
    bad = str(tmp_path / "bad.safetensors")
    save_file({**tensors, **t}, bad, metadata={**meta, **m})
    with pytest.raises(W2WFileError, match="vae-train") as caught:
        load_vae(bad)
    assert bad in str(caught.value)


# ---- use -----------------------------------------------------------------------------------------------------
def test_decode_encode_identity_tied_to_space(trained, space, manifold):
    vae = trained[0].vae
    z = sample_latents(INTRINSIC, 1, seed=4)[0]
    identity = decode_identity(vae, space, z, name="s4")
    assert identity.space_fingerprint == space.fingerprint and identity.pcs == PCS
    assert torch.allclose(decode_weights(vae, z, space), space.weights(identity.coefficients), atol=1e-5)
    assert space.weights(identity.coefficients).shape == (99_648,)
    train, test = manifold
    x = test[0]
    mu, logvar = encode_identity(vae, Identity(x, space.fingerprint))
    assert mu.shape == logvar.shape == (INTRINSIC,)
    back = decode_identity(vae, space, mu).coefficients
    # the identity path adds nothing to the model's own round trip (input units, normalisation undone) ...
    with torch.no_grad():
        torch.testing.assert_close(back, vae.decode(vae.encode(x)[0]), rtol=1e-5, atol=1e-6)
    # ... which on held-out points of the manifold beats PCA with as many components (the claim of the VAE)
    backs = torch.stack([decode_identity(vae, space, encode_identity(vae, Identity(p, space.fingerprint))[0])
                         .coefficients for p in test[:200]])
    err = float(((backs - test[:200]) ** 2).sum() / ((test[:200] - train.mean(0)) ** 2).sum())
    assert err < 0.8 * pca_reconstruction_error(train, test[:200], INTRINSIC)
    with pytest.raises(IdentityMismatch, match="space"):
        encode_identity(vae, Identity(x, "0123456789abcdef"))
    with pytest.raises(IdentityMismatch, match="load the space it was trained with"):
        decode_identity(vae, dataclasses.replace(space, fingerprint="0123456789abcdef"), z)
    with pytest.raises(ValueError, match="latent units"):
        decode_identity(vae, space, torch.zeros(INTRINSIC + 1))


def test_sample_temperature_and_seed():
    a, b = sample_latents(6, 4, seed=9), sample_latents(6, 4, seed=9)
    assert torch.equal(a, b) and a.shape == (4, 6)
    assert torch.allclose(sample_latents(6, 4, seed=9, temperature=0.5), 0.5 * a)
    assert torch.count_nonzero(sample_latents(6, 2, seed=9, temperature=0.0)) == 0


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolate_endpoints(mode):
    z0, z1 = sample_latents(16, 2, seed=1)
    assert torch.allclose(interpolate(z0, z1, 0.0, mode), z0, atol=1e-6)
    assert torch.allclose(interpolate(z0, z1, 1.0, mode), z1, atol=1e-6)


def test_slerp_keeps_norm_linear_shrinks_it():
    z0, z1 = sample_latents(64, 2, seed=5)
    z1 = z1 / z1.norm() * z0.norm()
    mid_s, mid_l = interpolate(z0, z1, 0.5, "slerp"), interpolate(z0, z1, 0.5, "linear")
    assert float(mid_s.norm()) == pytest.approx(float(z0.norm()), rel=1e-5)
    assert float(mid_l.norm()) < 0.9 * float(z0.norm())
    assert torch.allclose(interpolate(z0, z0, 0.3, "slerp"), z0, atol=1e-6)  # parallel: no division by 0
    with pytest.raises(ValueError, match="mode"):
        interpolate(z0, z1, 0.5, "cubic")


# ---- raw weights and streaming from disk -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights_space(tmp_path_factory):
    """A small-layout release and 600 weight vectors on a planted manifold (in standardised units), as .npy."""
    release = make_release(tmp_path_factory, "small_release", layout=small_layout(), pcs=16, models=50)
    space = load_space(release.folder, training=False)
    std_w = planted_manifold(600, space.dim, 4, seed=8, features=32)
    weights = std_w * space.std.abs() + space.mean
    path = tmp_path_factory.mktemp("matrix") / "all_weights.npy"
    np.save(path, weights.numpy())
    return space, weights, str(path)


def test_weights_matrix_reads_blocks_only(weights_space, tmp_path):
    space, weights, npy = weights_space
    st = str(tmp_path / "w.safetensors")
    write_safetensors(st, {"weights": weights})
    pt = str(tmp_path / "w.pt")
    torch.save(weights, pt)
    for path in (npy, st, pt):
        matrix = WeightsMatrix(path)
        assert (matrix.rows, matrix.dim) == tuple(weights.shape)
        sizes = [block.shape[0] for _, block in matrix.blocks(256)]
        assert sizes == [256, 256, 88]
        assert torch.equal(matrix.block(10, 20), weights[10:20])


def test_weights_input_streams_from_disk_and_decodes(weights_space):
    space, weights, npy = weights_space
    matrix = WeightsMatrix(npy)
    reads = []
    original = matrix.block
    matrix.block = lambda a, b: reads.append(b - a) or original(a, b)
    cfg = TrainConfig(epochs=25, batch_size=32, block_rows=128, warmup_epochs=3, ramp_epochs=8, seed=0)
    result = train_from_space(space, input="weights", latent=4, hidden=(64,), weights=matrix, train=cfg)
    assert max(reads) <= 128, "streaming must never read more than block_rows rows at once"
    vae = result.vae
    assert vae.config.input == "weights" and vae.config.input_dim == space.dim
    final = result.final
    assert final.active >= 2 and final.heldout_error < 0.8, final
    z = sample_latents(4, 1, seed=0)[0]
    w = decode_weights(vae, z)
    assert w.shape == (space.dim,)
    identity = decode_identity(vae, space, z)
    assert identity.pcs == space.pcs and "projected" in identity.history[0]
    assert torch.allclose(space.project(w), identity.coefficients, atol=1e-4)
    mu, _ = encode_identity(vae, identity, space)
    assert mu.shape == (4,)


def test_coefs_input_from_weights_matrix_projects_blocks(weights_space):
    space, weights, npy = weights_space
    result = train_from_space(space, input="coefs", pcs=8, latent=2, hidden=(16,), weights=WeightsMatrix(npy),
                              train=TrainConfig(epochs=2, block_rows=100))
    vae = result.vae
    expected = space.project(weights, 8)
    assert torch.allclose(vae.shift, expected.mean(0), atol=1e-4 * float(expected.abs().max()))


def test_whitening_or_one_common_scale(space):
    cfg = TrainConfig(epochs=1)
    spread = torch.linspace(3.0, 0.5, PCS)
    scaled = dataclasses.replace(space, train_coefs=space.train_coefs * spread)
    white = train_from_space(scaled, latent=2, hidden=(8,), train=cfg).vae
    common = train_from_space(scaled, latent=2, hidden=(8,), train=cfg, whiten=False).vae
    data = scaled.train_coefs
    torch.testing.assert_close(white.scale, data.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
    assert torch.allclose(common.scale, common.scale[0].expand(PCS))
    assert float(common.scale[0]) == pytest.approx(float(data.std(0, unbiased=False).square().mean().sqrt()), rel=1e-4)


def test_wrong_input_size_and_missing_data(space):
    with pytest.raises(ValueError, match="expects"):
        train_vae(torch.zeros(50, 5), config=VAEConfig("coefs", 6, 2, (8,), "fp"))
    with pytest.raises(ValueError, match="weights matrix"):
        train_from_space(space, input="weights")
    with pytest.raises(ValueError, match="space_fingerprint"):
        VAEConfig("coefs", 6, 2)


# ---- inversion through the decoder, with the shared inversion engine -------------------------------------------
C, H, SIDE = 4, 16, 8


def pixel_layout() -> Layout:
    """Three Linear modules (4->16->16->4), rank 1: a per-pixel MLP denoiser patched by the space's LoRA."""
    modules, offset = [], 0
    for name, fan_in, fan_out in (("net.0", C, H), ("net.1", H, H), ("net.2", H, C)):
        modules.append(ModuleSlot(name, fan_in, fan_out, offset, offset + fan_in))
        offset += fan_in + fan_out
    return Layout(tuple(modules), rank=1, alpha=2.0)


class PixelDenoiser:
    """ε̂ from tokens (N·h·w, C) through three tanh layers with weights W + scale·B@A (the engine's Denoiser)."""

    def __init__(self, scale: float, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.weights = [torch.randn(o, i, generator=gen) / i ** 0.5 for i, o in ((C, H), (H, H), (H, C))]

    def __call__(self, x_t, t, cond, factors):
        n, c, h, w = x_t.shape
        x = x_t.float().permute(0, 2, 3, 1).reshape(n, h * w, c)
        x = x + 0 * cond
        for index, (weight, (a, b)) in enumerate(zip(self.weights, factors)):
            x = x @ (weight + self.scale * (b @ a).float()).T
            if index == 0:
                x = x + (t.float() / 1000.0).view(n, 1, 1)
            if index < 2:
                x = torch.tanh(x)
        return x.reshape(n, h, w, c).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def pixel_space():
    """A 12-PC space over the pixel layout whose training models lie on a 3-D non-linear manifold."""
    layout = pixel_layout()
    gen = torch.Generator().manual_seed(0)
    components = torch.linalg.qr(torch.randn(layout.dim, 12, generator=gen, dtype=torch.float64)).Q.T.float()
    mean = 0.1 * torch.randn(layout.dim, generator=gen)
    std = 0.2 + torch.rand(layout.dim, generator=gen)
    from w2w.space import Space

    coefs = 3.0 * planted_manifold(1200, 12, 3, seed=5, features=24)
    return Space(components.contiguous(), mean, std, layout, train_coefs=coefs, coef_mean=coefs.mean(0),
                 coef_std=coefs.std(0))


def fixed_eval_loss(space, denoiser, beta, latents, draws: int = 32) -> float:
    """Mean diffusion loss over fixed (t, noise) draws, independent of the optimiser's random stream."""
    from w2w.diffusion import sd15_alphas_cumprod
    from w2w.invert import FactorMap, step_loss

    gen = torch.Generator().manual_seed(1234)
    fmap = FactorMap(space, beta.shape[0])
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            total += float(step_loss(fmap, denoiser, beta, latents, t, noise, torch.zeros(1), sd15_alphas_cumprod()))
    return total / draws


@pytest.fixture(scope="module")
def pixel_vaes(pixel_space):
    cfg = TrainConfig(epochs=20, batch_size=64, lr=3e-3, warmup_epochs=3, ramp_epochs=6, seed=0)
    coefs_vae = train_from_space(pixel_space, latent=3, hidden=(32,), train=cfg).vae
    weights = pixel_space.weights(pixel_space.train_coefs)
    weights_vae = train_from_space(pixel_space, input="weights", latent=3, hidden=(32,), weights=weights, train=cfg).vae
    return {"coefs": coefs_vae, "weights": weights_vae}


@pytest.mark.parametrize("input_kind", ["coefs", "weights"])
@pytest.mark.parametrize("gaussian", [False, True])
def test_vae_inversion_lowers_loss_on_fixed_image(pixel_space, pixel_vaes, input_kind, gaussian):
    from w2w.invert import InvertSettings, invert

    vae = pixel_vaes[input_kind]
    denoiser = PixelDenoiser(pixel_space.layout.scale)
    latents = torch.randn(1, C, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    param = LatentParam(vae, pixel_space, gaussian=gaussian, generator=torch.Generator().manual_seed(0))
    start = param.result()
    settings = InvertSettings(steps=120, lr=0.05, seed=0)
    result = invert(pixel_space, denoiser, latents, torch.zeros(1), settings, param=param)
    before = fixed_eval_loss(pixel_space, denoiser, start, latents)
    after = fixed_eval_loss(pixel_space, denoiser, result.identity.coefficients, latents)
    assert after < 0.9 * before, (before, after)
    assert result.identity.space_fingerprint == pixel_space.fingerprint
    assert torch.allclose(result.identity.coefficients, param.result())
    assert "vae-latent=3" in result.identity.history[-1]
    assert not any(p.requires_grad for p in vae.parameters())


def test_vae_inversion_is_deterministic_and_prior_bounds_the_latent(pixel_space, pixel_vaes):
    from w2w.invert import InvertSettings, invert

    vae = pixel_vaes["coefs"]
    denoiser = PixelDenoiser(pixel_space.layout.scale)
    latents = torch.randn(1, C, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    settings = InvertSettings(steps=60, lr=0.1, seed=0)
    runs = {}
    for weight in (0.0, 0.0, 10.0):
        param = LatentParam(vae, pixel_space, prior_weight=weight)
        invert(pixel_space, denoiser, latents, torch.zeros(1), settings, param=param)
        runs.setdefault(weight, []).append(param.mu.detach().clone())
    assert torch.equal(runs[0.0][0], runs[0.0][1])
    assert float(runs[10.0][0].norm()) < float(runs[0.0][0].norm())


def test_prior_term(trained, space):
    vae = trained[0].vae
    point = LatentParam(vae, space, init=torch.full((INTRINSIC,), 3.0), prior_weight=1.0)
    assert point.prior_loss().item() == pytest.approx(0.5 * 9 * INTRINSIC)
    gauss = LatentParam(vae, space, init=torch.zeros(INTRINSIC), gaussian=True, init_log_sigma=0.0, prior_weight=1.0)
    assert gauss.prior_loss().item() == pytest.approx(0.0, abs=1e-6)  # N(0, I) itself
    assert point.pcs == PCS and point.coefficients().shape == (PCS,)
    with pytest.raises(IdentityMismatch):
        LatentParam(vae, dataclasses.replace(space, fingerprint="0123456789abcdef"))


def test_latent_param_works_on_a_vae_loaded_under_inference_mode(pixel_space, pixel_vaes, tmp_path):
    """ComfyUI runs nodes under torch.inference_mode: the VAE's tensors are then unusable by autograd as they are."""
    path = str(tmp_path / "vae.safetensors")
    save_vae(pixel_vaes["coefs"], path)
    with torch.inference_mode():
        vae = load_vae(path)
    assert vae.decoder[0].weight.is_inference()
    param = LatentParam(vae, pixel_space, init=torch.ones(3))
    loss = param.coefficients().square().sum() + param.prior_loss()
    loss.backward()
    assert param.mu.grad is not None and float(param.mu.grad.abs().sum()) > 0
    assert torch.equal(param.result(), vae.decode(torch.ones(3)))


def test_vae_latent_is_tied_to_its_vae(pixel_vaes):
    from w2w.vae import VAELatent

    a, b = pixel_vaes["coefs"], pixel_vaes["weights"]
    assert a.fingerprint != b.fingerprint and a.fingerprint == a.fingerprint
    latent = VAELatent(torch.zeros(3), a.fingerprint)
    latent.check_vae(a)
    with pytest.raises(ValueError, match="same VAE"):
        latent.check_vae(b)
    with pytest.raises(ValueError, match="finite"):
        VAELatent(torch.tensor([float("nan")]), a.fingerprint)


def test_cli_vae_train_and_info(space, tmp_path, capsys):
    import argparse

    from w2w import cli_vae
    from w2w.space import save_space

    space_file = str(tmp_path / "space.safetensors")
    save_space(space, space_file)
    parser = argparse.ArgumentParser()
    cli_vae.register(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "cli-vae.safetensors")
    args = parser.parse_args(["vae-train", space_file, "--out", out, "--latent", "3", "--hidden", "32",
                              "--epochs", "3", "--seed", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("epoch ") == 3 and "latent units active" in printed
    vae = load_vae(out)
    assert vae.config.input_dim == PCS and vae.config.space_fingerprint == space.fingerprint
    args = parser.parse_args(["vae-info", out])
    assert args.func(args) == 0
    assert '"latent": 3' in capsys.readouterr().out
