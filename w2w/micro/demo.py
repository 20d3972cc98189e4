"""``python -m demo --micro``: a contact sheet of the miniature world made by the pack's own code, on a CPU.

Rows: sampled identities across seeds; edits of two sampled identities along the learned directions; a
single-photo inversion next to its input and an unseen photo of the same person; with the world's face encoder
(``micro-encoder.safetensors``, made for this world's space), that person's identity from the encoder alone and
after a few refinement steps.
"""
from __future__ import annotations

import os
import time

import torch
from PIL import Image, ImageDraw

from ..invert import PRESETS
from ..sampling import sample_identity
from .tables import REFERENCE_VIEW, SAMPLE_SEED, EvalConfig, Generator, edit_norms, edit_weights, invert_person
from .world import DEFAULT_DIR, load_world

__all__ = ["contact_sheet", "encoder_rows", "ENCODER_FILE"]

ENCODER_FILE = "micro-encoder.safetensors"  # the world's face encoder (benchmarks/micro_encoder.py --write-encoder)
REFINE_STEPS = PRESETS["fast"].steps  # the encoder row refined as the fast preset does
IDENTITY_STEPS = 10  # the encoder row refined with the identity loss (as the node's identity_loss 1): the fewest
# recorded steps after which it passed the 400-step inversion on the held-out people (docs/encoder.md)

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
                  invert_steps: int = 400, person: int = 0, edit_strength: float = 0.75, log=print) -> str:
    """Write the contact sheet PNG to ``out_path``: samples, edits (``edit_strength`` × the paper's edit norm) and a
    single-photo inversion of held-out person ``person``."""
    t0 = time.perf_counter()
    world = load_world(folder)
    config = EvalConfig(invert_steps=invert_steps, seeds=seeds)
    gen = Generator(world, config)
    space = world.space
    rows = []
    people = [sample_identity(space, SAMPLE_SEED + i, pcs=world.sample_pcs) for i in range(identities)]
    weights = torch.stack([space.weights(p.coefficients) for p in people])
    imgs = gen.images(weights)
    for p, row in zip(people, imgs):
        rows.append((f"sampled {p.name}", [(f"seed {s}", im) for s, im in zip(gen.seeds, row)]))
    log(f"sampled {identities} identities x {seeds} seeds ({time.perf_counter() - t0:.0f} s)")
    norms = edit_norms(space)
    edits = [a for a in ("Beard", "Eyeglasses", "Blond_Hair", "Chubby", "Male", "Young") if a in space.directions]
    for w in weights[:2]:
        ws, labels = [w], ["original"]
        for a in edits:
            sign = -1.0 if a in ("Young", "Male") else 1.0
            ws.append(edit_weights(space, w[None], a, sign * edit_strength * norms[a])[0])
            labels.append(f"{'-' if sign < 0 else '+'}{a[:9]}")
        out = gen.images(torch.stack(ws), gen.seeds[:1])
        rows.append(("edits (same seed)", list(zip(labels, out[:, 0]))))
    log(f"edits ({time.perf_counter() - t0:.0f} s)")
    seed = world.heldout_seeds[person]
    photo = world.photos_of(seed, 1, 0)
    ident, secs = invert_person(world, photo, config, seed=0)
    inv = gen.images(space.weights(ident.coefficients)[None], gen.seeds[:3])[0]
    unseen = world.photos_of(seed, 2, REFERENCE_VIEW)
    rows.append(("inversion (1 photo)", [("input", photo[0])] + [(f"w2w seed {s}", im) for s, im in
                                                                 zip(gen.seeds[:3], inv)] +
                 [("unseen photo", im) for im in unseen]))
    log(f"inversion of held-out person {seed}: {invert_steps} steps in {secs:.0f} s")
    rows += encoder_rows(world, folder, seed, list(gen.seeds[:3]), log)
    sheet = _sheet(rows, f"w2w miniature world: samples, edits, inversion ({space.train_coefs.shape[0]:,} models, "
                         f"pack code on the shipped artifacts)")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp.png"
    sheet.save(tmp)
    os.replace(tmp, out_path)
    log(f"contact sheet: {out_path} ({time.perf_counter() - t0:.0f} s in all)")
    return out_path


def encoder_rows(world, folder: str, person: int, seeds: list[int], log=print) -> list:
    """Rows of the world's face encoder for ``person`` (encoder alone, encoder + REFINE_STEPS steps, and for a
    retrieval encoder + IDENTITY_STEPS steps with the identity loss), or none when the folder has no encoder or its
    encoder was made for another space (a rebuilt world until it gets its own)."""
    path = os.path.join(folder, ENCODER_FILE)
    if not os.path.isfile(path):
        return []
    from ..encoder import EncoderMismatch, load_encoder
    from ..encoder_micro import contact_sheet_rows

    try:
        encoder = load_encoder(path, world.space)
    except EncoderMismatch as exc:
        log(f"contact sheet: {ENCODER_FILE} left out ({exc})")
        return []
    rows = contact_sheet_rows(world, encoder, person, seeds=seeds, refine_steps=REFINE_STEPS, full_steps=0,
                              identity_steps=IDENTITY_STEPS if encoder.config.head == "retrieve" else 0)
    log(f"encoder rows for held-out person {person}")
    return rows
