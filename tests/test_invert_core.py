"""Inversion engine (w2w.invert) on a tiny denoiser made of three linear layers with LoRA-patched weights."""
from __future__ import annotations

import pytest
import torch

from w2w.diffusion import alphas_cumprod_from_sigmas, ddpm_noise, sd15_alphas_cumprod
from w2w.identity import Identity, IdentityMismatch
from w2w.invert import (PRESETS, FactorMap, InvertSettings, diffusion_loss, initial_coefficients, invert, masked_mean,
                        prepare_mask, step_loss)
from w2w.layout import Layout, ModuleSlot
from w2w.space import Space

CHANNELS, HIDDEN, SIZE = 4, 16, 8


def tiny_layout() -> Layout:
    """Three Linear modules (4->16, 16->16, 16->4), rank 1, factors A then B for each, like the released order."""
    shapes = [("net.0", CHANNELS, HIDDEN), ("net.1", HIDDEN, HIDDEN), ("net.2", HIDDEN, CHANNELS)]
    modules, offset = [], 0
    for name, fan_in, fan_out in shapes:
        modules.append(ModuleSlot(name, fan_in, fan_out, offset, offset + fan_in))
        offset += fan_in + fan_out
    return Layout(tuple(modules), rank=1, alpha=2.0)


def tiny_space(pcs: int = 12, seed: int = 0, dtype=torch.float32) -> Space:
    layout = tiny_layout()
    gen = torch.Generator().manual_seed(seed)
    components = torch.linalg.qr(torch.randn(layout.dim, pcs, generator=gen, dtype=torch.float64)).Q.T
    mean = 0.1 * torch.randn(layout.dim, generator=gen, dtype=torch.float64)
    std = 0.2 + torch.rand(layout.dim, generator=gen, dtype=torch.float64)
    return Space(components.to(dtype).contiguous(), mean.float(), std.float(), layout)


