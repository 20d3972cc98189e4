"""Training stages of the miniature world: base model, per-identity rank-1 LoRAs, and the judge network.

Every stage checkpoints to its work folder (atomic ``torch.save`` of plain state dicts, read back with
``weights_only=True``) and resumes from there, so a stopped run continues where it was.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, is_dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..invert import masked_mean
from .faces import STYLE_VERSIONS, caption_words, identity_params, mask_batch, render_batch, scene_words
from .model import (BASE_VOCAB, TOKENS, VOCAB, MicroConfig, MicroUNet, TextEncoder, alphas_cumprod, ddim_sample,
                    micro_layout, tokenize, v_target)

__all__ = ["BaseConfig", "base_caption", "train_base", "LoraConfig", "train_loras", "initial_factors", "view_seeds",
           "identity_images", "atomic_save", "load_checkpoint", "Log", "class_images"]

Log = Callable[[str], None]

# Identity seed ranges of the world (disjoint): model dataset, held-out people, base-model pool, judge pool.
MODEL_SEEDS = 0
HELDOUT_SEEDS = 500_000
BASE_SEEDS = 1_000_000
JUDGE_SEEDS = 2_000_000


def view_seeds(identity_seed: int, count: int, start: int = 0) -> list[int]:
    """The photo seeds of an identity: ``count`` of them from ``start`` (the same identity always gets the same)."""
    return [int(identity_seed) * 1_000 + 7 + k for k in range(start, start + count)]


def identity_images(identity_seed: int, count: int, start: int = 0, size: int = 32, photos: str = "hard",
                    with_masks: bool = False):
    """``count`` photos (count, 3, size, size) of an identity, from its view index ``start`` on, in style ``photos``;
    ``with_masks``: (photos, their head masks (count, 1, size, size)), each photo drawn once for both."""
    p = identity_params(identity_seed)
    out = render_batch([p] * count, view_seeds(identity_seed, count, start), size, photos, with_masks=with_masks)
    return (torch.from_numpy(out[0]), torch.from_numpy(out[1])) if with_masks else torch.from_numpy(out)


def identity_masks(identity_seed: int, count: int, start: int = 0, size: int = 32,
                   photos: str = "hard") -> torch.Tensor:
    """The head masks (count, 1, size, size) of the photos :func:`identity_images` draws (faces.head_mask)."""
    p = identity_params(identity_seed)
    return torch.from_numpy(mask_batch([p] * count, view_seeds(identity_seed, count, start), size, photos))


def atomic_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str):
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None


# settings added after worlds were built, at the values that build those worlds: left out of a stamp at that value,
# so a work folder started before they existed still resumes
_LATER_DEFAULTS = {"scene_captions": False, "vocab": len(BASE_VOCAB), "prior_weight": 0.0,
                   "class_prompt": "photo person", "class_images": 100}


def _stamp_value(v):
    if is_dataclass(v):
        v = asdict(v)
    if isinstance(v, dict):
        return {k: _stamp_value(x) for k, x in v.items() if not (k in _LATER_DEFAULTS and x == _LATER_DEFAULTS[k])}
    return v


def stage_stamp(*parts) -> str:
    """What a stage's result depends on (its settings and the stamps of the stages it builds on), as one string."""
    return json.dumps([_stamp_value(p) for p in parts], sort_keys=True)


def photo_version(style: str) -> str:
    """The photo style and the version of its drawing code, for stage stamps."""
    return f"{style}-{STYLE_VERSIONS[style]}"


def resume_stage(path: str, stamp: str):
    """The checkpoint at ``path`` if it was made with ``stamp`` (None if there is none); another stamp is an error."""
    state = load_checkpoint(path)
    if state is not None and state.get("stamp") != stamp:
        raise ValueError(f"{path} holds a checkpoint made with another configuration: delete it (and the stages "
                         "after it) or use an empty work folder to train with these settings")
    return state


