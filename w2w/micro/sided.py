"""A probe for a third miniature world: people whose identity one photo cannot show whole.

In the shipped world one hard 32-px photo shows nearly all of a person, so single-photo DreamBooth learns them as
well as eight photos do, and the space's prior has nothing to fill in (docs/micro-world.md). In *sided* photos
(``faces`` style ``sided``) the head is always turned and shows the mark on its near cheek; the other cheek's mark is
its complement. No photo shows both marks, so a base model trained on single photos cannot learn the link between
them, a LoRA from one photo learns one mark only, and only models trained on photos from both sides (the space's
dataset, 8 photos each) carry it — the link a space of such models could hold and a free LoRA cannot.

The probe asks, before a whole world is built on it: with a base model and a judge of sided photos (the world's
recipes), does single-photo DreamBooth-LoRA fall below 8-photo DreamBooth-LoRA (the paper's over-fitting check), how
much of the person does the judge read from the marks, and (with a space of sided LoRAs) does the inversion fill in
the cheek it never saw? Its answer is in docs/micro-world.md.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from .batch_invert import invert_batch
from .faces import identity_params, render_batch, scene_words
from .judge import id_score, train_judge
from .tables import REFERENCE_VIEW, EvalConfig, Generator, _people
from .train import MODEL_SEEDS, train_base, train_loras, view_seeds
from .world import World, _lora_stage, lora_stage_stamp, make_space

__all__ = ["STYLE", "sided_world", "photo_side", "judge_sides_table", "sided_dreambooth_table"]

STYLE = "sided"


def sided_world(world: World, workdir: str, models: int = 0, workers: int = 1, log=print) -> World:
    """``world`` with its base model and judge replaced by ones trained on sided photos with the same recipes
    (resumable in ``workdir``). With ``models``, the first that many training identities get LoRAs of the world's
    recipe on their sided photos (resumable) and a space of the world's PCs is built on them; without, the space and
    the training weights are the shipped world's and must not be used. The held-out people's LoRAs are always the
    shipped world's (hard photos) and must not be used either: the probe trains its own."""
    base = replace(world.config.base, photos=STYLE)
    judge_config = replace(world.config.judge, photos=STYLE)
    unet, text = train_base(workdir, base, log)
    judge = train_judge(workdir, judge_config, log)
    space, weights, seeds = world.space, world.weights, world.model_seeds
    if models:
        seeds = tuple(MODEL_SEEDS + i for i in range(models))
        stamp = lora_stage_stamp("loras", world.config.lora, base, MODEL_SEEDS, models)
        weights, _ = _lora_stage(workdir, "loras", unet, text, list(seeds), world.config.lora, STYLE, stamp, log,
                                 workers)
        space = make_space(unet, weights, list(seeds), min(world.config.pcs, models - 1), world.config.sample_pcs)
    return World(unet, text, judge, space, weights, seeds, world.heldout_weights, world.heldout_seeds, {},
                 replace(world.config, base=base, judge=judge_config, models=models or world.config.models))


def photo_side(identity_seed: int, view: int) -> str:
    """Which cheek photo ``view`` of an identity shows: "left" or "right" (the head's turn, faces.scene_words)."""
    words = scene_words(view_seeds(identity_seed, 1, view)[0], STYLE)
    return "left" if "left" in words else "right"


def judge_sides_table(world: World, cfg: EvalConfig) -> list[dict]:
    """What the judge reads from the marks, on the held-out people's unseen photos: the mean cosine between photos
    of the same person showing the same cheek and the other cheek, of different people, and between a person's
    photos and photos of their face drawn with another held-out person's marks (same views)."""
    people = _people(world, cfg)
    views = list(range(REFERENCE_VIEW, REFERENCE_VIEW + cfg.references))
    size = world.unet.config.image
    params = [identity_params(s) for s in people]
    seeds = [view_seeds(s, 1, v)[0] for s in people for v in views]

    def embed(faces_of):
        x = render_batch([f for f in faces_of for _ in views], seeds, size, STYLE)
        emb, _ = world.judge.embed_images(torch.from_numpy(x))
        return emb.view(len(people), len(views), -1)

    own = embed(params)
    swapped = embed([replace(p, mark=params[(i + 1) % len(params)].mark) for i, p in enumerate(params)])
    sides = np.array([[photo_side(s, v) == "left" for v in views] for s in people])
    same, other, marks = [], [], []
    for i in range(len(people)):
        sim = own[i] @ own[i].T
        agree = torch.from_numpy(sides[i][:, None] == sides[i][None, :])
        off = ~torch.eye(len(views), dtype=torch.bool)
        if (agree & off).any():
            same.append(float(sim[agree & off].mean()))
        if (~agree).any():
            other.append(float(sim[~agree].mean()))
        marks.append(id_score(swapped[i], own[i]))
    flat = own.flatten(0, 1)
    owner = torch.arange(len(people)).repeat_interleave(len(views))
    between = float((flat @ flat.T)[owner[:, None] != owner[None, :]].mean())
    return [{"pair": "same person, same cheek shown", "mean cosine": float(np.mean(same)), "people": len(same)},
            {"pair": "same person, other cheek shown", "mean cosine": float(np.mean(other)), "people": len(other)},
            {"pair": "the person's face with another person's marks", "mean cosine": float(np.mean(marks)),
             "people": len(marks)},
            {"pair": "different people", "mean cosine": between, "people": len(people)}]


