"""The face encoder in the miniature w2w world (:mod:`w2w.micro`): training pairs, training, and the issue's targets.

Built only on the world's public API (:func:`w2w.micro.world.load_world`, :class:`~w2w.micro.world.World`, the micro
UNet's DDIM sampler and denoiser, the face renderer), so it runs unchanged on any world those artifacts hold.

Training pairs, two sources (the real-space command has the same two, :mod:`w2w.encoder_pairs`):

- *rendered*: identities sampled from the space (paper §3.2) rendered by the micro model with several noise seeds —
  the photo → coefficients pairs the space gives without any labelled data;
- *photos*: the user's own (photo, identity) pairs; in the miniature world, new photos of the people whose LoRAs
  the space was built from, paired with their coefficients (the space's training coefficients).

Optionally (``diffusion_weight`` > 0) a diffusion-loss term on photos of new random people, as HyperDreamBooth adds
to its weight-space loss: the identity the encoder predicts from one photo must denoise another photo of that person.

Identity seed ranges used here, disjoint from the world's (models 0.., held-out 500,000.., base pool 1,000,000..,
judge 2,000,000..): validation people 3,000,000.. (for choices; never the held-out people, never the judge), people
of the diffusion term 4,000,000.., sampled identities 50,000,000...
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .diffusion import ddpm_noise
from .encoder import (EncoderTrainConfig, FaceEncoder, PairSet, TrainResult, build_encoder, encode_photos,
                      retrieval_rows, train_encoder)
from .identity import Identity
from .invert import IdentityLoss, InvertSettings, invert
from .micro.batch_invert import invert_batch
from .micro.faces import identity_params, render_batch
from .micro.judge import id_score
from .micro.model import MicroDenoiser, alphas_cumprod, ddim_sample
from .micro.tables import REFERENCE_VIEW
from .sampling import sample_identity
from .stfile import tensors_fingerprint

__all__ = ["MicroEncoderConfig", "VALIDATION_SEEDS", "AUX_SEEDS", "SAMPLE_SEEDS", "PHOTO_VIEW", "rendered_pairs",
           "photo_pairs", "micro_pairs", "DiffusionTerm", "train_micro_encoder", "photos01", "weights_of",
           "choose_retrieval", "encoder_identity_scores", "refinement_sweep", "sweep_markdown", "encoder_embedder",
           "balanced_id_weight"]

VALIDATION_SEEDS = 3_000_000
AUX_SEEDS = 4_000_000
AUX_POOL = 100_000
SAMPLE_SEEDS = 50_000_000
PHOTO_VIEW = 200  # first view of the training people's photos used as pairs (their LoRAs saw views 0..7)


@dataclass(frozen=True)
class MicroEncoderConfig:
    """Everything that decides the micro encoder (stamped into its work folder)."""

    pcs: int = 0  # coefficients predicted; 0 = every PC of the space
    rendered: int = 1200  # sampled identities rendered for pairs
    renders_per_identity: int = 2  # noise seeds per sampled identity
    render_steps: int = 25  # DDIM steps of a rendered pair (the tables' images use 25)
    photo_views: int = 16  # photos per training person (0 = no photo pairs)
    width: int = 32
    hidden: int = 512
    diffusion_weight: float = 0.0  # weight of the diffusion term (0 = pairs only, the real-space recipe)
    diffusion_batch: int = 16
    head: str = "regress"  # or "retrieve": face recognition over the space's training people (w2w.encoder)
    embed: int = 128  # retrieve: embedding size
    train: EncoderTrainConfig = field(default_factory=lambda: EncoderTrainConfig(steps=3000, batch=64, holdout=0.1))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def retrieval(cls) -> "MicroEncoderConfig":
        """The retrieval encoder: face recognition over the space's training people from 16 new photos of each
        (no rendered pairs: sampled identities are not in the gallery)."""
        return cls(rendered=0, photo_views=16, hidden=256, head="retrieve", embed=128,
                   train=EncoderTrainConfig(steps=6000, batch=128, holdout=0.1, eval_every=500))


def photos01(images: torch.Tensor) -> torch.Tensor:
    """The micro world's pixels in [-1, 1] -> [0, 1] (what encoders and ComfyUI images use)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def _uint8(images01: torch.Tensor) -> torch.Tensor:
    return (images01 * 255.0).round().clamp(0, 255).to(torch.uint8)


def weights_of(space, beta: torch.Tensor) -> torch.Tensor:
    """β (..., k) -> weight vectors (..., d), differentiable in β (Space.weights detaches)."""
    k = beta.shape[-1]
    return (beta @ space.components[:k].float()) * space.std + space.mean


def _sampled(space, count: int) -> torch.Tensor:
    return torch.stack([sample_identity(space, SAMPLE_SEEDS + i, pcs=space.pcs).coefficients for i in range(count)])


