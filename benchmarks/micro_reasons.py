"""Two measurements behind the miniature world's missed targets (docs/micro-world.md), beside its tables.

    python benchmarks/micro_reasons.py dreambooth            # DreamBooth-LoRA at 60 and 400 steps (≈ 14 min, 2 cores)
    python benchmarks/micro_reasons.py dreambooth --steps 60 400 1000 --people 16
    python benchmarks/micro_reasons.py vae                   # the w2w++ VAE's recipe varied, latent 16 (≈ 3 min)
    python benchmarks/micro_reasons.py vae --latent 32 --markdown vae-recipes.md

``dreambooth`` (target 1: does single-photo DreamBooth-LoRA over-fit when trained longer?): LoRAs from each held-out
person's first photo and from their 8 training photos, trained with the world's LoRA recipe run for each number of
steps (its learning-rate schedule stretched over them; 60 is the recipe of the space's models and of the tables'
DreamBooth rows, 400 the inversion's step count), next to the single-photo w2w inversion of the same people; the
judge's ID score of each model's images against unseen photos, as in the tables' inversion table.

``vae`` (target 5: why the VAE does not beat PCA's held-out weight error): VAEs of one latent size trained on the
world's training coefficients with the recipe of its shipped VAEs, varied in input scaling (each PC whitened, as
shipped, or one common scale, so the loss weighs the PCs as the weight error does) and in KL weight; each scored on
the held-out people's LoRAs as the tables' PCA vs VAE table scores them (1 = the mean model), after PCA at that size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.tables import (EvalConfig, Generator, recipe_table, table_markdown, vae_recipe_table,  # noqa: E402
                              write_text)
from w2w.micro.world import DEFAULT_DIR, load_world  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("dreambooth", "vae"), help="which measurement")
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--steps", type=int, nargs="+", default=[60, 400], help="dreambooth: training steps to compare")
    p.add_argument("--people", type=int, default=0, help="dreambooth: held-out people (0 = all)")
    p.add_argument("--latent", type=int, default=16, help="vae: latent size (and PCA components)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = load_world(args.artifacts)
    t0 = time.perf_counter()
    if args.what == "dreambooth":
        config = EvalConfig(people=args.people)
        rows = recipe_table(world, Generator(world, config), config, tuple(args.steps))
        people = len(world.heldout_seeds) if not args.people else min(args.people, len(world.heldout_seeds))
        title = (f"Single-photo DreamBooth-LoRA trained longer, {people} held-out people (judge ID score against "
                 "unseen photos; seconds for all people)")
    else:
        if not 1 <= args.latent <= world.space.pcs:
            p.error(f"--latent must be 1..{world.space.pcs} (the space's PCs)")
        config = EvalConfig()
        rows = vae_recipe_table(world, config, args.latent)
        title = (f"w2w++ VAE recipes vs PCA, latent {args.latent}, {config.vae_people} held-out people (held-out "
                 "weight error; 1 = the mean model)")
    text = table_markdown(title, rows) + "\n"
    print(text)
    print(f"in {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        write_text(args.markdown, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
