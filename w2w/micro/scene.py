"""Does a model of one person follow a prompt that asks for a pose its photos may not show? (paper §4.4: inverted
and DreamBooth models are judged on images made with *diverse prompts*.)

The first two worlds' text encoders know only attribute words, so their models can only be prompted with their
training prompt. :func:`scene_base_config` trains a base model whose captions also name what a hard photo shows besides
the person (:func:`~w2w.micro.faces.scene_words`: head turned left or right, smiling, a cap), so a model can be asked
for "photo sks person left". :class:`SceneReader` is a small CNN that reads those words back from an image — the
world's analogue of the CLIP score that tells whether an image follows its prompt. :func:`prompt_table` trains
DreamBooth-LoRAs of held-out people from one photo and from eight and scores each under the training prompt and
under scene prompts: identity (the judge) and prompt fidelity (the reader).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .faces import identity_params, render_batch, scene_words
from .model import SCENE_WORDS, VOCAB
from .train import BaseConfig, Log, atomic_save, photo_version, resume_stage, stage_stamp, train_loras

__all__ = ["READ_WORDS", "SCENE_PROMPTS", "ReaderConfig", "SceneReader", "train_scene_reader", "scene_base_config",
           "prompt_table"]

READ_WORDS = ("left", "right", "cap")  # what a 32-px image shows well enough to be read back (a smile is not)
SCENE_PROMPTS = tuple(f"photo sks person {w}" for w in SCENE_WORDS)
READER_SEEDS = 9_000_000  # identities of the reader's photos: in no other stage


def scene_base_config(base: BaseConfig = BaseConfig()) -> BaseConfig:
    """``base`` (default: the second world's base model) with captions that name the scene."""
    return replace(base, scene_captions=True, model=replace(base.model, vocab=len(VOCAB)))


@dataclass(frozen=True)
class ReaderConfig:
    photos: int = 30_000
    epochs: int = 8
    batch: int = 128
    lr: float = 2e-3
    noise: float = 0.05  # pixel noise added in training (generated images are a little noisy)
    seed: int = 0
    style: str = "hard"


class SceneReader(nn.Module):
    """Images (N, 3, 32, 32) in [-1, 1] -> logits (N, len(READ_WORDS))."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                                 nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(256, 128), nn.GELU(), nn.Linear(128, len(READ_WORDS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def reads(self, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """(N, len(READ_WORDS)) bool: the words the reader sees in each image."""
        return torch.cat([self(x[i:i + batch].clamp(-1, 1)) > 0 for i in range(0, x.shape[0], batch)])


def _reader_data(n: int, seed: int, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    r = np.random.default_rng([seed, 0x5CE])
    ids = r.integers(0, 1_000_000, n) + READER_SEEDS
    views = [int(v) for v in r.integers(0, 2**31, n)]
    x = torch.from_numpy(render_batch([identity_params(int(i)) for i in ids], views, 32, style))
    y = torch.tensor([[w in scene_words(v, style) for w in READ_WORDS] for v in views], dtype=torch.float32)
    return x, y


def train_scene_reader(workdir: str, config: ReaderConfig = ReaderConfig(),
                       log: Log = print) -> tuple[SceneReader, dict]:
    """Train the reader (or load it from ``workdir`` when done before with the same settings); returns it and its
    accuracy per word on 2,000 photos of other people."""
    path = os.path.join(workdir, "scene-reader.ckpt")
    stamp = stage_stamp("scene-reader", config, photo_version(config.style))
    reader = SceneReader()
    state = resume_stage(path, stamp)
    xv, yv = _reader_data(2000, config.seed + 1, config.style)
    if state is None:
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        x, y = _reader_data(config.photos, config.seed, config.style)
        opt = torch.optim.AdamW(reader.parameters(), config.lr)
        gen = torch.Generator().manual_seed(config.seed)
        for epoch in range(config.epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), config.batch):
                b = order[i:i + config.batch]
                xb = x[b] + config.noise * torch.randn(x[b].shape, generator=gen)
                loss = F.binary_cross_entropy_with_logits(reader(xb), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            log(f"scene reader: epoch {epoch + 1}/{config.epochs} ({time.perf_counter() - t0:.0f} s)")
        os.makedirs(workdir, exist_ok=True)
        atomic_save({"reader": reader.state_dict(), "stamp": stamp, "seconds": time.perf_counter() - t0}, path)
    else:
        reader.load_state_dict(state["reader"])
    reader.eval()
    accuracy = (reader.reads(xv) == (yv > 0.5)).float().mean(0)
    return reader, {w: float(a) for w, a in zip(READ_WORDS, accuracy)}


def _fidelity(reader: SceneReader, images: dict[str, torch.Tensor]) -> float:
    """Share of the images made with "photo sks person <w>" in which the reader sees <w>, over READ_WORDS."""
    hits = [reader.reads(images[f"photo sks person {w}"].flatten(0, 1))[:, READ_WORDS.index(w)].float().mean()
            for w in READ_WORDS]
    return float(torch.stack(hits).mean())


def prompt_table(world, gen, cfg, reader: SceneReader, steps: tuple[int, ...] = (60, 400), inversion: bool = False,
                 log: Log = print) -> list[dict]:
    """DreamBooth-LoRAs of held-out people from their first photo and from their training photos, with the world's
    recipe run for each number of ``steps`` (and, with ``inversion``, the w2w inversion of the first photo in the
    world's space, as the inversion table runs it); each model's images under the training prompt and under the
    scene prompts, scored for identity (the judge, against unseen photos, as the inversion table) and for prompt
    fidelity (the share of images showing the asked head turn or cap). ``world`` must know the scene words."""
    from .batch_invert import invert_batch
    from .tables import _pairwise, dreambooth_sets

    if world.text.embed.num_embeddings < len(VOCAB):
        raise ValueError("prompt_table needs a world whose text encoder knows the scene words "
                         "(a base model trained with scene_base_config)")
    people, refs, sets = dreambooth_sets(world, gen, cfg, steps)
    one = sets[0][1]
    lora = world.config.lora
    models: dict[str, torch.Tensor | None] = {"base model, no LoRA": None}
    if inversion:
        runs = invert_batch(world, torch.cat(one), [cfg.seed + i for i in range(len(people))],
                            steps=cfg.invert_steps, lr=cfg.invert_lr)
        models[f"w2w inversion, 1 photo ({world.space.train_coefs.shape[0]:,} models, {world.space.pcs} PCs)"] = \
            world.space.weights(runs[cfg.invert_steps])
    for n in steps:
        for label, images, count in sets:
            models[f"DreamBooth LoRA, {label}, {n} steps"] = train_loras(
                world.unet, world.text, images, replace(lora, images=count, steps=n), seed=17)
    rows = []
    for name, weights in models.items():
        images, ids = {}, {}
        for prompt in (lora.prompt, *SCENE_PROMPTS):
            imgs = gen.images(weights, prompt=prompt)
            if weights is None:
                imgs = imgs.expand(len(people), *imgs.shape[1:])
            images[prompt] = imgs
            emb, _ = gen.read(imgs)
            ids[prompt] = _pairwise(emb, refs)
        rows.append({"model": name, "ID score, training prompt": ids[lora.prompt],
                     "ID score, scene prompts": float(np.mean([ids[p] for p in SCENE_PROMPTS])),
                     "asked turn or cap shown": _fidelity(reader, images),
                     "shown unasked (training prompt)": float(
                         reader.reads(images[lora.prompt].flatten(0, 1)).float().mean())})
        log(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k != "model"))
    return rows