class TinyDenoiser:
    """Per-pixel MLP: tokens (N·h·w, C) -> 3 linear layers whose weights are W + scale · B @ A -> ε̂."""

    def __init__(self, scale: float, dtype=torch.float64, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.weights = [torch.randn(o, i, generator=gen, dtype=dtype) / i ** 0.5
                        for i, o in ((CHANNELS, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, CHANNELS))]
        self.calls: list[int] = []  # batch size of every call

    def __call__(self, x_t, t, cond, factors):
        self.calls.append(x_t.shape[0])
        n, c, h, w = x_t.shape
        dtype = self.weights[0].dtype
        x = x_t.to(dtype).permute(0, 2, 3, 1).reshape(n, h * w, c)
        time = (t.to(dtype) / 1000.0).view(n, 1, 1)
        for index, (weight, (a, b)) in enumerate(zip(self.weights, factors)):
            x = x @ (weight + self.scale * (b @ a).to(dtype)).T
            if index == 0:
                x = x + time + cond.to(dtype).view(n if cond.shape[0] == n else 1, 1, -1)
            if index < 2:
                x = torch.tanh(x)
        return x.reshape(n, h, w, c).permute(0, 3, 1, 2)


@pytest.fixture
def space():
    return tiny_space()


def make_latents(n: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def make_cond(n: int = 1) -> torch.Tensor:
    return torch.linspace(-0.5, 0.5, HIDDEN).repeat(n, 1)


def fixed_eval_loss(space, denoiser, beta, latents, cond, draws: int = 32, mask=None) -> float:
    """Mean loss over fixed (t, noise) draws: a loss that does not depend on the optimiser's random stream."""
    gen = torch.Generator().manual_seed(1234)
    abar = sd15_alphas_cumprod()
    fmap = FactorMap(space, beta.shape[0], dtype=torch.float64)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            total += float(step_loss(fmap, denoiser, beta, latents, t, noise, cond, abar, mask))
    return total / draws


# ---- the map β -> factors ------------------------------------------------------------------------------
def test_factor_map_matches_space_reconstruction(space):
    beta = torch.randn(space.pcs, generator=torch.Generator().manual_seed(0))
    fmap = FactorMap(space, space.pcs)
    expected = space.layout.factors(space.weights(beta))
    for (a, b), (ea, eb) in zip(fmap.factors(beta), expected):
        assert a.shape == ea.shape and b.shape == eb.shape
        torch.testing.assert_close(a, ea, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, eb, rtol=1e-6, atol=1e-6)


def test_factor_map_uses_fewer_pcs_and_rejects_too_many(space):
    beta = torch.randn(5)
    torch.testing.assert_close(FactorMap(space, 5).weights(beta), space.weights(beta), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="lower pcs"):
        FactorMap(space, space.pcs + 1)


def test_gradient_matches_finite_differences():
    space = tiny_space(dtype=torch.float64)
    denoiser = TinyDenoiser(space.layout.scale, dtype=torch.float64)
    fmap = FactorMap(space, space.pcs, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    x0 = make_latents(2).double()
    t = torch.tensor([10, 700])
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    cond = make_cond(2).double()
    abar = sd15_alphas_cumprod()
    mask = prepare_mask(torch.rand(2, 32, 32, generator=gen), 2, (SIZE, SIZE)).double()
    beta = torch.randn(space.pcs, generator=gen, dtype=torch.float64).requires_grad_(True)

    def loss_at(b):
        return step_loss(fmap, denoiser, b, x0, t, noise, cond, abar, mask)

    (grad,) = torch.autograd.grad(loss_at(beta), beta)
    h = 1e-6
    numeric = torch.empty_like(grad)
    with torch.no_grad():
        for k in range(space.pcs):
            e = torch.zeros_like(beta)
            e[k] = h
            numeric[k] = (loss_at(beta + e) - loss_at(beta - e)) / (2 * h)
    assert grad.abs().max() > 1e-4  # the check is not vacuous
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)


# ---- the optimisation loop -----------------------------------------------------------------------------
def test_loss_decreases_on_fixed_image(space):
    denoiser = TinyDenoiser(space.layout.scale)
    latents, cond = make_latents(), make_cond()
    settings = InvertSettings(pcs=space.pcs, steps=150, lr=0.05, seed=0)
    result = invert(space, denoiser, latents, cond, settings)
    before = fixed_eval_loss(space, denoiser, torch.zeros(space.pcs), latents, cond)
    after = fixed_eval_loss(space, denoiser, result.identity.coefficients, latents, cond)
    assert len(result.losses) == 150
    assert after < 0.9 * before, (before, after)
    assert result.identity.space_fingerprint == space.fingerprint
    assert result.identity.pcs == space.pcs
    assert "invert images=1" in result.identity.history[-1]


def test_same_seed_same_coefficients_and_other_seed_differs(space):
    latents, cond = make_latents(2), make_cond(2)
    runs = [invert(space, TinyDenoiser(space.layout.scale), latents, cond,
                   InvertSettings(pcs=space.pcs, steps=20, lr=0.05, seed=seed)) for seed in (4, 4, 5)]
    assert torch.equal(runs[0].identity.coefficients, runs[1].identity.coefficients)
    assert runs[0].losses == runs[1].losses
    assert not torch.equal(runs[0].identity.coefficients, runs[2].identity.coefficients)


def test_multi_image_batches(space):
    latents, cond = make_latents(3), make_cond(3)
    everything = TinyDenoiser(space.layout.scale)
    result = invert(space, everything, latents, cond, InvertSettings(pcs=space.pcs, steps=60, lr=0.05))
    assert everything.calls == [3] * 60
    before = fixed_eval_loss(space, everything, torch.zeros(space.pcs), latents, cond)
    after = fixed_eval_loss(space, everything, result.identity.coefficients, latents, cond)
    assert after < before
    subset = TinyDenoiser(space.layout.scale)
    invert(space, subset, latents, make_cond(1), InvertSettings(pcs=space.pcs, steps=5, images_per_step=2))
    assert subset.calls == [2] * 5


def test_mask_hides_the_masked_out_region(space):
    """With the right half masked out, what the image holds there does not change the result at all."""
    cond = make_cond()
    mask = torch.zeros(1, 64, 64)
    mask[..., :32] = 1.0  # image-resolution mask; the latent is 8x8
    latents = make_latents()
    other = latents.clone()
    other[..., SIZE // 2:] = torch.randn(1, CHANNELS, SIZE, SIZE // 2, generator=torch.Generator().manual_seed(9))
    settings = InvertSettings(pcs=space.pcs, steps=30, lr=0.05)
    a = invert(space, TinyDenoiser(space.layout.scale), latents, cond, settings, mask=mask)
    b = invert(space, TinyDenoiser(space.layout.scale), other, cond, settings, mask=mask)
    torch.testing.assert_close(a.identity.coefficients, b.identity.coefficients, rtol=0, atol=1e-6)
    unmasked = invert(space, TinyDenoiser(space.layout.scale), other, cond, settings)
    assert not torch.allclose(a.identity.coefficients, unmasked.identity.coefficients, atol=1e-4)
    assert a.identity.history[-1].endswith("masked")


def test_full_mask_equals_no_mask():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ones = prepare_mask(torch.ones(16, 16), 2, (8, 8))
    torch.testing.assert_close(diffusion_loss(pred, target, ones), diffusion_loss(pred, target), rtol=1e-6, atol=0)


def test_masked_mean_per_item_is_each_items_own_loss():
    """masked_mean(per_item=True) gives each item the loss diffusion_loss gives it alone (the batched micro losses
    rest on it); a mask of one item (1, 1, h, w) weighs every item alike; the pooled mean weighs pixels, not items."""
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.rand(3, 1, 8, 8, generator=g)
    mask[1, :, 4:] = 0  # the items' masks differ in size
    err = (pred - target).square()
    each = masked_mean(err, mask, per_item=True)
    assert each.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(each[i], diffusion_loss(pred[i:i + 1], target[i:i + 1], mask[i:i + 1]),
                                   rtol=1e-6, atol=0)
    shared = masked_mean(err, mask[:1], per_item=True)
    torch.testing.assert_close(shared[2], diffusion_loss(pred[2:], target[2:], mask[:1]), rtol=1e-6, atol=0)
    torch.testing.assert_close(masked_mean(err, mask), diffusion_loss(pred, target, mask), rtol=1e-6, atol=0)
    assert not torch.allclose(masked_mean(err, mask), each.mean(), rtol=1e-3)  # pixels, not items, are weighed
    torch.testing.assert_close(masked_mean(err, None, per_item=True), err.flatten(1).mean(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(64, 64), (1, 64, 64), (2, 64, 64), (2, 1, 64, 48)])
def test_prepare_mask_shapes(shape):
    m = prepare_mask(torch.ones(shape), 2, (8, 6))
    assert m.shape == (2, 1, 8, 6)
    assert torch.all(m == 1)


def test_prepare_mask_errors():
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        prepare_mask(torch.ones(3, 8, 8), 2, (8, 8))
    with pytest.raises(ValueError, match="empty"):
        prepare_mask(torch.zeros(8, 8), 1, (8, 8))
    with pytest.raises(ValueError, match="shape"):
        prepare_mask(torch.ones(1, 2, 3, 8, 8), 1, (8, 8))


def test_callback_reports_every_step_and_can_cancel(space):
    seen = []

    class Stop(Exception):
        pass

    def callback(step, total, info):
        seen.append((step, total, info["loss"]))
        if step == 3:
            raise Stop

    denoiser = TinyDenoiser(space.layout.scale)
    with pytest.raises(Stop):
        invert(space, denoiser, make_latents(), make_cond(), InvertSettings(pcs=space.pcs, steps=50), callback=callback)
    assert [s for s, _, _ in seen] == [1, 2, 3] and all(total == 50 for _, total, _ in seen)
    assert len(denoiser.calls) == 3


def test_init_from_identity(space):
    ident = Identity(torch.tensor([0.5, -0.25, 1.0]), space.fingerprint, "start", ("sample",))
    beta0 = initial_coefficients(space, 6, ident)
    assert torch.equal(beta0, torch.tensor([0.5, -0.25, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="raise pcs"):
        initial_coefficients(space, 2, ident)
    with pytest.raises(IdentityMismatch):
        initial_coefficients(space, 6, Identity(torch.ones(3), "0123456789abcdef"))
    # A run that starts at the identity starts from its loss, not the mean's.
    latents, cond = make_latents(), make_cond()
    settings = InvertSettings(pcs=6, steps=1, lr=1e-12)
    from_identity = invert(space, TinyDenoiser(space.layout.scale), latents, cond, settings, init=ident)
    from_mean = invert(space, TinyDenoiser(space.layout.scale), latents, cond, settings)
    torch.testing.assert_close(from_identity.identity.coefficients, beta0, rtol=0, atol=1e-9)
    assert from_identity.losses[0] != from_mean.losses[0]
    assert from_identity.identity.history[0] == "sample"


def test_settings_validation_and_presets():
    assert PRESETS["reference"] == InvertSettings(pcs=10_000, steps=400, lr=0.1, weight_decay=1e-10)
    assert PRESETS["out-of-distribution"] == InvertSettings(pcs=1000, steps=800, lr=1.0, weight_decay=0.0)
    for bad in ({"pcs": 0}, {"steps": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"weight_decay": -1.0},
                {"images_per_step": -1}):
        with pytest.raises(ValueError):
            InvertSettings(**bad)


def test_invert_rejects_bad_latents(space):
    with pytest.raises(ValueError, match="non-empty"):
        invert(space, TinyDenoiser(1.0), torch.zeros(0, 4, 8, 8), make_cond(), InvertSettings(pcs=4, steps=1))


def test_diverging_loss_is_reported(space):
    def exploding(x_t, t, cond, factors):
        return x_t * float("inf")

    with pytest.raises(FloatingPointError, match="lower lr"):
        invert(space, exploding, make_latents(), make_cond(), InvertSettings(pcs=4, steps=3))


# ---- schedule --------------------------------------------------------------------------------------------
def test_ddpm_noise_and_sigma_schedule_agree():
    abar = sd15_alphas_cumprod()
    assert abar.shape == (1000,) and 0.99 < float(abar[0]) < 1 and 0 < float(abar[-1]) < 0.01
    sigmas = ((1 - abar) / abar).sqrt()
    torch.testing.assert_close(alphas_cumprod_from_sigmas(sigmas.float()), abar, rtol=1e-6, atol=0)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([0, 999])
    x_t = ddpm_noise(x0, t, eps, abar)
    # ComfyUI/k-diffusion form: (x0 + σ ε) / sqrt(1 + σ²) is the same point.
    s = sigmas[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (x0 + s * eps) / (1 + s ** 2).sqrt(), rtol=1e-5, atol=1e-6)


def test_denoiser_that_ignores_the_factors_is_reported(space):
    def unpatched(x_t, t, cond, factors):
        return x_t * 0.5

    with pytest.raises(RuntimeError, match="not patched"):
        invert(space, unpatched, make_latents(), make_cond(), InvertSettings(pcs=4, steps=1))


def test_space_made_under_inference_mode_can_be_inverted():
    """Inside ComfyUI a loaded space holds inference tensors; the map must not save them for backward."""
    with torch.inference_mode():
        space = tiny_space()
    assert space.components.is_inference()
    result = invert(space, TinyDenoiser(space.layout.scale), make_latents(), make_cond(),
                    InvertSettings(pcs=space.pcs, steps=3, lr=0.05))
    assert len(result.losses) == 3 and torch.isfinite(result.identity.coefficients).all()


@pytest.mark.parametrize("block_bytes", [1, 200, 1 << 30])  # one PC per block, a few, all at once
def test_fused_adam_follows_torch_adam(space, block_bytes):
    """One pass over the basis per step gives the trajectory of autograd through w(β) + torch.optim.Adam."""
    from w2w.invert import FusedAdam

    denoiser = TinyDenoiser(space.layout.scale)
    latents, cond = make_latents(), make_cond()
    abar = sd15_alphas_cumprod()
    fmap = FactorMap(space, space.pcs)
    beta0 = 0.1 * torch.randn(space.pcs, generator=torch.Generator().manual_seed(4))
    beta = beta0.clone().requires_grad_(True)
    reference = torch.optim.Adam([beta], lr=0.05, weight_decay=0.01)
    fused = FusedAdam(fmap, beta0, lr=0.05, weight_decay=0.01, block_bytes=block_bytes)
    if block_bytes == 1:
        assert len(fused.blocks) == space.pcs
    elif block_bytes == 1 << 30:
        assert len(fused.blocks) == 1
    gen = torch.Generator().manual_seed(9)
    for _ in range(6):
        t = torch.randint(0, 1000, (1,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        x_t = ddpm_noise(latents, t, noise, abar)
        reference.zero_grad()
        diffusion_loss(denoiser(x_t, t, cond, fmap.factors(beta)), noise).backward()
        reference.step()
        diffusion_loss(denoiser(x_t, t, cond, fused.factors()), noise).backward()
        fused.step()
    assert (beta.detach() - beta0).abs().max() > 1e-3  # it moved
    torch.testing.assert_close(fused.beta, beta.detach(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused.w.detach(), fmap.weights(beta), rtol=1e-4, atol=1e-5)


# ---- mixed precision (the products themselves: tests/test_products.py) -----------------------------------
# |β_low − β_fp32| relative to how far β moved. Each step's two products are within 2u of float32 (u: unit roundoff of
# the half type; tests/test_products.py); Adam turns a gradient error into a step error of the same relative size and
# these short, contracting runs do not amplify it, so the bound is 4u (measured: 0.65u for float16, 1.4u for
# bfloat16 after 6 steps; 0.44u and 0.55u after 20 steps of invert()).
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
LOW_PRECISION_DRIFT = {dtype: 4 * u for dtype, u in UNIT_ROUNDOFF.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_adam_in_low_precision_stays_close_to_float32(space, dtype):
    """Mixed precision: β and Adam in float32, the two products in half precision; the trajectory barely moves."""
    from w2w.invert import FusedAdam

    denoiser = TinyDenoiser(space.layout.scale)
    latents, cond = make_latents(), make_cond()
    abar = sd15_alphas_cumprod()
    beta0 = 0.1 * torch.randn(space.pcs, generator=torch.Generator().manual_seed(4))
    full = FusedAdam(FactorMap(space, space.pcs), beta0, lr=0.05, weight_decay=0.01)
    low = FusedAdam(FactorMap(space, space.pcs, basis_dtype=dtype), beta0, lr=0.05, weight_decay=0.01)
    assert full.fused and not low.fused and low.fmap.basis_dtype == dtype
    assert low.w.dtype == torch.float32 and low.beta.dtype == torch.float32
    gen = torch.Generator().manual_seed(9)
    for _ in range(6):
        t = torch.randint(0, 1000, (1,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        x_t = ddpm_noise(latents, t, noise, abar)
        for opt in (full, low):
            diffusion_loss(denoiser(x_t, t, cond, opt.factors()), noise).backward()
            opt.step()
    moved = float((full.beta - beta0).norm())
    assert moved > 1e-2
    assert float((low.beta - full.beta).norm()) < LOW_PRECISION_DRIFT[dtype] * moved
    delta = full.w.detach() - FactorMap(space, space.pcs).weights(torch.zeros(space.pcs))
    assert float((low.w.detach() - full.w.detach()).norm()) < LOW_PRECISION_DRIFT[dtype] * float(delta.norm())


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_invert_in_low_precision_notes_it_and_lands_near_float32(space, precision):
    settings = InvertSettings(pcs=space.pcs, steps=20, lr=0.05, seed=3)
    denoiser = TinyDenoiser(space.layout.scale)
    full = invert(space, denoiser, make_latents(), make_cond(), settings, precision="float32")
    low = invert(space, denoiser, make_latents(), make_cond(), settings, precision=precision)
    assert f"basis={precision}" in low.identity.history[-1] and "basis=" not in full.identity.history[-1]
    a, b = full.identity.coefficients, low.identity.coefficients
    assert float(a.norm()) > 0.1
    assert float((a - b).norm()) < LOW_PRECISION_DRIFT[getattr(torch, precision)] * float(a.norm())
    again = invert(space, denoiser, make_latents(), make_cond(), settings, precision=precision)
    assert torch.equal(again.identity.coefficients, b)  # reproducible in low precision too
    with pytest.raises(ValueError, match="unknown precision"):
        invert(space, denoiser, make_latents(), make_cond(), settings, precision="fp8")


def test_random_crop_per_step_moves_over_the_latents_and_takes_the_mask_along(space, monkeypatch):
    """crop=k: every step optimises on a k × k window of the latents at a seeded random place (reported to the
    callback); the windows differ between steps and stay inside; the mask is cut the same way (a mask that is zero
    in a whole window is refused); crop=0 sees the whole latents every step."""
    seen, windows = [], []

    class Recorder(TinyDenoiser):
        def __call__(self, x_t, t, cond, factors):
            seen.append(tuple(x_t.shape[-2:]))
            return super().__call__(x_t, t, cond, factors)

    latents = torch.randn(1, CHANNELS, 12, 12, generator=torch.Generator().manual_seed(2))
    settings = InvertSettings(pcs=space.pcs, steps=8, lr=0.05, seed=1, crop=8)
    cropped = invert(space, Recorder(space.layout.scale), latents, make_cond(), settings,
                     callback=lambda step, total, info: windows.append(info["window"]))
    assert seen == [(8, 8)] * 8 and "crop=8" in cropped.identity.history[-1]
    assert len(set(windows)) > 1 and all(0 <= top <= 4 and 0 <= left <= 4 for top, left in windows)
    again = invert(space, Recorder(space.layout.scale), latents, make_cond(), settings)
    assert torch.equal(cropped.identity.coefficients, again.identity.coefficients)  # seeded windows
    whole = invert(space, Recorder(space.layout.scale), latents, make_cond(),
                   InvertSettings(pcs=space.pcs, steps=8, lr=0.05, seed=1))
    assert seen[-8:] == [(12, 12)] * 8 and not torch.equal(whole.identity.coefficients, cropped.identity.coefficients)

    # a mask weights the window's pixels: only the left 4 latent columns count, so windows starting right of them
    # see nothing there; the loss is the mask-weighted mean over the window (finite as long as it overlaps)
    mask = torch.zeros(12, 12)
    mask[:, :5] = 1.0  # every 8-wide window of 12 overlaps columns 0..4
    masked = invert(space, Recorder(space.layout.scale), latents, make_cond(), settings, mask=mask)
    assert not torch.equal(masked.identity.coefficients, cropped.identity.coefficients)
    # a mask near the border: windows without any of it are drawn again (their loss would be 0/0), seeded
    windows.clear()
    strip = torch.zeros(12, 12)
    strip[:2] = 1.0  # only windows starting in rows 0..1 hold some of it
    top_only = invert(space, Recorder(space.layout.scale), latents, make_cond(), settings, mask=strip,
                      callback=lambda step, total, info: windows.append(info["window"]))
    assert len(windows) == 8 and all(top <= 1 for top, _ in windows) and len(set(windows)) > 1
    assert torch.isfinite(top_only.identity.coefficients).all()
    again = invert(space, Recorder(space.layout.scale), latents, make_cond(), settings, mask=strip)
    assert torch.equal(again.identity.coefficients, top_only.identity.coefficients)
    corner = torch.zeros(12, 12)
    corner[0, 0] = 1.0  # held by one window of 25: with a single draw per step it is missed at some step
    import w2w.invert as invert_module
    monkeypatch.setattr(invert_module, "CROP_DRAWS", 1)
    with pytest.raises(ValueError, match="holds any of the mask: paint a larger mask, or turn random_crop off"):
        invert(space, Recorder(space.layout.scale), latents, make_cond(), settings, mask=corner)
    with pytest.raises(ValueError, match="larger than the latents"):
        invert(space, Recorder(space.layout.scale), latents, make_cond(), InvertSettings(pcs=space.pcs, steps=1,
                                                                                          crop=13))


def test_latent_std_gives_a_fresh_posterior_sample_every_step(space, monkeypatch):
    """latent_std: every step noises latents + latent_std · ε with a new ε from the seeded generator (the reference's
    latent_dist.sample()), not the latents themselves; without it the latents are used as they are. Checked on the
    x0 handed to the forward process: its deviation from the latents has the given std (tolerance: 4 standard errors
    of a sample standard deviation over 1,728 values, ≈ 4 · 0.5/√3456 ≈ 0.034) and mean 0, and differs per step."""
    import w2w.invert as core

    seen = []
    real = core.ddpm_noise

    def recording(x0, t, noise, abar):
        seen.append(x0.detach().clone())
        return real(x0, t, noise, abar)

    monkeypatch.setattr(core, "ddpm_noise", recording)
    latents = torch.randn(3, CHANNELS, 12, 12, generator=torch.Generator().manual_seed(2))
    settings = InvertSettings(pcs=space.pcs, steps=4, lr=0.05, seed=1)
    plain = invert(space, TinyDenoiser(space.layout.scale), latents, make_cond(), settings)
    assert all(torch.equal(x0, latents) for x0 in seen)
    seen.clear()
    std = torch.full_like(latents, 0.5)
    sampled = invert(space, TinyDenoiser(space.layout.scale), latents, make_cond(), settings, latent_std=std)
    deviations = [x0 - latents for x0 in seen]
    for dev in deviations:
        assert abs(float(dev.std()) - 0.5) < 0.034 and abs(float(dev.mean())) < 4 * 0.5 / dev.numel() ** 0.5
    assert not torch.equal(deviations[0], deviations[1]) and "vae_sample" in sampled.identity.history[-1]
    again = invert(space, TinyDenoiser(space.layout.scale), latents, make_cond(), settings, latent_std=std)
    assert torch.equal(again.identity.coefficients, sampled.identity.coefficients)  # seeded samples
    assert not torch.equal(plain.identity.coefficients, sampled.identity.coefficients)
    with pytest.raises(ValueError, match="latent_std must be"):
        invert(space, TinyDenoiser(space.layout.scale), latents, make_cond(), settings, latent_std=std[:1])
    with pytest.raises(ValueError, match="latent_std must be"):
        invert(space, TinyDenoiser(space.layout.scale), latents, make_cond(), settings, latent_std=-std)


# ---- identity loss -----------------------------------------------------------------------------------------
def latent_embed(seed: int = 6):
    """A frozen 'face embedding' of latents: a fixed random projection of the pooled pixels, normalised."""
    proj = torch.randn(CHANNELS * 4, 5, generator=torch.Generator().manual_seed(seed))

    def embed(x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)
        return torch.nn.functional.normalize(pooled @ proj, dim=1)

    return embed


def test_identity_loss_adds_weight_times_one_minus_cos_of_the_predicted_clean_latents(space):
    """Each step's loss is the diffusion loss + weight · mean(1 − cos(embed(x̂0), embed(photo))), x̂0 from ε̂ (the
    denoiser has no predict); the draws are the inversion's own, the curve shown stays the diffusion loss, and weight
    0 is no identity loss at all. Followed against autograd + torch.optim.Adam on the same draws."""
    from w2w.invert import IdentityLoss, predict_clean

    denoiser = TinyDenoiser(space.layout.scale)
    latents, cond = make_latents(2), make_cond()
    abar = sd15_alphas_cumprod()
    settings = InvertSettings(pcs=space.pcs, steps=5, lr=0.05, weight_decay=0.0, seed=7)
    embed, weight = latent_embed(), 0.3
    plain = invert(space, denoiser, latents, cond, settings)
    zero = invert(space, denoiser, latents, cond, settings, identity=IdentityLoss(embed, 0.0))
    assert torch.equal(plain.identity.coefficients, zero.identity.coefficients)
    infos = []
    result = invert(space, denoiser, latents, cond, settings, identity=IdentityLoss(embed, weight),
                    callback=lambda s, n, info: infos.append(info["identity_loss"]))
    # the same run by hand: the engine's draws (timesteps, noise; both images each step), autograd, torch Adam
    fmap = FactorMap(space, space.pcs)
    beta = torch.zeros(space.pcs, requires_grad=True)
    opt = torch.optim.Adam([beta], lr=0.05)
    gen = torch.Generator().manual_seed(7)
    targets = embed(latents)
    losses, id_losses = [], []
    for _ in range(5):
        t = torch.randint(0, 1000, (2,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        x_t = ddpm_noise(latents, t, noise, abar)
        eps = denoiser(x_t, t, cond, fmap.factors(beta))
        a = abar[t].view(-1, 1, 1, 1).float()
        x0_hat = (x_t - (1 - a).sqrt() * eps.float()) / a.sqrt()
        id_loss = (1 - (embed(x0_hat) * targets).sum(1)).mean()
        diff = diffusion_loss(eps, noise)
        opt.zero_grad()
        (diff + weight * id_loss).backward()
        opt.step()
        losses.append(float(diff.detach()))
        id_losses.append(float(id_loss.detach()))
    torch.testing.assert_close(result.identity.coefficients, beta.detach(), rtol=1e-4, atol=1e-5)
    assert result.losses == pytest.approx(losses, rel=1e-5) and infos == pytest.approx(id_losses, rel=1e-5)
    assert not torch.allclose(result.identity.coefficients, plain.identity.coefficients)
    assert "identity_loss=0.3" in result.identity.history[-1]
    eps, x0 = predict_clean(denoiser, x_t, t, cond, fmap.factors(beta.detach()), abar)
    torch.testing.assert_close(ddpm_noise(x0, t, eps.float(), abar).float(), x_t.float(), rtol=1e-4, atol=1e-4)


def test_balanced_identity_weight_equalises_the_gradients_at_the_start(space):
    """balance=True: the weight used is weight × RMS(∇ diffusion) / RMS(∇ identity) at the start, over draws of its
    own — the inversion's own draws are unchanged (a balanced run equals a fixed-weight run at that weight)."""
    from w2w.invert import IdentityLoss, balanced_identity_weight

    denoiser = TinyDenoiser(space.layout.scale)
    latents, cond = make_latents(1), make_cond()
    abar = sd15_alphas_cumprod()
    embed = latent_embed()
    settings = InvertSettings(pcs=space.pcs, steps=3, lr=0.05, seed=2)
    fmap = FactorMap(space, space.pcs)
    identity = IdentityLoss(embed, 2.0, balance=True, balance_draws=3)
    w = balanced_identity_weight(fmap, denoiser, torch.zeros(space.pcs), latents, cond, abar, identity,
                                 identity.targets(latents), seed=2, per_step=1)
    # by hand: the same three draws, the two gradients' RMS
    gen = torch.Generator().manual_seed(2 + 0x1D1D)
    d, i = 0.0, 0.0
    for _ in range(3):
        t = torch.randint(0, 1000, (1,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        beta = torch.zeros(space.pcs, requires_grad=True)
        x_t = ddpm_noise(latents, t, noise, abar)
        eps = denoiser(x_t, t, cond, fmap.factors(beta))
        a = abar[t].view(-1, 1, 1, 1).float()
        x0_hat = (x_t - (1 - a).sqrt() * eps.float()) / a.sqrt()
        g1, = torch.autograd.grad(diffusion_loss(eps, noise), beta, retain_graph=True)
        g2, = torch.autograd.grad((1 - (embed(x0_hat) * embed(latents)).sum(1)).mean(), beta)
        d, i = d + float(g1.square().mean()), i + float(g2.square().mean())
    assert w == pytest.approx(2.0 * (d / i) ** 0.5, rel=1e-5)
    balanced = invert(space, denoiser, latents, cond, settings, identity=identity)
    fixed = invert(space, denoiser, latents, cond, settings, identity=IdentityLoss(embed, w))
    torch.testing.assert_close(balanced.identity.coefficients, fixed.identity.coefficients, rtol=1e-5, atol=1e-6)
    assert f"identity_loss={w:.4g}" in balanced.identity.history[-1]


def test_identity_loss_errors(space):
    from w2w.invert import IdentityLoss

    denoiser = TinyDenoiser(space.layout.scale)
    latents, cond = make_latents(1), make_cond()
    settings = InvertSettings(pcs=space.pcs, steps=1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        IdentityLoss(latent_embed(), float("nan"))
    with pytest.raises(TypeError, match="callable"):
        IdentityLoss("facenet")
    with pytest.raises(ValueError, match="unit vectors"):
        invert(space, denoiser, latents, cond, settings, identity=IdentityLoss(lambda x: x.flatten(1)[:, :3] * 5, 1.0))
    with pytest.raises(ValueError, match="one finite vector per image"):
        invert(space, denoiser, latents, cond, settings, identity=IdentityLoss(lambda x: torch.ones(3, 2), 1.0))
    flat = IdentityLoss(lambda x: torch.nn.functional.normalize(torch.ones(x.shape[0], 3), dim=1), 1.0, balance=True)
    with pytest.raises(ValueError, match="no gradient"):
        invert(space, denoiser, latents, cond, settings, identity=flat)
