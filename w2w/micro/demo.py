"""``python -m w2w demo --micro``: a contact sheet of the miniature world made by the pack's own code, on a CPU.

Rows: sampled identities across seeds; edits of two sampled identities along the learned directions; a
single-photo inversion next to its input and an unseen photo of the same person.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..edit import apply_edit
from ..sampling import sample_identity
from .tables import REFERENCE_VIEW, EvalConfig, Generator, invert_person
from .train import identity_images
from .world import DEFAULT_DIR, load_world

__all__ = ["contact_sheet"]

ZOOM = 3
LABEL_W = 150


def _tile(img: torch.Tensor) -> Image.Image:
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr).resize((arr.shape[1] * ZOOM, arr.shape[0] * ZOOM), Image.NEAREST)


def _sheet(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], title: str) -> Image.Image:
    tile = 32 * ZOOM
    cols = max(len(r[1]) for r in rows)
    cap = 14
    height = 24 + len(rows) * (tile + cap + 6)
    sheet = Image.new("RGB", (LABEL_W + cols * (tile + 4), height), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    d.text((6, 6), title, fill=(0, 0, 0))
    y = 24
    for label, cells in rows:
        d.text((6, y + tile // 2 - 6), label, fill=(0, 0, 0))
        for i, (caption, img) in enumerate(cells):
            x = LABEL_W + i * (tile + 4)
            sheet.paste(_tile(img), (x, y))
            d.text((x, y + tile + 1), caption, fill=(60, 60, 60))
        y += tile + cap + 6
    return sheet


def contact_sheet(out_path: str, folder: str = DEFAULT_DIR, *, identities: int = 5, seeds: int = 5,
                  invert_steps: int = 300, person: int = 0, log=print) -> str:
    t0 = time.perf_counter()
    world = load_world(folder)
    config = EvalConfig(invert_steps=invert_steps)
    gen = Generator(world, config)
    space = world.space
    seed_list = [11 * k for k in range(seeds)]
    rows = []
    people = [sample_identity(space, 10_000 + i, pcs=space.pcs) for i in range(identities)]
    weights = torch.stack([space.weights(p.coefficients) for p in people])
    imgs = gen.images(weights, seed_list)
    for p, row in zip(people, imgs):
        rows.append((f"sampled {p.name}", [(f"seed {s}", im) for s, im in zip(seed_list, row)]))
    log(f"sampled {identities} identities x {seeds} seeds ({time.perf_counter() - t0:.0f} s)")
    edits = [a for a in ("Beard", "Eyeglasses", "Blond_Hair", "Chubby", "Male", "Young") if a in space.directions]
    for p in people[:2]:
        ws = [space.weights(p.coefficients)]
        labels = ["original"]
        for a in edits:
            sign = -1.0 if a in ("Young", "Male") else 1.0
            ws.append(space.weights(apply_edit(space, p, a, sign * config.edit_strength).coefficients))
            labels.append(f"{'-' if sign < 0 else '+'}{a[:9]}")
        out = gen.images(torch.stack(ws), [seed_list[0]])
        rows.append((f"edits of {p.name}", list(zip(labels, out[:, 0]))))
    log(f"edits ({time.perf_counter() - t0:.0f} s)")
    seed = world.heldout_seeds[person]
    photo = identity_images(seed, 1, 0, world.unet.config.image)
    ident, secs = invert_person(world, photo, config, seed=0)
    inv = gen.images(space.weights(ident.coefficients)[None], seed_list[:3])[0]
    unseen = identity_images(seed, 1, REFERENCE_VIEW, world.unet.config.image)[0]
    rows.append(("inversion (1 photo)", [("input", photo[0])] + [(f"w2w seed {s}", im) for s, im in
                                                                 zip(seed_list[:3], inv)] + [("unseen photo", unseen)]))
    log(f"inversion of held-out person {seed}: {invert_steps} steps in {secs:.0f} s")
    sheet = _sheet(rows, "w2w miniature world: samples, edits, inversion (pack code on the shipped micro artifacts)")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp.png"
    sheet.save(tmp)
    os.replace(tmp, out_path)
    log(f"contact sheet: {out_path} ({time.perf_counter() - t0:.0f} s in all)")
    return out_path