def rendered_pairs(world, count: int, per_identity: int = 2, steps: int = 25, *, workdir: str | None = None,
                   chunk: int = 64, log=None) -> PairSet:
    """``count`` identities sampled from the space, each rendered with ``per_identity`` noise seeds (the world's LoRA
    prompt, DDIM ``steps``). With ``workdir`` the rendering resumes from ``rendered-pairs.pt`` there."""
    space = world.space
    betas = _sampled(space, count)
    total = count * per_identity
    owner = torch.arange(count).repeat_interleave(per_identity)
    noise_seeds = [int(SAMPLE_SEEDS + 7919 * int(o) + j) for o, j in zip(owner, torch.arange(total) % per_identity)]
    path = None if workdir is None else os.path.join(workdir, f"rendered-pairs-{count}x{per_identity}-{steps}.pt")
    done = torch.zeros(0, 3, world.unet.config.image, world.unet.config.image, dtype=torch.uint8)
    if path is not None and os.path.isfile(path):
        done = torch.load(path, weights_only=True)["images"]
        if log:
            log(f"rendered pairs: resuming after {done.shape[0]}/{total}")
    ctx = world.context(world.config.lora.prompt)
    t0 = time.perf_counter()
    while done.shape[0] < total:
        idx = torch.arange(done.shape[0], min(total, done.shape[0] + chunk))
        w = space.weights(betas[owner[idx]])
        images = ddim_sample(world.unet, ctx, seeds=[noise_seeds[i] for i in idx], steps=steps,
                             factors=world.layout.factors(w), scale=world.layout.scale)
        done = torch.cat([done, _uint8(photos01(images))])
        if path is not None:
            _save(path, {"images": done})
        if log:
            log(f"rendered pairs: {done.shape[0]}/{total} ({time.perf_counter() - t0:.0f} s)")
    return PairSet(done, betas[owner], owner, f"{count} sampled identities x {per_identity} renders")


def photo_pairs(world, views: int, start: int = PHOTO_VIEW) -> PairSet:
    """New photos of the space's training people with their coefficients (the user's own pairs, in this world)."""
    space = world.space
    if space.train_coefs is None or space.train_coefs.shape[0] != len(world.model_seeds):
        raise ValueError("the world's space lacks the training coefficients of its models")
    images = torch.cat([world.photos_of(s, views, start) for s in world.model_seeds])
    groups = torch.arange(len(world.model_seeds)).repeat_interleave(views)
    return PairSet(_uint8(photos01(images)), space.train_coefs[groups], groups,
                   f"{len(world.model_seeds)} training people x {views} photos", rows=groups.clone())


def micro_pairs(world, config: MicroEncoderConfig, workdir: str | None = None, log=None) -> PairSet:
    sets = []
    if config.rendered:
        sets.append(rendered_pairs(world, config.rendered, config.renders_per_identity, config.render_steps,
                                   workdir=workdir, log=log))
    if config.photo_views:
        sets.append(photo_pairs(world, config.photo_views))
    if not sets:
        raise ValueError("no training pairs: set rendered and/or photo_views above 0")
    return sets[0] if len(sets) == 1 else PairSet.concat(sets)


class DiffusionTerm:
    """The diffusion loss of the predicted identities (HyperDreamBooth's reconstruction term): one photo of a new
    random person in, the model with the predicted β must denoise another photo of that person (ε-loss, as inversion)."""

    def __init__(self, world, batch: int = 16):
        self.world, self.batch = world, batch
        self.denoiser = MicroDenoiser(world.unet, world.layout.scale)
        self.abar = alphas_cumprod().float()
        self.ctx = world.context(world.config.lora.prompt)

    def __call__(self, encoder: FaceEncoder, step: int, gen: torch.Generator) -> torch.Tensor:
        n = self.batch
        people = (AUX_SEEDS + torch.randint(AUX_POOL, (n,), generator=gen)).tolist()
        views = torch.randint(0, 1_000_000, (n, 2), generator=gen).tolist()
        params = [identity_params(s) for s in people]
        size = self.world.unet.config.image
        photo = torch.from_numpy(render_batch(params, [v[0] for v in views], size))
        target = torch.from_numpy(render_batch(params, [v[1] + 1_000_000 for v in views], size))
        beta = encoder(photos01(photo))
        w = weights_of(self.world.space, beta)
        t = torch.randint(0, len(self.abar), (n,), generator=gen)
        noise = torch.randn(target.shape, generator=gen)
        a = self.abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * target + (1 - a).sqrt() * noise
        eps = self.denoiser(x_t, t, self.ctx, self.world.layout.factors(w))
        return (eps - noise).square().mean()


