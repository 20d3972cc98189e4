"""Many single-photo inversions of the miniature world in one batched pass.

The micro UNet takes per-item LoRA factors (as the LoRA training does), so the inversions of n people run as one
batch of n: person i has its own coefficients β_i, its own Adam state and its own random draws (a generator seeded
with its seed, drawn in the order :func:`w2w.invert.invert` draws them: timestep, then noise). The loss is the sum
of the per-person diffusion losses, so β_i's gradient is that of person i's own loss, and Adam (elementwise, L2 weight
decay) updates it as it would alone: the result equals n calls of :func:`w2w.invert.invert` (one photo, every PC of
the space) up to floating-point rounding. On a CPU one batched step costs far less than n single steps.

``momentum`` > 0 replaces Adam by SGD with that (heavy-ball) momentum, an experiment of the refinement benchmark
(docs/encoder.md): its step follows the gradient's size per coefficient where Adam's is about ``lr`` for every one.

``masks`` (n, 1, H, W): person i's diffusion loss is its mask-weighted mean over pixels (:func:`w2w.invert.invert`'s
``mask``, the reference code's optional face mask), so only the prediction error on the masked part of the photo
(the head) is fitted.

``identity`` (:class:`w2w.invert.IdentityLoss`) adds an identity loss to each person's diffusion loss (as PuLID
does): ``weight`` · (1 − cos) between a face embedding of the clean image the model predicts at that step's noisy
photo (x̂0) and the embedding of the photo itself. The embedding is a frozen network's (in this world the retrieval
encoder's, never the judge's); the draws are the same as without it, so the diffusion part of every step is
unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..diffusion import ddpm_noise
from ..invert import IdentityLoss, masked_mean
from .model import MicroDenoiser, alphas_cumprod

__all__ = ["invert_batch"]


def invert_batch(world, photos: torch.Tensor, seeds: Sequence[int], *, steps: int = 400, lr: float = 0.1,
                 weight_decay: float = 1e-10, space=None, init: torch.Tensor | None = None,
                 record: Sequence[int] = (), chunk: int = 64, momentum: float = 0.0,
                 identity: IdentityLoss | None = None, masks: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Invert one photo per person, ``photos`` (n, 3, H, W) in [-1, 1], over every PC of ``space`` (default: the
    world's), person i with seed ``seeds[i]`` and start ``init[i]`` (n, ≤ pcs; zero-padded; None: the mean model).
    -> {step: β (n, pcs)} for every step of ``record`` (0 = the start) and the last. ``chunk`` people per pass
    (memory); the result does not depend on it. ``momentum`` > 0: SGD with that momentum at ``lr`` instead of Adam
    (``weight_decay`` is Adam's only). ``identity``: add that identity loss to every person's loss at its
    fixed weight (module doc; ``balance`` is the single inversion's: refused here). ``masks`` (n, 1, H, W) in
    [0, 1]: each person's loss over the masked pixels only (module doc); values outside [0, 1] are refused here,
    where :func:`w2w.invert.prepare_mask` (for the nodes' MASK inputs) clamps them."""
    space = world.space if space is None else space
    if photos.dim() != 4 or photos.shape[0] < 1:
        raise ValueError(f"photos must be a non-empty (n, 3, H, W) batch, got {tuple(photos.shape)}")
    n, k = photos.shape[0], space.pcs
    if len(seeds) != n:
        raise ValueError(f"one seed per photo: got {len(seeds)} seeds for {n} photos")
    if steps < 0 or not (math.isfinite(lr) and lr > 0) or chunk < 1 or not 0.0 <= momentum < 1.0:
        raise ValueError(f"steps must be >= 0, lr > 0, chunk >= 1 and 0 <= momentum < 1, got {steps}, {lr}, {chunk}, "
                         f"{momentum}")
    if identity is not None and identity.balance:
        raise ValueError("invert_batch takes the identity loss at a fixed weight: pass IdentityLoss(balance=False)")
    if masks is not None:
        if masks.shape != (n, 1, *photos.shape[2:]):
            raise ValueError(f"masks must be (n, 1, H, W) = {(n, 1, *photos.shape[2:])}, got {tuple(masks.shape)}")
        if not bool(torch.isfinite(masks).all()) or float(masks.min()) < 0 or float(masks.max()) > 1:
            raise ValueError("masks must hold finite values in [0, 1]")
        if float(masks.flatten(1).sum(1).min()) <= 0:
            raise ValueError("a mask is empty (all zero): that person's loss would see no pixel")
    beta0 = torch.zeros(n, k)
    if init is not None:
        if init.dim() != 2 or init.shape[0] != n or init.shape[1] > k:
            raise ValueError(f"init must be (n={n}, <= {k}) coefficients, got {tuple(init.shape)}")
        beta0[:, : init.shape[1]] = init.detach().float()
    out: dict[int, list[torch.Tensor]] = {}
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        runs = _run(world, space, photos[start:stop], seeds[start:stop], beta0[start:stop], steps, lr, weight_decay,
                    set(record) | {steps}, momentum, identity, None if masks is None else masks[start:stop].float())
        for step, beta in runs.items():
            out.setdefault(step, []).append(beta)
    return {step: torch.cat(parts) for step, parts in out.items()}


def _run(world, space, photos, seeds, beta0, steps, lr, weight_decay, record, momentum,
         identity, masks) -> dict[int, torch.Tensor]:
    denoiser = MicroDenoiser(world.unet, world.layout.scale)
    abar = alphas_cumprod().double()
    ctx = world.context(world.config.lora.prompt)
    gens = [torch.Generator(device="cpu").manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]
    basis, std, mean = space.components[: space.pcs].float(), space.std.float(), space.mean.float()
    beta = beta0.clone().requires_grad_(True)
    opt = (torch.optim.SGD([beta], lr=lr, momentum=momentum) if momentum > 0
           else torch.optim.Adam([beta], lr=lr, weight_decay=weight_decay))
    x0 = photos.detach().float()
    use_id = identity is not None and identity.weight > 0
    if use_id:
        target = identity.targets(x0)
    kept = {0: beta0.clone()} if 0 in record else {}
    for step in range(1, steps + 1):
        draws = [(torch.randint(0, abar.shape[0], (1,), generator=g), torch.randn((1, *x0.shape[1:]), generator=g))
                 for g in gens]
        t = torch.cat([d[0] for d in draws])
        noise = torch.cat([d[1] for d in draws])
        x_t = ddpm_noise(x0, t, noise, abar)
        pred, x0_hat = denoiser.predict(x_t, t, ctx, world.layout.factors(torch.addcmul(mean, beta @ basis, std)))
        # Σ_i of person i's diffusion loss
        total = masked_mean((pred.float() - noise).square(), masks, per_item=True).sum()
        if use_id:  # Σ_i of person i's identity loss: each x̂0 against its own photo
            total = total + identity.weight * identity.per_item(x0_hat.float(), target).sum()
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(f"an inversion loss became non-finite at step {step}: lower lr (now {lr:g})")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if step in record:
            kept[step] = beta.detach().clone()
    return kept