def _noised(x0: torch.Tensor, gen: torch.Generator, abar: torch.Tensor, groups: int = 1, t_min: int = 0):
    """x_t, t ~ U{t_min..T-1} and the v-prediction target; ``groups`` > 1: x0 is that many equal groups sharing one
    draw of t and noise (group g's item j gets the same t and noise as every other group's item j)."""
    k = x0.shape[0] // groups
    t = torch.randint(t_min, len(abar), (k,), generator=gen).repeat(groups)
    noise = torch.randn((k, *x0.shape[1:]), generator=gen).repeat(groups, *([1] * (x0.dim() - 1)))
    a = abar[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, v_target(x0, noise, abar[t].float())


# ---- base model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseConfig:
    steps: int = 4000
    batch: int = 32
    lr: float = 2e-3
    pool: int = 20_000  # random identities the base model sees
    drop_caption: float = 0.1  # empty caption (classifier-free guidance)
    ema: float = 0.995
    seed: int = 0
    model: MicroConfig = MicroConfig()
    checkpoint_every: int = 200
    photos: str = "hard"  # photo style of the training images (faces.STYLES)
    # captions also name the photo's head turn, smile and cap (faces.scene_words), so prompts can ask for them
    scene_captions: bool = False

    def __post_init__(self) -> None:
        if self.scene_captions and self.model.vocab < len(VOCAB):
            raise ValueError(f"scene captions need a text encoder that knows the scene words: MicroConfig(vocab="
                             f"{len(VOCAB)}), got vocab={self.model.vocab}")


def base_caption(p, view_seed: int, rng: np.random.Generator, config: BaseConfig) -> list[str]:
    """The training caption of one photo: its attributes' words (faces.caption_words) and, with scene captions, each
    of its scene words with probability 0.8; attribute words are dropped at random while it is too long."""
    words = caption_words(p, rng)
    if not config.scene_captions:
        return words
    scene = [w for w in scene_words(view_seed, config.photos) if rng.random() < 0.8]
    while len(words) + len(scene) > TOKENS:
        words.pop(2 + int(rng.integers(len(words) - 2)))  # never "photo" or the class word
    return words + scene


def train_base(workdir: str, config: BaseConfig = BaseConfig(), log: Log = print) -> tuple[MicroUNet, TextEncoder]:
    """Train (or resume) the text-conditioned base model on many random identities; returns the EMA weights."""
    path = os.path.join(workdir, "base.ckpt")
    stamp = stage_stamp("base", config, photo_version(config.photos))
    torch.manual_seed(config.seed)
    unet, text = MicroUNet(config.model), TextEncoder(config.model.context, config.model.vocab)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-4)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    step, spent = 0, 0.0
    state = resume_stage(path, stamp)
    if state is not None:
        spent = float(state["seconds"])
        unet.load_state_dict(state["unet"]), text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        log(f"base model: resuming at step {step}/{config.steps}")
    abar = alphas_cumprod()
    rng = np.random.default_rng([config.seed, step])
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    t0 = time.perf_counter()
    running = None
    while step < config.steps:
        ids = rng.integers(0, config.pool, config.batch) + BASE_SEEDS
        faces = [identity_params(int(i)) for i in ids]
        views = [int(v) for v in rng.integers(0, 2**31, config.batch)]
        x0 = torch.from_numpy(render_batch(faces, views, config.model.image, config.photos))
        words = [base_caption(p, v, rng, config) if rng.random() >= config.drop_caption else []
                 for p, v in zip(faces, views)]
        x_t, t, target = _noised(x0, gen, abar)
        lr = config.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * min(1.0, 2 * (1 - step / config.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.mse_loss(unet(x_t, t, text(tokenize(words))), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - config.ema)
        step += 1
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0:
            log(f"base model: step {step}/{config.steps} loss {running:.4f} ({time.perf_counter() - t0:.0f} s)")
        if step % config.checkpoint_every == 0 or step == config.steps:
            atomic_save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                         "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step, "stamp": stamp,
                         "seconds": spent + time.perf_counter() - t0}, path)
    ema_unet.eval(), ema_text.eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    return ema_unet, ema_text