def _split_scores(emb: torch.Tensor, refs: torch.Tensor, on_input_side: np.ndarray) -> tuple[float, float, float]:
    """ID score against all references, those showing the input photo's cheek, those showing the other."""
    every, same, other = [], [], []
    for e, r, m in zip(emb, refs, on_input_side):
        every.append(id_score(e, r))
        if m.any():
            same.append(id_score(e, r[torch.from_numpy(m)]))
        if (~m).any():
            other.append(id_score(e, r[torch.from_numpy(~m)]))
    return float(np.mean(every)), float(np.mean(same)), float(np.mean(other))


def sided_dreambooth_table(world: World, gen: Generator, cfg: EvalConfig, steps: tuple[int, ...] = (60, 400),
                           log=print, inversion: bool = False) -> tuple[list[dict], float]:
    """DreamBooth-LoRAs of the held-out people from their first photo (one cheek) and from their training photos
    (both cheeks, as drawn), with the world's recipe run for each number of ``steps``, beside the base model; each
    model's images against unseen photos (the ID score), and against those showing the first photo's cheek and the
    other cheek. ``inversion`` (the world's space is one of sided LoRAs, :func:`sided_world` with ``models``): also
    the w2w inversion of the first photo (``cfg.invert_steps`` steps, as the tables') and the training-photo LoRAs of
    the world's recipe projected on the space (its reach). -> (rows, share of the people whose training photos show
    both cheeks)."""
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be a non-empty list of positive step counts, got {steps}")
    people = _people(world, cfg)
    views = list(range(REFERENCE_VIEW, REFERENCE_VIEW + cfg.references))
    refs, _ = gen.read(gen.photos(people, cfg.references, REFERENCE_VIEW))
    on_input_side = np.array([[photo_side(s, v) == photo_side(s, 0) for v in views] for s in people])
    lora = world.config.lora
    sides_seen = [len({photo_side(s, k) for k in range(lora.images)}) for s in people]
    rows = []
    emb, _ = gen.read(gen.images(None).expand(len(people), -1, -1, -1, -1))
    every, same, other = _split_scores(emb, refs, on_input_side)
    rows.append({"method": "base model, no LoRA", "steps": 0, "ID score": every, "ID, input's cheek": same,
                 "ID, other cheek": other, "seconds": 0.0})
    sets = (("1 photo", [world.photos_of(s, 1, 0) for s in people], 1),
            (f"{lora.images} photos", [world.photos_of(s, lora.images) for s in people], lora.images))

    def add(method: str, n: int, weights: torch.Tensor, seconds: float) -> None:
        emb, _ = gen.read_models(weights)
        every, same, other = _split_scores(emb, refs, on_input_side)
        rows.append({"method": method, "steps": n, "ID score": every, "ID, input's cheek": same,
                     "ID, other cheek": other, "seconds": seconds})
        log(f"  {method}, {n} steps: {every:.3f} (input's cheek {same:.3f}, other cheek {other:.3f})")

    if inversion:
        t0 = time.perf_counter()
        runs = invert_batch(world, torch.cat(sets[0][1]), [cfg.seed + i for i in range(len(people))],
                            steps=cfg.invert_steps, lr=cfg.invert_lr)
        add(f"w2w inversion, 1 photo ({world.space.pcs} PCs of {world.space.train_coefs.shape[0]:,} models)",
            cfg.invert_steps, world.space.weights(runs[cfg.invert_steps]), time.perf_counter() - t0)
    trained = {}
    for n in steps:
        for label, images, count in sets:
            t0 = time.perf_counter()
            trained[label, n] = train_loras(world.unet, world.text, images, replace(lora, images=count, steps=n),
                                            seed=17)
            add(f"DreamBooth LoRA, {label}", n, trained[label, n], time.perf_counter() - t0)
    if inversion:
        key = (sets[1][0], lora.steps)
        held = trained[key] if key in trained else train_loras(world.unet, world.text, sets[1][1], lora, seed=17)
        add(f"{lora.images}-photo LoRA projected on the space (its reach)", lora.steps,
            world.space.weights(world.space.project(held)), 0.0)
    return rows, float(np.mean([k == 2 for k in sides_seen]))