def train_micro_encoder(world, config: MicroEncoderConfig = MicroEncoderConfig(), workdir: str | None = None,
                        log=print, callback=None) -> TrainResult:
    """Pairs (resumable), then the encoder (resumable) for ``world``'s space."""
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
    pairs = micro_pairs(world, config, workdir, log)
    pcs = config.pcs or world.space.pcs
    rows = retrieval_rows(pairs, config.train.holdout, config.train.seed) if config.head == "retrieve" else None
    encoder = build_encoder(world.space, pcs, "conv", image_size=world.unet.config.image, width=config.width,
                            hidden=config.hidden, seed=config.train.seed, head=config.head, embed=config.embed,
                            gallery_rows=rows)
    aux = DiffusionTerm(world, config.diffusion_batch) if config.diffusion_weight > 0 else None
    train = config.train if aux is None else _with_aux(config.train, config.diffusion_weight)
    if log:
        log(f"encoder: {len(pairs)} pairs ({pairs.source}), {sum(p.numel() for p in encoder.parameters()):,} "
            f"parameters, P = {pcs}")
    return train_encoder(encoder, pairs, train, workdir=workdir, aux=aux, log=log, callback=callback)


def _with_aux(train: EncoderTrainConfig, weight: float) -> EncoderTrainConfig:
    from dataclasses import replace

    return replace(train, aux_weight=weight)


