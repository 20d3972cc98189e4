"""Inversion (paper §3.4, App. C): the point of a w2w space whose model best denoises given photos of one person.

Only the PCA coefficients β (pcs,) are optimised, with Adam on the diffusion loss ‖ε − ε̂_β(x_t, t, c)‖² (DDPM:
x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, x0 the VAE latent, t ~ U{0..999}); UNet, VAE and text encoder stay frozen.
The model is reached through a :class:`Denoiser`, so the engine runs the same on a ComfyUI MODEL and on a toy net.

Speed: all LoRA factors come from one weight vector ``w = (β @ basis[:pcs]) * std + mean``, on the compute device
in the compute dtype, split into per-module (A, B) views (:class:`FactorMap`). The gradient ∂L/∂β, the Adam
update and the next ``w`` cost one pass over the float32 basis per step (:class:`FusedAdam`), or two over a
half-precision copy (:mod:`w2w.products`) — reading the basis is what bounds a CPU step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F

from .diffusion import ddpm_noise, sd15_alphas_cumprod
from .identity import Identity
from .layout import Layout
from .products import PRECISIONS, BasisProducts, basis_dtype_for
from .space import Space

__all__ = ["InvertSettings", "PRESETS", "PRECISIONS", "FactorMap", "FusedAdam", "Factors", "FactorBoard",
           "FactorWrapper", "Denoiser", "InversionResult", "invert", "prepare_mask", "masked_mean", "diffusion_loss",
           "step_loss", "initial_coefficients", "Parametrisation", "IdentityLoss", "predict_clean",
           "balanced_identity_weight"]

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layout module: (A (rank, in), B (out, rank))


@dataclass(frozen=True)
class InvertSettings:
    """Optimisation settings; the defaults are the paper's (App. C)."""

    pcs: int = 10_000  # coefficients optimised (the first pcs principal components)
    steps: int = 400
    lr: float = 0.1  # Adam learning rate
    weight_decay: float = 1e-10  # Adam (L2) weight decay on β
    seed: int = 0  # timesteps, noise and image order
    images_per_step: int = 0  # images of the batch used per step (0 = all of them)
    crop: int = 0  # side (latent pixels) of a random crop taken at every step, as the reference does (0 = all of it)

    def __post_init__(self) -> None:
        if self.pcs < 1:
            raise ValueError(f"pcs must be >= 1, got {self.pcs}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.images_per_step < 0:
            raise ValueError(f"images_per_step must be >= 0 (0 = all images), got {self.images_per_step}")
        if self.crop < 0:
            raise ValueError(f"crop must be >= 0 (0 = no random crop), got {self.crop}")


PRESETS: dict[str, InvertSettings] = {
    "reference": InvertSettings(),
    # Paintings, cartoons and other out-of-distribution inputs (paper App. C).
    "out-of-distribution": InvertSettings(pcs=1000, steps=800, lr=1.0, weight_decay=0.0),
    # Refining a face encoder's identity (w2w.encoder): 1/4 of reference's steps, the fewest after which the refined
    # identity passed the full inversion on validation people in the miniature world (docs/encoder.md).
    "fast": InvertSettings(pcs=10_000, steps=100, lr=0.1),
}


class _Unproject(torch.autograd.Function):
    """w = (β @ basis) * std + mean, differentiable in β only; one product forward, one backward.

    The basis, std and mean are kept as plain attributes, not saved tensors: they may be inference tensors (a space
    loaded inside ComfyUI's executor), which autograd refuses to save, and copying a 4 GB basis to avoid that would
    double its memory.
    """

    @staticmethod
    def forward(ctx, beta, products, std, mean):
        ctx.products, ctx.std = products, std
        return torch.addcmul(mean, products.project(beta), std)

    @staticmethod
    def backward(ctx, grad):
        return ctx.products.pullback(grad.to(ctx.std.dtype) * ctx.std).to(grad.dtype), None, None, None


class FactorMap:
    """Differentiable β (k,) -> per-module LoRA factors (A, B), with one matmul: w = (β @ basis[:k]) * std + mean.

    ``dtype`` is the dtype of the factors (the model's compute dtype); ``basis_dtype`` the one of the products with
    the basis (default: ``dtype``; see :func:`basis_dtype_for` and :class:`BasisProducts`). The weight vector is
    formed in float32 (float64 for a float64 basis) before it is cast to ``dtype``.
    """

    def __init__(self, space: Space, pcs: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 basis_dtype: torch.dtype | None = None):
        if not 1 <= pcs <= space.pcs:
            raise ValueError(f"the space is loaded with {space.pcs:,} PCs; inversion asked for {pcs:,}: lower pcs "
                             f"or load the space with pcs >= {pcs:,} (the file has {space.total_pcs:,})")
        self.layout = space.layout
        self.pcs = pcs
        self.dtype = dtype
        self.device = torch.device(device)
        self.products = BasisProducts(space.components[:pcs], self.device,
                                      dtype if basis_dtype is None else basis_dtype)
        acc = self.products.out_dtype
        self.std = space.std.to(self.device, acc)  # (d,)
        self.mean = space.mean.to(self.device, acc)  # (d,)
        spans = []  # the factors tile w: one split in offset order gives every factor as a view
        for index, m in enumerate(self.layout.modules):
            r = self.layout.rank
            spans.append((m.a_offset, r * m.in_features, index, "A", (r, m.in_features)))
            spans.append((m.b_offset, r * m.out_features, index, "B", (m.out_features, r)))
        spans.sort()
        self._sizes = [size for _, size, _, _, _ in spans]
        self._targets = [(index, which, shape) for _, _, index, which, shape in spans]

    @property
    def scale(self) -> float:
        return self.layout.scale

    @property
    def basis_dtype(self) -> torch.dtype:
        return self.products.dtype

    def weights(self, beta: torch.Tensor) -> torch.Tensor:
        """β (k,) -> flat weight vector (d,) in the compute dtype."""
        beta = beta.to(self.device, torch.promote_types(beta.dtype, torch.float32))
        return _Unproject.apply(beta, self.products, self.std, self.mean).to(self.dtype)

    def factors(self, beta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """β (k,) -> [(A (rank, in), B (out, rank)) per layout module], views of one weight vector."""
        return self.split(self.weights(beta))

    def split(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A flat weight vector (d,) -> [(A, B) per layout module], views of it."""
        pieces = torch.split(w, self._sizes)
        out: list[list[torch.Tensor | None]] = [[None, None] for _ in self.layout.modules]
        for piece, (index, which, shape) in zip(pieces, self._targets):
            out[index][0 if which == "A" else 1] = piece.view(shape)
        return [(a, b) for a, b in out]


class FusedAdam:
    """Adam on β (PyTorch's Adam with L2 weight decay, same formula) that costs at most one pass over the basis per
    step on a CPU in full precision, where the step is bound by reading the basis.

    An unfused step reads the (k, d) basis twice: ∂L/∂β = basis @ (∂L/∂w · std) after the backward pass, and
    w = (β @ basis) · std + mean before the next forward pass. Adam is elementwise in β, so in full precision on a CPU
    both run block by block: for each block of PCs, its gradient, its Adam update and its contribution to the next
    w, while the block is still in cache. With a half-precision basis (half the bytes per pass, and
    PyTorch's fast CPU kernels only for whole contiguous products) and on GPUs (where many small kernels cost more
    than the two products) the step makes the two products (:class:`w2w.products.BasisProducts`). ``w`` is the
    leaf the denoiser differentiates; :meth:`step` consumes ``w.grad`` and replaces ``w``.
    """

    def __init__(self, fmap: FactorMap, beta0: torch.Tensor, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, block_bytes: int = 6 << 20):
        self.fmap = fmap
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.beta = beta0.detach().to(fmap.device, torch.float32).clone()
        self.exp_avg = torch.zeros_like(self.beta)
        self.exp_avg_sq = torch.zeros_like(self.beta)
        self.t = 0
        products = fmap.products
        k, d = products.shape
        self.fused = not products.low and fmap.device.type == "cpu"
        rows = max(1, block_bytes // max(1, d * products.rows.element_size()))
        self.blocks = [(i, min(k, i + rows)) for i in range(0, k, rows)] if self.fused else [(0, k)]
        with torch.no_grad():
            self.w = fmap.weights(self.beta).detach().requires_grad_(True)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.fmap.split(self.w)

    def _adam(self, grad: torch.Tensor, i: int, j: int, step_size: float, bc2_sqrt: float) -> torch.Tensor:
        b1, b2 = self.betas
        beta = self.beta[i:j]
        if self.weight_decay:
            grad = grad.add(beta, alpha=self.weight_decay)
        m, v = self.exp_avg[i:j], self.exp_avg_sq[i:j]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        beta.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(self.eps), value=-step_size)
        return beta

    @torch.no_grad()
    def step(self) -> None:
        if self.w.grad is None:
            raise RuntimeError("no gradient on the weights: call backward() on the loss first")
        fmap, products = self.fmap, self.fmap.products
        g = self.w.grad.to(fmap.std.dtype) * fmap.std
        b1, b2 = self.betas
        self.t += 1
        step_size = self.lr / (1 - b1 ** self.t)
        bc2_sqrt = (1 - b2 ** self.t) ** 0.5
        if self.fused:
            basis = products.rows
            g = g.to(basis.dtype)
            acc = torch.zeros_like(fmap.mean, dtype=basis.dtype)
            for i, j in self.blocks:
                block = basis[i:j]
                beta = self._adam((block @ g).float(), i, j, step_size, bc2_sqrt)
                acc.addmv_(block.T, beta.to(basis.dtype))
            u = acc.to(fmap.mean.dtype)
        else:
            self._adam(products.pullback(g).float(), 0, self.beta.shape[0], step_size, bc2_sqrt)
            u = products.project(self.beta)
        self.w = torch.addcmul(fmap.mean, u, fmap.std).to(fmap.dtype).requires_grad_(True)


class FactorBoard:
    """The factors of the current step, read by one weight wrapper per target module (for hosts that patch weights).

    ``board.wrappers[i](W)`` returns ``W + scale · B @ A`` for module ``i`` of the layout while factors are set,
    and ``W`` unchanged otherwise; a denoiser sets ``board.factors`` before each forward pass.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.factors: Factors | None = None
        self.wrappers = tuple(FactorWrapper(self, index) for index in range(len(layout.modules)))


class FactorWrapper:
    """Weight wrapper of one module: ``W -> W + scale · B @ A`` with the factors currently on its board."""

    def __init__(self, board: FactorBoard, index: int):
        self.board = board
        self.index = index

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.board.factors is None:
            return weight
        a, b = self.board.factors[self.index]
        return weight + (self.board.layout.scale * (b @ a)).to(weight.dtype)


class Denoiser(Protocol):
    """A frozen diffusion model whose target Linear weights are W + scale · B @ A for the given factors."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, factors: Factors) -> torch.Tensor:
        """x_t (N, C, h, w) DDPM-noised latents, t (N,) int64 timesteps in [0, 1000) -> predicted noise ε̂ (N, C, h, w)."""
        ...


class Parametrisation(Protocol):
    """What the optimiser moves instead of β, e.g. a VAE latent (:class:`w2w.vae.LatentParam`)."""

    pcs: int  # length of the β it gives

    def parameters(self) -> Iterable[torch.Tensor]: ...
    def coefficients(self) -> torch.Tensor: ...  # β (pcs,), differentiable in the parameters
    def prior_loss(self) -> torch.Tensor: ...  # added to the diffusion loss as it is (already weighted)
    def result(self) -> torch.Tensor: ...  # the β to keep, detached
    def describe(self) -> str: ...  # for the identity's history


@dataclass(frozen=True, eq=False)
class IdentityLoss:
    """An identity loss added to the diffusion loss at every step, as PuLID adds one: ``weight`` · (1 − cos) between
    ``embed`` of the clean latents the model predicts at that step (x̂0) and ``embed`` of the photos' own latents.

    ``embed``: latents (n, C, h, w) in the inversion's units -> unit face embeddings (n, E), differentiable in the
    latents, its own network frozen (e.g. decode with the VAE, then FaceNet). ``balance``: ``weight`` is relative —
    the weight used is ``weight`` × the ratio that makes the identity loss's gradient as large (RMS over the
    coefficients) as the diffusion loss's at the start, over ``balance_draws`` draws of their own (the rule the
    miniature world measured, docs/encoder.md); ``balance=False`` uses ``weight`` as it is."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0
    balance: bool = False
    balance_draws: int = 4

    def __post_init__(self) -> None:
        if not callable(self.embed):
            raise TypeError("IdentityLoss.embed must be callable (latents -> unit embeddings)")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"the identity loss weight must be a finite number >= 0, got {self.weight}")
        if self.balance_draws < 1:
            raise ValueError(f"balance_draws must be >= 1, got {self.balance_draws}")

    def targets(self, latents: torch.Tensor) -> torch.Tensor:
        """The photos' embeddings (N, E), without gradients."""
        with torch.no_grad():
            out = self.embed(latents).detach().float()
        if out.dim() != 2 or out.shape[0] != latents.shape[0] or not bool(torch.isfinite(out).all()):
            raise ValueError(f"the identity embedding must give one finite vector per image, got shape "
                             f"{tuple(out.shape)} for {latents.shape[0]} image(s)")
        if not torch.allclose(out.norm(dim=1), torch.ones(out.shape[0]), atol=1e-3):
            raise ValueError("the identity embedding must give unit vectors (normalise its output)")
        return out

    def per_item(self, x0_hat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """1 − cos(embed(x̂0), target) of each item (n,) (unit embeddings: the dot product)."""
        emb = self.embed(x0_hat).float()
        return 1.0 - (emb * targets.to(emb.device)).sum(1)

    def loss(self, x0_hat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of 1 − cos(embed(x̂0), target)."""
        return self.per_item(x0_hat, targets).mean()


def predict_clean(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any, factors: Factors,
                  alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂0) of the model at ``factors``. A denoiser with a ``predict`` method gives both (the micro UNet's v and
    ComfyUI's denoised output are well conditioned at every timestep); otherwise x̂0 = (x_t − sqrt(1−ᾱ)·ε̂)/sqrt(ᾱ)."""
    predict = getattr(denoiser, "predict", None)
    if callable(predict):
        return predict(x_t, t, cond, factors)
    eps = denoiser(x_t, t, cond, factors)
    a = alphas_cumprod.to(x_t.device)[t.to(x_t.device)].view(-1, *([1] * (x_t.dim() - 1))).to(eps.dtype)
    return eps, (x_t.to(eps.dtype) - (1 - a).sqrt() * eps) / a.sqrt()


def balanced_identity_weight(fmap: "FactorMap", denoiser: Denoiser, beta: torch.Tensor, latents: torch.Tensor,
                             cond: Any, alphas_cumprod: torch.Tensor, identity: IdentityLoss, targets: torch.Tensor,
                             seed: int, per_step: int) -> float:
    """``identity.weight`` × RMS(∇ diffusion loss) / RMS(∇ identity loss) at ``beta``, over ``identity.balance_draws``
    draws (timesteps, images, noise) from a generator of their own (the inversion's own draws stay unchanged)."""
    gen = torch.Generator(device="cpu").manual_seed((int(seed) + 0x1D1D) & 0xFFFF_FFFF_FFFF_FFFF)
    device, images = latents.device, latents.shape[0]
    diff_sq, id_sq = 0.0, 0.0
    for _ in range(identity.balance_draws):
        index = torch.arange(images) if per_step == images else torch.randperm(images, generator=gen)[:per_step]
        t = torch.randint(0, alphas_cumprod.shape[0], (per_step,), generator=gen)
        x0 = latents[index.to(device)]
        noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        b = beta.detach().clone().requires_grad_(True)
        eps, x0_hat = predict_clean(denoiser, ddpm_noise(x0, t.to(device), noise, alphas_cumprod), t.to(device), cond,
                                    fmap.factors(b), alphas_cumprod)
        id_term = identity.loss(x0_hat, targets[index.to(targets.device)])
        g_diff, = torch.autograd.grad(diffusion_loss(eps, noise), b, retain_graph=True)
        g_id = torch.autograd.grad(id_term, b, allow_unused=True)[0] if id_term.requires_grad else None
        diff_sq += float(g_diff.float().square().mean())
        id_sq += 0.0 if g_id is None else float(g_id.float().square().mean())
    if not (math.isfinite(diff_sq) and math.isfinite(id_sq)) or id_sq <= 0.0:
        raise ValueError("the identity loss has no gradient with respect to the coefficients at the start (does its "
                         "embedding depend on the image?): turn it off or check the face embedding")
    return identity.weight * math.sqrt(diff_sq / id_sq)


@dataclass(frozen=True, eq=False)
class InversionResult:
    identity: Identity
    losses: tuple[float, ...]  # the training loss of every step


def prepare_mask(mask: torch.Tensor | None, images: int, size: tuple[int, int]) -> torch.Tensor | None:
    """A mask (H, W), (1|N, H, W) or (1|N, 1, H, W), values in [0, 1], resized to the latent ``size`` -> (N, 1, h, w)."""
    if mask is None:
        return None
    m = mask.detach().float()
    if m.dim() == 2:
        m = m[None]
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 3:
        raise ValueError(f"mask must have shape (H, W), (N, H, W) or (N, 1, H, W); got {tuple(mask.shape)}")
    if m.shape[0] not in (1, images):
        raise ValueError(f"the mask batch has {m.shape[0]} masks for {images} images: give one mask for all images "
                         "or one per image")
    if not torch.isfinite(m).all():
        raise ValueError("mask contains NaN or Inf")
    m = F.interpolate(m[:, None], size=size, mode="area" if m.shape[-1] >= size[-1] else "bilinear")
    m = m.clamp(0.0, 1.0).expand(images, 1, *size).contiguous()
    if (m.flatten(1).sum(1) <= 0).any():
        raise ValueError("a mask is empty (all zero) at latent resolution: the loss would see no pixel; paint a "
                         "larger region or remove the mask")
    return m


CROP_DRAWS = 64  # random crop windows drawn at most per step to find one holding some of the mask


def masked_mean(err: torch.Tensor, mask: torch.Tensor | None = None, per_item: bool = False) -> torch.Tensor:
    """The mean of ``err`` (N, C, h, w) over its values; with a mask (N or 1, 1, h, w), its mask-weighted mean over
    pixels (each pixel's C values weighted by the mask there). ``per_item``: one value per item (N,), as a batch of
    separate losses needs; otherwise one value over the whole batch."""
    dims = tuple(range(1 if per_item else 0, err.dim()))
    if mask is None:
        return err.mean(dims)
    m = mask.to(err.device, err.dtype).expand(err.shape[0], 1, *err.shape[2:])
    return (err * m).sum(dims) / (m.sum(dims) * err.shape[1])


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in (at least) float32; with a mask (N, 1, h, w), the mask-weighted mean over pixels
    (:func:`masked_mean`)."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return masked_mean((pred.to(dtype) - target.to(dtype)).square(), mask)


def step_loss(fmap: FactorMap, denoiser: Denoiser, beta: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, cond: Any, alphas_cumprod: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion loss of the model at β for given latents, timesteps and noise (differentiable in β)."""
    x_t = ddpm_noise(x0, t, noise, alphas_cumprod)
    return diffusion_loss(denoiser(x_t, t, cond, fmap.factors(beta)), noise, mask)


def initial_coefficients(space: Space, pcs: int, init: Identity | None = None) -> torch.Tensor:
    """β0 (pcs,) float32: zeros (the mean model) or the given identity, zero-padded to ``pcs``."""
    beta = torch.zeros(pcs, dtype=torch.float32)
    if init is not None:
        init.check_space(space)
        if init.pcs > pcs:
            raise ValueError(f"the initial identity has {init.pcs:,} coefficients but inversion optimises {pcs:,}: "
                             f"raise pcs to {init.pcs:,} or start from the mean")
        beta[: init.pcs] = init.coefficients
    return beta


def invert(space: Space, denoiser: Denoiser, latents: torch.Tensor, cond: Any,
           settings: InvertSettings = InvertSettings(), *, mask: torch.Tensor | None = None,
           init: Identity | None = None, alphas_cumprod: torch.Tensor | None = None,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
           callback: Callable[[int, int, dict], None] | None = None, name: str = "inverted",
           param: Parametrisation | None = None, precision: str = "auto",
           latent_std: torch.Tensor | None = None, identity: IdentityLoss | None = None) -> InversionResult:
    """Optimise β so the model denoises ``latents`` (N, C, h, w: N photos of one person, already scaled for the UNet).

    ``cond`` is passed to the denoiser untouched (it must fit ``images_per_step`` images). ``callback(step, total,
    {"loss": ..., "coefficients": β, "window": (top, left) with a random crop})`` runs after every step and may raise to
    stop (β is the optimiser's own tensor, updated in place by the next step: copy it to keep it; absent with ``param``).
    The same seed gives the same coefficients.
    ``param`` optimises its own parameters instead of β (``settings.pcs`` and ``init`` are then its business) and
    adds its prior term to the loss. ``precision`` is the one of the products with the basis (:func:`basis_dtype_for`;
    "auto": mixed precision where the device supports it); β and Adam's state are float32 whatever it is.
    ``latent_std`` (the shape of ``latents``): the standard deviation of the VAE's posterior around ``latents`` (its
    mean); every step then uses a fresh sample ``latents + latent_std · ε`` (ε from the seeded generator), as the
    reference's ``latent_dist.sample()`` does, instead of the latents themselves.
    ``identity``: add that identity loss to the diffusion loss (:class:`IdentityLoss`; the callback's info then also
    has "identity_loss", and "loss" stays the diffusion loss, the curve comparable with and without it).
    """
    if latents.dim() != 4 or latents.shape[0] < 1:
        raise ValueError(f"latents must be a non-empty (N, C, h, w) batch, got shape {tuple(latents.shape)}")
    device = torch.device(device) if device is not None else latents.device
    abar = (sd15_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()).to(device)
    if abar.dim() != 1 or abar.shape[0] < 1 or not ((abar > 0) & (abar < 1)).all():
        raise ValueError("alphas_cumprod must be a 1-D schedule with values in (0, 1)")
    images = latents.shape[0]
    per_step = images if settings.images_per_step in (0, images) else min(settings.images_per_step, images)
    if param is not None and init is not None:
        raise ValueError("with a parametrisation, start it from the identity (e.g. encode it) instead of init=")
    pcs = settings.pcs if param is None else param.pcs
    fmap = FactorMap(space, pcs, device, dtype, basis_dtype_for(precision, device, dtype, pcs, space.dim))
    latents = latents.detach().to(device)
    if latent_std is not None:
        bad = latent_std.shape != latents.shape or not bool(torch.isfinite(latent_std).all())
        if bad or bool((latent_std < 0).any()):
            raise ValueError(f"latent_std must be finite, >= 0 and of the latents' shape {tuple(latents.shape)}, got "
                             f"{tuple(latent_std.shape)}")
        latent_std = latent_std.detach().to(device, latents.dtype)
    masks = prepare_mask(mask, images, tuple(latents.shape[-2:]))
    masks = None if masks is None else masks.to(device)
    height, width = latents.shape[-2:]
    if settings.crop > min(height, width):
        raise ValueError(f"crop={settings.crop} is larger than the latents ({height}x{width})")
    use_id = identity is not None and identity.weight > 0
    if use_id and param is not None:
        raise ValueError("the identity loss is for the PCA inversion (coefficients β); turn it off with a "
                         "parametrisation")
    beta0 = initial_coefficients(space, pcs, init) if param is None else None
    id_weight, id_targets = 0.0, None
    if use_id:
        id_targets = identity.targets(latents)
        id_weight = identity.weight if not identity.balance else balanced_identity_weight(
            fmap, denoiser, beta0.to(device), latents, cond, abar, identity, id_targets, settings.seed, per_step)
    if param is None:
        fused = FusedAdam(fmap, beta0, settings.lr, settings.weight_decay)
    else:
        optimizer = torch.optim.Adam(list(param.parameters()), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(int(settings.seed) & 0xFFFF_FFFF_FFFF_FFFF)
    losses: list[float] = []
    for step in range(settings.steps):
        index = torch.arange(images) if per_step == images else torch.randperm(images, generator=gen)[:per_step]
        t = torch.randint(0, abar.shape[0], (per_step,), generator=gen)
        x0, step_masks = latents[index.to(device)], None if masks is None else masks[index.to(device)]
        if latent_std is not None:  # a fresh sample of the VAE's posterior at every step
            x0 = x0 + latent_std[index.to(device)] * torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        info: dict = {}
        if settings.crop and (settings.crop < height or settings.crop < width):  # a new random crop every step
            for _ in range(CROP_DRAWS):  # with a mask: a window with some of it (else the loss would be 0/0)
                top = int(torch.randint(0, height - settings.crop + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - settings.crop + 1, (1,), generator=gen))
                window = (..., slice(top, top + settings.crop), slice(left, left + settings.crop))
                if step_masks is None or bool(step_masks[window].sum() > 0):
                    break
            else:
                raise ValueError(f"random crop: none of {CROP_DRAWS} random {settings.crop}x{settings.crop} windows "
                                 f"(latent pixels) at step {step + 1} holds any of the mask: paint a larger mask, "
                                 "or turn random_crop off")
            x0 = x0[window]
            step_masks = None if step_masks is None else step_masks[window]
            info["window"] = (top, left)
        noise = torch.randn((per_step, *x0.shape[1:]), generator=gen).to(device, latents.dtype)
        x_t = ddpm_noise(x0, t.to(device), noise, abar)
        factors = fused.factors() if param is None else fmap.factors(param.coefficients())
        if use_id:
            eps, x0_hat = predict_clean(denoiser, x_t, t.to(device), cond, factors, abar)
            loss = diffusion_loss(eps, noise, step_masks)
            # a random crop is compared with the same crop of the photo, otherwise with the whole photo's embedding
            targets = identity.targets(x0) if "window" in info else id_targets[index.to(id_targets.device)]
            id_loss = identity.loss(x0_hat, targets)
            info["identity_loss"] = float(id_loss.detach())
        else:
            loss = diffusion_loss(denoiser(x_t, t.to(device), cond, factors), noise, step_masks)
        if param is not None:
            loss = loss + param.prior_loss()
        value = float(loss.detach())  # the diffusion loss (+ the prior): the curve shown, with or without identity
        if use_id:
            loss = loss + id_weight * id_loss
        if not (math.isfinite(value) and (not use_id or math.isfinite(float(loss.detach())))):  # one sync without it
            raise FloatingPointError(f"the inversion loss became {value} at step {step + 1}: lower lr "
                                     f"(now {settings.lr:g}) or check the inputs")
        if not loss.requires_grad:
            raise RuntimeError("the denoiser's prediction does not depend on the LoRA factors it was given: "
                               "the model is not patched with them")
        if param is None:
            loss.backward()
            fused.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        losses.append(value)
        if callback is not None:
            extra = {} if param is not None else {"coefficients": fused.beta}
            callback(step + 1, settings.steps, {"loss": value, **info, **extra})
    history = f"invert images={images} pcs={pcs} steps={settings.steps} lr={settings.lr:g} " \
              f"wd={settings.weight_decay:g} seed={settings.seed}" + (" masked" if mask is not None else "") + \
              (f" crop={settings.crop}" if settings.crop else "") + \
              (" vae_sample" if latent_std is not None else "") + \
              (f" identity_loss={id_weight:.4g}" if use_id else "") + \
              ("" if param is None else f" {param.describe()}") + \
              ("" if fmap.basis_dtype in (torch.float32, torch.float64) else f" basis={str(fmap.basis_dtype)[6:]}")
    base = init.history if init is not None else ()
    final = fused.beta.clone() if param is None else param.result()
    return InversionResult(Identity(final.float().cpu(), space.fingerprint, name, base + (history,)), tuple(losses))

