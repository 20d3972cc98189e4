"""The reference's random crop per inversion step against one fixed crop, in the miniature world.

    python benchmarks/micro_random_crop.py [--people 16] [--steps 400]

The reference inversion takes a new random 512-px crop of the resized photo at every step; Invert Image to w2w does
so with `random_crop` (a `resolution` window of a framing 1/8 larger), one crop otherwise. The miniature world renders
its photos at its model's size, so each held-out person's first photo (32 px) is enlarged by 1/8 (36 px, bilinear)
and inverted (paper settings: all PCs, 400 Adam steps, lr 0.1) three ways, same seeds:
- the 32-px photo as rendered (the tables' inversion);
- the 36-px photo's centre 32-px crop (one fixed crop: the node's default);
- a new random 32-px window of the 36-px photo at every step (`InvertSettings.crop`, the node's `random_crop`).
Each inverted model's images (4 seeds, 25 DDIM steps) are read by the judge against 8 unseen photos: ID score, mean
± standard error over people.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from w2w.invert import InvertSettings, invert  # noqa: E402
from w2w.micro.judge import id_score  # noqa: E402
from w2w.micro.model import MicroDenoiser, alphas_cumprod  # noqa: E402
from w2w.micro.tables import REFERENCE_VIEW, EvalConfig, Generator  # noqa: E402
from w2w.micro.world import DEFAULT_DIR, load_world  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR)
    p.add_argument("--people", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    world = load_world(args.artifacts)
    gen = Generator(world, EvalConfig())
    people = list(world.heldout_seeds)[: args.people]
    refs, _ = gen.read(gen.photos(people, 8, REFERENCE_VIEW))
    size = world.unet.config.image
    big = size + size // 8
    lo = (big - size) // 2
    denoiser, ctx = MicroDenoiser(world.unet, world.layout.scale), world.context(world.config.lora.prompt)
    ways = {"as rendered (32 px)": [], "enlarged 1/8, centre crop": [], "enlarged 1/8, random crop per step": []}
    for i, seed in enumerate(people):
        photo = world.photos_of(seed, 1, 0)
        enlarged = F.interpolate(photo, size=(big, big), mode="bilinear", align_corners=False)
        inputs = {"as rendered (32 px)": (photo, 0), "enlarged 1/8, centre crop": (enlarged[..., lo:lo + size, lo:lo + size], 0),
                  "enlarged 1/8, random crop per step": (enlarged, size)}
        for name, (image, crop) in inputs.items():
            settings = InvertSettings(pcs=world.space.pcs, steps=args.steps, lr=0.1, weight_decay=1e-10, seed=i,
                                      crop=crop)
            result = invert(world.space, denoiser, image, ctx, settings, alphas_cumprod=alphas_cumprod())
            ways[name].append(world.space.weights(result.identity.coefficients))
        print(f"[{time.perf_counter() - t0:.0f} s] person {i + 1}/{len(people)}", flush=True)
    print(f"\nID score of single-photo inversion, {len(people)} held-out people, {args.steps} steps "
          f"(mean ± s.e.; world: {world.space.train_coefs.shape[0]} models, {world.space.pcs} PCs)\n")
    print("| input | ID score |\n|---|---|")
    for name, ws in ways.items():
        emb, _ = gen.read_models(torch.stack(ws))
        scores = np.array([id_score(e, r) for e, r in zip(emb, refs)])
        print(f"| {name} | {scores.mean():.3f} ± {scores.std(ddof=1) / np.sqrt(len(scores)):.3f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