def _save(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- measuring: inversion from a start point, the judge's ID score, a judge-free score for choices -------------
def invert_from(world, photo: torch.Tensor, init: Identity | None, steps: int, lr: float = 0.1, seed: int = 0,
                record: tuple[int, ...] = (), identity: IdentityLoss | None = None) -> dict[int, torch.Tensor]:
    """Inversion of one photo (1, 3, H, W) in [-1, 1] over every PC, with the pack's engine, from ``init`` (None: the
    mean model), with ``identity`` added to its loss -> {step: β} for every step of ``record`` (0 = the start) and
    ``steps``."""
    space = world.space
    beta0 = torch.zeros(space.pcs) if init is None else torch.cat([init.coefficients,
                                                                   torch.zeros(space.pcs - init.pcs)])
    out = {0: beta0.clone()} if 0 in record else {}
    if steps == 0:
        return {**out, 0: beta0.clone()}

    def keep(step: int, total: int, info: dict) -> None:
        if step in record or step == total:
            out[step] = info["coefficients"].detach().clone()

    settings = InvertSettings(pcs=space.pcs, steps=steps, lr=lr, weight_decay=1e-10, seed=seed)
    invert(space, MicroDenoiser(world.unet, world.layout.scale), photo, world.context(world.config.lora.prompt),
           settings, init=init, alphas_cumprod=alphas_cumprod(), callback=keep, identity=identity)
    return out


def _eps_losses(world, x0: torch.Tensor, w: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Per-image ε-loss (N,) of the models with weights ``w`` (N, d) on photos ``x0`` (N or 1, 3, H, W), averaged over
    ``draws`` fixed (timestep, noise) pairs, the timesteps stratified over the schedule. Judge-free."""
    n = w.shape[0]
    denoiser = MicroDenoiser(world.unet, world.layout.scale)
    abar = alphas_cumprod().float()
    ctx = world.context(world.config.lora.prompt)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n)
    with torch.no_grad():
        for k in range(draws):
            t = torch.full((n,), int((k + 0.5) * len(abar) / draws))
            noise = torch.randn(x0.shape, generator=gen).expand(n, -1, -1, -1)
            a = abar[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            total += (denoiser(x_t, t, ctx, world.layout.factors(w)) - noise).square().flatten(1).mean(1)
    return total / draws


def nearest_training_identity(world, photo: torch.Tensor, draws: int = 4, seed: int = 0) -> Identity:
    """The training model whose (projected) identity best denoises the photo (1, 3, H, W) in [-1, 1]: the lowest
    ε-loss over ``draws`` fixed (timestep, noise) pairs, timesteps stratified over the schedule. Judge-free."""
    space = world.space
    losses = _eps_losses(world, photo, space.weights(space.train_coefs), draws, seed)
    row = int(losses.argmin())
    return Identity(space.train_coefs[row].clone(), space.fingerprint, f"nearest-{row}",
                    (f"nearest training identity row={row} (diffusion loss, {draws} draws)",))


def denoising_score(world, betas: torch.Tensor, people: list[int], views: int = 8, draws: int = 4,
                    seed: int = 0) -> torch.Tensor:
    """Judge-free quality of identities β (M, k), one per person: the ε-loss of the model at β on ``views`` unseen
    photos of that person (views from REFERENCE_VIEW), at fixed draws. (M,) — lower is better."""
    photos = torch.stack([world.photos_of(s, views, REFERENCE_VIEW) for s in people])  # (M, V, 3, H, W)
    w = world.space.weights(betas).repeat_interleave(views, 0)
    return _eps_losses(world, photos.flatten(0, 1), w, draws, seed).view(len(people), views).mean(1)


class Scorer:
    """The judge's ID score of identities: images of each model (DDIM, the world's prompt) against unseen photos of
    its person, mean cosine of judge embeddings (as :mod:`w2w.micro.tables`)."""

    def __init__(self, world, seeds: int = 4, ddim_steps: int = 25, references: int = 8):
        self.world, self.ddim_steps = world, ddim_steps
        self.seeds = [11 * k for k in range(seeds)]
        self.references = references
        self.ctx = world.context(world.config.lora.prompt)
        self._refs: dict[int, torch.Tensor] = {}

    def reference(self, person: int) -> torch.Tensor:
        if person not in self._refs:
            self._refs[person], _ = self.world.judge.embed_images(
                self.world.photos_of(person, self.references, REFERENCE_VIEW))
        return self._refs[person]

    def images(self, betas: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """β (M, k) -> images (M, S, 3, H, W) in [-1, 1]."""
        w = self.world.space.weights(betas)
        s = len(self.seeds)
        out = []
        per = max(1, batch // s)
        for start in range(0, w.shape[0], per):
            chunk = w[start:start + per].repeat_interleave(s, 0)
            imgs = ddim_sample(self.world.unet, self.ctx, seeds=self.seeds * (chunk.shape[0] // s),
                               steps=self.ddim_steps, factors=self.world.layout.factors(chunk),
                               scale=self.world.layout.scale)
            out.append(imgs.view(-1, s, *imgs.shape[1:]))
        return torch.cat(out)

    def scores(self, betas: torch.Tensor, people: list[int]) -> torch.Tensor:
        """(M,) ID score of each β against its person."""
        imgs = self.images(betas)
        emb, _ = self.world.judge.embed_images(imgs.flatten(0, 1))
        emb = emb.view(imgs.shape[0], imgs.shape[1], -1)
        return torch.tensor([id_score(e, self.reference(p)) for e, p in zip(emb, people)])


def encode_person(world, encoder: FaceEncoder, photo: torch.Tensor) -> Identity:
    """The encoder's identity for one photo (1, 3, H, W) in [-1, 1]."""
    return encode_photos(encoder, photos01(photo), world.space, "encoded")


def contact_sheet_rows(world, encoder: FaceEncoder, person: int, *, seeds: list[int], refine_steps: int = 25,
                       full_steps: int = 400, lr: float = 0.1,
                       identity_steps: int = 0) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """Rows for the micro contact sheet (:func:`w2w.micro.demo.contact_sheet`'s format: label, [(caption, image
    (3, H, W) in [-1, 1])]), each starting with the held-out person's photo (view 0): images of the encoder's
    identity, of that identity refined ``refine_steps`` steps, refined ``identity_steps`` steps with the identity
    loss (a retrieval encoder's embedding, balanced as the node balances it; 0 leaves that row out), and of a full
    inversion from the mean model (``full_steps``; 0 leaves that row out, e.g. when the sheet has its own inversion
    row)."""
    photo = world.photos_of(person, 1, 0)
    t0 = time.perf_counter()
    encoded = encode_person(world, encoder, photo)
    seconds = time.perf_counter() - t0
    betas = [encoded.coefficients, invert_from(world, photo, encoded, refine_steps, lr)[refine_steps]]
    labels = [f"encoder only ({seconds * 1000:.0f} ms)", f"encoder + {refine_steps} steps"]
    if identity_steps:
        identity = IdentityLoss(encoder_embedder(encoder), 1.0, balance=True)
        betas.append(invert_from(world, photo, encoded, identity_steps, lr, identity=identity)[identity_steps])
        labels.append(f"encoder + {identity_steps} steps, ID loss")
    if full_steps:
        betas.append(invert_from(world, photo, None, full_steps, lr)[full_steps])
        labels.append(f"full inversion, {full_steps} steps")
    scorer = Scorer(world, seeds=len(seeds))
    scorer.seeds = list(seeds)
    imgs = scorer.images(torch.stack(betas))
    return [(label, [("input", photo[0])] + [(f"seed {s}", im) for s, im in zip(seeds, row)])
            for label, row in zip(labels, imgs)]


# ---- the identity loss ------------------------------------------------------------------------------------------
def encoder_embedder(encoder: FaceEncoder):
    """The retrieval encoder's face embedding as a frozen, differentiable function: images (n, 3, H, W) in [-1, 1]
    -> unit embeddings (n, E). A copy of the encoder is frozen; ``encoder`` itself is untouched."""
    if encoder.config.head != "retrieve":
        raise ValueError("the identity loss needs a face embedding: use a retrieval encoder (head='retrieve')")
    import copy

    frozen = copy.deepcopy(encoder).eval().requires_grad_(False)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return frozen.embedding(frozen.features(photos01(images)))

    return embed


def balanced_id_weight(world, encoder: FaceEncoder, people: int = 24, first: int = 0, draws: int = 8,
                       seed: int = 999) -> float:
    """The identity loss's weight by a judge-free rule fixed before any held-out reading: the one that gives its
    gradient the diffusion loss's size (RMS over the coefficients) at the encoder's answer, over ``draws`` random
    (timestep, noise) draws on one photo of each of ``people`` validation people (seeds VALIDATION_SEEDS + first..)."""
    space = world.space
    val = [VALIDATION_SEEDS + first + i for i in range(people)]
    photos = torch.cat([world.photos_of(s, 1, 0) for s in val])
    start = torch.stack([encode_person(world, encoder, ph[None]).coefficients for ph in photos])
    term = IdentityLoss(encoder_embedder(encoder))
    denoiser = MicroDenoiser(world.unet, world.layout.scale)
    abar = alphas_cumprod().double()
    ctx = world.context(world.config.lora.prompt)
    basis, std, mean = space.components[: start.shape[1]].float(), space.std.float(), space.mean.float()
    target = term.targets(photos)
    gen = torch.Generator().manual_seed(seed)
    diff_sq, id_sq = [], []
    for _ in range(draws):
        beta = start.clone().float().requires_grad_(True)
        t = torch.randint(0, abar.shape[0], (len(val),), generator=gen)
        noise = torch.randn(photos.shape, generator=gen)
        eps, x0_hat = denoiser.predict(ddpm_noise(photos, t, noise, abar), t, ctx,
                                       world.layout.factors(torch.addcmul(mean, beta @ basis, std)))
        g_diff, = torch.autograd.grad((eps - noise).square().flatten(1).mean(1).sum(), beta, retain_graph=True)
        g_id, = torch.autograd.grad(term.per_item(x0_hat, target).sum(), beta)
        diff_sq.append(g_diff.square().mean())
        id_sq.append(g_id.square().mean())
    return math.sqrt(float(torch.stack(diff_sq).mean()) / float(torch.stack(id_sq).mean()))


# ---- the targets ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetConfig:
    """How the targets are measured on the held-out people (the same protocol as the inversion table)."""

    full_steps: int = 400  # the reference inversion's steps (paper)
    lr: float = 0.1  # the reference inversion's lr, for every curve
    record: tuple[int, ...] = (0, 5, 10, 25, 50, 100, 200, 400)  # steps at which the curves are read
    people: int = 0  # held-out people used (0 = all)
    seeds: int = 4  # images per identity for the ID score
    ddim_steps: int = 25
    references: int = 8  # unseen photos per person
    nearest_draws: int = 4
    timing_repeats: int = 20
    nearest: bool = True  # also the curve from the nearest training identity (its search: 20,000 diffusion-loss
    # evaluations per person with 5,000 models, minutes on a CPU)
    identity: bool = True  # a retrieval encoder: also the curves with the identity loss (the encoder's embedding of
    # x̂0; its weight by balanced_id_weight), from the encoder's answer and from the mean model, and as the node does
    # it (the engine, the weight balanced on each photo)


def encoder_seconds(world, encoder: FaceEncoder, repeats: int = 20) -> float:
    """Median wall time of one single-photo encode (photo to identity) on this CPU."""
    photo = world.photos_of(world.heldout_seeds[0], 1, 0)
    encode_person(world, encoder, photo)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode_person(world, encoder, photo)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_targets(world, encoder: FaceEncoder, config: TargetConfig = TargetConfig(), *,
                    workdir: str | None = None, log=print) -> dict:
    """Held-out people, one photo each (view 0): the ID score along inversion from the mean model, from the nearest
    training identity and from the encoder's identity; the encoder alone; its time. Per-person inversions are cached
    in ``workdir`` (keyed by the encoder's weights and the settings), so a stopped run resumes."""
    people = list(world.heldout_seeds)[: config.people or None]
    steps = max(config.full_steps, *config.record)
    record = tuple(sorted(set(config.record) | {0, config.full_steps}))
    # three caches: the runs from the mean model and the nearest training identity depend only on the settings and
    # the space; the encoder's on its exact values (not float sums, which depend on the thread count) and
    # configuration; the identity loss's also on its weight.
    # Which people are measured is not part of a key (each person's entry stands alone).
    settings = {k: v for k, v in asdict(config).items() if k not in ("people", "nearest", "identity")}
    starts = ("mean", "nearest") if config.nearest else ("mean",)
    use_id = config.identity and encoder.config.head == "retrieve"  # a regression encoder has no face embedding
    with_id = ("encoder+id", "mean+id", "encoder+id/node") if use_id else ()
    id_weight = balanced_id_weight(world, encoder) if use_id else 0.0
    base_key = _digest({"config": settings, "space": world.space.fingerprint})
    enc_key = _digest({"encoder": tensors_fingerprint(encoder.state_dict()), "encoder_config": encoder.config.to_json(),
                       "config": settings, "space": world.space.fingerprint})
    id_key = _digest({"encoder": enc_key, "id_weight": id_weight})
    paths = {name: None if workdir is None else os.path.join(workdir, f"targets-{name}-{key}.pt")
             for name, key in (("starts", base_key), ("encoder", enc_key), ("identity", id_key))}
    caches = {name: torch.load(path, weights_only=True) if path and os.path.isfile(path) else {}
              for name, path in paths.items()}
    t0 = time.perf_counter()
    seed_of = {p: i for i, p in enumerate(people)}  # a person's inversion seed: its place among the held-out people
    identity = IdentityLoss(encoder_embedder(encoder), id_weight) if use_id else None
    for name in starts + ("encoder",) + with_id:
        which = "encoder" if name == "encoder" else "identity" if name in with_id else "starts"
        todo = [p for p in people if (str(p) not in caches["encoder"] if which == "encoder"
                                      else name not in caches[which].get(str(p), {}))]
        if not todo:
            continue
        photos = torch.cat([world.photos_of(p, 1, 0) for p in todo])
        starts_of = {"nearest": lambda ph: nearest_training_identity(world, ph, config.nearest_draws),
                     "encoder": lambda ph: encode_person(world, encoder, ph)}
        start = name.split("+")[0]
        if name == "encoder+id/node":  # as the node does it: the engine, one person at a time, the weight balanced
            # on that person's photo at the start (IdentityLoss(balance=True), strength 1)
            balanced = IdentityLoss(identity.embed, 1.0, balance=True)
            per = [invert_from(world, ph[None], encode_person(world, encoder, ph[None]), steps, config.lr,
                               seed=seed_of[p], record=record, identity=balanced) for p, ph in zip(todo, photos)]
            runs = {s: torch.stack([r[s] for r in per]) for s in record}
        else:
            init = None if start == "mean" else torch.stack([starts_of[start](ph[None]).coefficients for ph in photos])
            # side by side in one batch, each person with its own seed and Adam state (= one at a time, see
            # invert_batch)
            runs = invert_batch(world, photos, [seed_of[p] for p in todo], steps=steps, lr=config.lr, init=init,
                                record=record, identity=identity if name in with_id else None)
        for j, person in enumerate(todo):
            run = torch.stack([runs[s][j] for s in record])
            if which == "encoder":
                caches["encoder"][str(person)] = run
            else:
                caches[which].setdefault(str(person), {})[name] = run
        if paths[which] is not None:
            _save(paths[which], caches[which])
        log(f"targets: {name}-init inversions of {len(todo)} held-out people ({time.perf_counter() - t0:.0f} s)")
    cache = {str(p): {**caches["starts"][str(p)], "encoder": caches["encoder"][str(p)],
                      **caches["identity"].get(str(p), {})} for p in people}
    scorer = Scorer(world, config.seeds, config.ddim_steps, config.references)
    curves = {}
    for name in starts + ("encoder",) + with_id:
        betas = torch.stack([cache[str(p)][name] for p in people])  # (people, record, k)
        scores = scorer.scores(betas.flatten(0, 1), [p for p in people for _ in record]).view(len(people), -1)
        curves[name] = scores
        log(f"targets: ID scores along the {name}-init curve ({time.perf_counter() - t0:.0f} s)")
    full = curves["mean"][:, record.index(config.full_steps)]
    return {"people": len(people), "record": record, "curves": {k: v.tolist() for k, v in curves.items()},
            "full_inversion": float(full.mean()), "encoder_only": float(curves["encoder"][:, 0].mean()),
            "encode_seconds": encoder_seconds(world, encoder, config.timing_repeats), "id_weight": id_weight,
            "step_seconds": step_seconds(world, identity, config.timing_repeats),
            "threads": torch.get_num_threads(), "config": asdict(config)}


def step_seconds(world, identity: IdentityLoss | None, steps: int = 20) -> dict[str, float]:
    """Wall time of one inversion step of one photo on this CPU, with the diffusion loss alone and (``identity``)
    with the identity loss added (its embedding's forward and backward): what a step of each curve costs."""
    photo = world.photos_of(world.heldout_seeds[0], 1, 0)
    out = {}
    for name, term in (("diffusion loss", None), ("with the identity loss", identity)):
        if name != "diffusion loss" and term is None:
            continue
        invert_batch(world, photo, [0], steps=2, identity=term)  # warm-up
        t0 = time.perf_counter()
        invert_batch(world, photo, [0], steps=steps, identity=term)
        out[name] = (time.perf_counter() - t0) / steps
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sem(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def targets_markdown(result: dict) -> str:
    """The targets and the curves as Markdown (means over people ± standard error of the mean)."""
    record = result["record"]
    curves = {k: np.asarray(v) for k, v in result["curves"].items()}
    full_steps = result["config"]["full_steps"]
    full = curves["mean"][:, record.index(full_steps)]
    enc0 = curves["encoder"][:, 0]
    def first_reaching(name: str):
        reach = [s for s in record if curves[name][:, record.index(s)].mean() >= full.mean()]
        return min(reach) if reach else None

    def steps_cell(first) -> str:
        saving = ('%.0fx fewer' % (full_steps / first) if first else 'the encoder alone reaches it' if first == 0
                  else '–')
        return f"{first if first is not None else f'not within {max(record)}'} ({saving})"

    def met(first) -> str:
        return 'yes' if first is not None and full_steps / max(first, 1) >= 8 else 'no'

    first = first_reaching("encoder")
    lines = [f"**Targets** ({result['people']} held-out people, one photo each; judge ID score, mean ± s.e.)", "",
             "| target | measured | goal | met |", "|---|---|---|---|",
             f"| encoder alone vs full inversion ({full_steps} steps) | {enc0.mean():.3f} ± {_sem(enc0):.3f} vs "
             f"{full.mean():.3f} ± {_sem(full):.3f} (ratio {enc0.mean() / full.mean():.2f}) | ≥ 0.8 | "
             f"{'yes' if enc0.mean() >= 0.8 * full.mean() else 'no'} |",
             f"| seconds per encode (CPU, {result['threads']} thread(s)) | {result['encode_seconds']:.4f} | < 1 | "
             f"{'yes' if result['encode_seconds'] < 1 else 'no'} |",
             f"| steps for encoder + refinement (diffusion loss) to reach the full inversion's score | "
             f"{steps_cell(first)} | ≥ 8x fewer | {met(first)} |"]
    if "encoder+id" in curves:
        first_id = first_reaching("encoder+id")
        lines.append(f"| steps for encoder + refinement with the identity loss (weight {result['id_weight']:.4g}) to "
                     f"reach it | {steps_cell(first_id)} | ≥ 8x fewer | {met(first_id)} |")
    if "encoder+id/node" in curves:
        first_node = first_reaching("encoder+id/node")
        lines.append(f"| the same, the weight balanced on each photo (the node's identity_loss 1) | "
                     f"{steps_cell(first_node)} | ≥ 8x fewer | {met(first_node)} |")
    if result.get("step_seconds"):
        lines += ["", "Seconds per inversion step, one photo (CPU, %d thread(s)): " % result["threads"]
                  + "; ".join(f"{k} {v:.4f}" for k, v in result["step_seconds"].items())]
    names = ("mean", "nearest", "encoder", "mean+id", "encoder+id", "encoder+id/node")
    heads = {"mean": "mean-model init", "nearest": "nearest training identity init", "encoder": "encoder init",
             "mean+id": "mean-model init, identity loss", "encoder+id": "encoder init, identity loss",
             "encoder+id/node": "encoder init, identity loss balanced per photo (the node's)"}
    shown = [k for k in names if k in curves or k in ("mean", "nearest", "encoder")]
    lines += ["", "**ID score vs refinement steps** (lr %g; mean ± s.e. over people)" % result["config"]["lr"], "",
              "| steps | " + " | ".join(heads[k] for k in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for i, s in enumerate(record):
        cells = [f"{curves[k][:, i].mean():.3f} ± {_sem(curves[k][:, i]):.3f}" if k in curves else "–"
                 for k in shown]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def choose_retrieval(world, encoder: FaceEncoder, people: int = 24, top_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
                     temperatures: tuple[float, ...] = (0.02, 0.05, 0.1), log=print) -> tuple[FaceEncoder, list[dict]]:
    """How many gallery identities a retrieval encoder blends, and how sharply (top_k, temperature), chosen judge-free
    on validation people (one photo each, view 0): the setting whose identities best denoise unseen photos of their
    person (:func:`denoising_score`). -> (the encoder with that setting, one row per setting: ``gain`` over the mean
    model, higher is better)."""
    val = [VALIDATION_SEEDS + i for i in range(people)]
    photos = photos01(torch.cat([world.photos_of(s, 1, 0) for s in val]))
    base = denoising_score(world, torch.zeros(people, 1), val)
    rows = []
    with torch.no_grad():
        for k in top_k:
            for temp in temperatures if k > 1 else temperatures[:1]:
                if k > encoder.config.gallery:
                    continue
                betas = encoder.with_retrieval(k, temp)(photos)
                gain = base - denoising_score(world, betas, val)
                rows.append({"top_k": k, "temperature": temp, "gain": float(gain.mean()),
                             "gain_sem": _sem(gain.tolist())})
                log(f"retrieval: top_k {k}, temperature {temp:g}: loss gain {rows[-1]['gain']:+.5f}")
    best = max(rows, key=lambda r: r["gain"])
    return encoder.with_retrieval(best["top_k"], best["temperature"]), rows


def encoder_identity_scores(world, encoder: FaceEncoder, betas: torch.Tensor, people: list[int], scorer: Scorer,
                            references: int = 8) -> torch.Tensor:
    """Judge-free ID score (M,) of identities β (M, k), one per person: the mean cosine between the retrieval
    encoder's own face embeddings of the model's images (the scorer's seeds) and of ``references`` unseen photos of
    the person (views from REFERENCE_VIEW) — the judge's protocol with the encoder's embedding instead of the judge."""
    if encoder.config.head != "retrieve":
        raise ValueError("the encoder's identity score needs a face embedding: use a retrieval encoder "
                         "(head='retrieve')")

    def embed(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encoder.embedding(encoder.features(photos01(images)))

    imgs = scorer.images(betas)
    emb = embed(imgs.flatten(0, 1)).view(imgs.shape[0], imgs.shape[1], -1)
    return torch.stack([(e @ embed(world.photos_of(p, references, REFERENCE_VIEW)).T).mean()
                        for e, p in zip(emb, people)])


def refinement_sweep(world, encoder: FaceEncoder, lrs: tuple[float, ...] = (0.03, 0.1, 0.3),
                     record: tuple[int, ...] = (0, 25, 50, 100, 200), *, people: int = 24, first: int = 0,
                     full_steps: int = 400, full_lr: float = 0.1, momentum: float = 0.0, log=print) -> dict:
    """How refining the encoder's identity goes on validation people (one photo each, view 0; people ``first`` ..
    ``first + people`` of the validation range), judge-free: at each refinement lr, the encoder identity score
    (:func:`encoder_identity_scores`) along the steps of ``record``, and the score of the full inversion from the
    mean model (``full_steps`` at ``full_lr``) on the same people. ``momentum`` > 0 refines with SGD of that momentum
    instead of Adam (the full inversion stays Adam's). -> {"people", "record", "full", "curves": {lr: [mean score per
    recorded step]}, "sem": {...}, "optimizer"}."""
    val = [VALIDATION_SEEDS + first + i for i in range(people)]
    photos = torch.cat([world.photos_of(s, 1, 0) for s in val])
    start = torch.stack([encode_person(world, encoder, ph[None]).coefficients for ph in photos])
    scorer = Scorer(world)
    seeds = list(range(people))
    full = invert_batch(world, photos, seeds, steps=full_steps, lr=full_lr)[full_steps]
    full_scores = encoder_identity_scores(world, encoder, full, val, scorer)
    out = {"people": people, "first": first, "record": list(record), "full": float(full_scores.mean()),
           "full_sem": _sem(full_scores.tolist()), "full_steps": full_steps, "full_lr": full_lr, "curves": {},
           "sem": {}, "optimizer": f"SGD, momentum {momentum:g}" if momentum > 0 else "Adam"}
    log(f"refinement sweep: full inversion ({full_steps} steps) {out['full']:.4f}")
    for lr in lrs:
        runs = invert_batch(world, photos, seeds, steps=max(record), lr=lr, init=start, record=record,
                            momentum=momentum)
        scores = [encoder_identity_scores(world, encoder, runs[s], val, scorer) for s in record]
        key = f"{lr:g}"
        out["curves"][key] = [float(x.mean()) for x in scores]
        out["sem"][key] = [_sem(x.tolist()) for x in scores]
        log(f"refinement sweep ({out['optimizer']}): lr {key}: "
            + ", ".join(f"{s}: {v:.4f}" for s, v in zip(record, out["curves"][key])))
    return out


def sweep_markdown(sweep: dict) -> str:
    """The refinement sweep as Markdown: rows = steps, columns = lr, and the full inversion's score."""
    lrs = list(sweep["curves"])
    first, last = sweep["first"], sweep["first"] + sweep["people"] - 1
    lines = [f"**Refining the encoder's identity, validation people {first}–{last} (seeds {VALIDATION_SEEDS:,}…), "
             f"judge-free, {sweep.get('optimizer', 'Adam')}** (the encoder's own face embedding: mean cosine of the "
             "model's images with unseen photos; "
             f"mean ± s.e.). Full inversion from the mean model ({sweep['full_steps']} steps, lr "
             f"{sweep['full_lr']:g}): {sweep['full']:.4f} ± {sweep['full_sem']:.4f}", "",
             "| steps | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for i, s in enumerate(sweep["record"]):
        cells = [f"{sweep['curves'][lr][i]:.4f} ± {sweep['sem'][lr][i]:.4f}"
                 + (" ≥ full" if sweep["curves"][lr][i] >= sweep["full"] else "") for lr in lrs]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pcs_curve(world, encoder: FaceEncoder, people: int = 24, pcs: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 0), *,
              workdir: str | None = None, log=print) -> list[dict]:
    """How many of its coefficients the encoder's prediction is worth using (the choice of P), judge-free, on
    validation people: the prediction cut to its first P PCs (the rest at the mean), scored by
    :func:`denoising_score`; ``gain`` = the mean model's loss minus this one's (higher is better). P = 0 in ``pcs``
    stands for all the encoder predicts."""
    val = [VALIDATION_SEEDS + i for i in range(people)]
    betas = torch.stack([encode_person(world, encoder, world.photos_of(s, 1, 0)).coefficients for s in val])
    base = denoising_score(world, torch.zeros(people, 1), val)
    rows = []
    for p in sorted({min(p or encoder.pcs, encoder.pcs) for p in pcs}):
        cut = betas.clone()
        cut[:, p:] = 0.0
        gain = base - denoising_score(world, cut, val)
        rows.append({"pcs": p, "gain": float(gain.mean()), "gain_sem": _sem(gain.tolist())})
        log(f"P curve: P = {p}: loss gain {rows[-1]['gain']:+.5f}")
    return rows