# ---- per-identity LoRAs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraConfig:
    images: int = 8  # photos per identity
    steps: int = 150
    per_step: int = 4  # photos of each identity per step (cycled copies when it has fewer)
    lr: float = 1e-2
    parallel: int = 12  # identities trained side by side in one batch
    init_seed: int = 1234  # the same A initialisation for every identity (see train_loras)
    prompt: str = "photo sks person"
    shared_noise: bool = False  # every identity gets the same timesteps, noise and photo slots at each step
    final_lr: float = 1.0  # learning rate at the last step as a fraction of lr (linear decay; 1 = constant)
    t_min: int = 0  # timesteps drawn from t_min..999 (the nearly clean ones carry little of the identity)
    # DreamBooth's prior preservation (the paper's eq. 2): λ times the same loss on the base model's own images of the
    # class prompt, made with the LoRA applied (0 = off, the world's recipe)
    prior_weight: float = 0.0
    class_prompt: str = "photo person"
    class_images: int = 100  # how many the base model draws (DDIM, 25 steps), the diffusers script's default

    def __post_init__(self) -> None:
        if min(self.images, self.steps, self.per_step, self.parallel, self.class_images) < 1:
            raise ValueError(f"images, steps, per_step, parallel and class_images must be >= 1, got {self}")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if not (self.lr > 0 and 0 <= self.final_lr <= 1):
            raise ValueError(f"lr must be > 0 and final_lr in [0, 1], got {self.lr} and {self.final_lr}")
        if not 0 <= self.t_min < 1000:
            raise ValueError(f"t_min must be in 0..999, got {self.t_min}")


def initial_factors(layout, seed: int) -> torch.Tensor:
    """w0: A ~ Kaiming-uniform (fixed seed), B = 0 (PEFT's LoRA init), as one flat vector."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(layout.dim)
    for m in layout.modules:
        bound = 1.0 / m.in_features ** 0.5
        n = layout.rank * m.in_features
        w[m.a_offset:m.a_offset + n] = (torch.rand(n, generator=gen) * 2 - 1) * bound
    return w


def _slots(photos: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Which of ``photos`` photos fill the ``k`` places of one step: a random order, cycled if k > photos."""
    order = torch.randperm(photos, generator=gen)
    return order.repeat(-(-k // photos))[:k]


CLASS_IMAGE_SEEDS = 7_000_000  # noise seeds of the base model's class images (prior preservation)


def class_images(unet: MicroUNet, text: TextEncoder, config: LoraConfig) -> torch.Tensor:
    """The base model's own images of ``config.class_prompt`` (class_images, 3, H, W), the same for every call:
    DreamBooth's prior-preservation data (25 DDIM steps, no guidance, fixed noise seeds)."""
    with torch.no_grad():
        ctx = text(tokenize([config.class_prompt]))
        seeds = [CLASS_IMAGE_SEEDS + i for i in range(config.class_images)]
        return torch.cat([ddim_sample(unet, ctx, seeds=seeds[s:s + 50]) for s in range(0, len(seeds), 50)])


def train_loras(unet: MicroUNet, text: TextEncoder, images: list[torch.Tensor], config: LoraConfig = LoraConfig(),
                *, seed: int = 0, log: Log | None = None, init: torch.Tensor | None = None,
                prior: torch.Tensor | None = None, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """DreamBooth-style rank-1 LoRAs (to_q/to_v of attn1 and attn2), one per image set -> (len(images), dim).

    Every identity starts from the same A (fixed seed) and B = 0, so the flat factor vectors of different people
    live in one consistent chart — PCA over them is meaningful (a rank-1 LoRA is only defined up to the rescaling
    (A, B) -> (cA, B/c), which shared initialisation and equal training keep aligned). The identities of one call
    train side by side in one batch with per-item factors; each has its own parameters and its own Adam state, so
    the result equals training them one by one, up to the random draws. With ``config.shared_noise`` the draws are
    the same for every identity (timesteps, noise and which photo slot is used), so an identity's LoRA does not
    depend on the batch it trained in, and LoRAs differ only through their photos (common random numbers).

    With ``config.prior_weight`` λ > 0 each step also draws ``per_step`` of the class images (``prior``, or
    :func:`class_images` of the base model) for every identity and adds λ times the loss of its LoRA on them under
    the class prompt: DreamBooth with prior preservation (the paper's eq. 2), whose LoRA must keep the class as the
    base model draws it and so put the person into the identifier.

    ``masks`` (one (count, 1, H, W) tensor per image set, values in [0, 1]): each photo's loss is its mask-weighted
    mean over pixels, so only the prediction error on the masked part (the head) is learnt from — the masked loss
    of the pack's inversion (the UNet still sees the whole photo).
    The draws are the same as without masks; the class images of prior preservation are never masked.
    """
    layout = micro_layout(unet)
    n, k = len(images), config.per_step
    if masks is not None:
        if len(masks) != n or any(m.shape != (x.shape[0], 1, *x.shape[2:]) for m, x in zip(masks, images)):
            raise ValueError("masks must give one (count, 1, H, W) mask per photo of every image set")
        if any(not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1 for m in masks):
            raise ValueError("masks must hold finite values in [0, 1]")
        if any(float(m.flatten(1).sum(1).min()) <= 0 for m in masks):
            raise ValueError("a photo's mask is empty: its loss would see no pixel")
    if config.shared_noise and len({x.shape[0] for x in images}) > 1:
        raise ValueError("shared_noise needs the same number of photos for every identity")
    w = (initial_factors(layout, config.init_seed) if init is None else init).repeat(n, 1).contiguous()
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    abar = alphas_cumprod()
    with torch.no_grad():
        ctx = text(tokenize([config.prompt]))
    use_prior = config.prior_weight > 0
    if use_prior:
        prior = class_images(unet, text, config) if prior is None else prior
        if prior.dim() != 4 or prior.shape[1:] != images[0].shape[1:]:
            raise ValueError(f"class images must be (N, {', '.join(map(str, images[0].shape[1:]))}), got "
                             f"{tuple(prior.shape)}")
        with torch.no_grad():
            class_ctx = text(tokenize([config.class_prompt]))
        ctx = torch.cat([ctx.expand(n * k, -1, -1), class_ctx.expand(n * k, -1, -1)])
    parts = 2 if use_prior else 1
    owner = torch.arange(n).repeat_interleave(k).repeat(parts)
    for step in range(config.steps):
        m = None
        if config.shared_noise:
            pick = _slots(images[0].shape[0], k, gen)
            x_t, t, target = _noised(torch.cat([x[pick] for x in images]), gen, abar, groups=n, t_min=config.t_min)
            if masks is not None:
                m = torch.cat([x[pick] for x in masks])
        else:
            picks = [_slots(x.shape[0], k, gen) for x in images]
            x0 = torch.cat([x[pk] for x, pk in zip(images, picks)])
            x_t, t, target = _noised(x0, gen, abar, t_min=config.t_min)
            if masks is not None:
                m = torch.cat([x[pk] for x, pk in zip(masks, picks)])
        if use_prior:  # k class images per identity (with shared noise: the same ones and the same draws for all)
            if config.shared_noise:
                c_t, c_tt, c_target = _noised(prior[_slots(len(prior), k, gen)].repeat(n, 1, 1, 1), gen, abar,
                                              groups=n, t_min=config.t_min)
            else:
                c_t, c_tt, c_target = _noised(torch.cat([prior[_slots(len(prior), k, gen)] for _ in range(n)]), gen,
                                              abar, t_min=config.t_min)
            x_t, t, target = torch.cat([x_t, c_t]), torch.cat([t, c_tt]), torch.cat([target, c_target])
            if m is not None:  # the class images are never masked
                m = torch.cat([m, torch.ones_like(m)])
        for g in opt.param_groups:
            g["lr"] = config.lr * (1 - (1 - config.final_lr) * step / max(1, config.steps - 1))
        factors = [(a[owner], b[owner]) for a, b in layout.factors(w)]
        with unet.patched(factors, layout.scale):
            pred = unet(x_t, t, ctx.expand(x_t.shape[0], -1, -1))
        # sum of per-identity mean losses: identity i's gradient is that of its own loss
        per_item = masked_mean((pred - target).square(), m, per_item=True).view(parts, n, k).mean(2)
        loss = per_item[0] + config.prior_weight * per_item[1] if use_prior else per_item[0]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        if log is not None and (step + 1) % 50 == 0:
            log(f"  LoRA step {step + 1}/{config.steps}: mean loss {float(loss.mean()):.4f}")
    return w.detach()
