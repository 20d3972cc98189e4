"""Why the w2w++ VAE does not beat PCA's held-out weight error in the miniature world: its recipe, varied.

    python benchmarks/micro_vae_recipe.py                  # latent 16, four recipes (a few minutes on 2 cores)
    python benchmarks/micro_vae_recipe.py --latent 32 --markdown vae-recipes.md

VAEs of one latent size trained on the shipped world's 5,000 training coefficients with the world's recipe (the one
of its shipped VAEs: 200 epochs, KL weight 0.05 after warm-up), varied in input scaling — each PC whitened to unit
variance (shipped) or one common scale for all PCs, so that the loss weighs the PCs as the weight error does — and
in KL weight; each scored on the held-out people's LoRAs exactly as the PCA vs VAE table of
`benchmarks/micro_world.py` scores them (relative error in standardised weights; 1 = the mean model), after PCA with
as many components.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.tables import EvalConfig, vae_recipe_table  # noqa: E402
from w2w.micro.world import DEFAULT_DIR, load_world  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--latent", type=int, default=16, help="latent size (and PCA components)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = load_world(args.artifacts)
    if not 1 <= args.latent <= world.space.pcs:
        p.error(f"--latent must be 1..{world.space.pcs} (the space's PCs)")
    config = EvalConfig()
    t0 = time.perf_counter()
    rows = vae_recipe_table(world, config, args.latent)
    lines = [f"**w2w++ VAE recipes vs PCA, latent {args.latent}, {config.vae_people} held-out people** (held-out "
             "weight error; 1 = the mean model)", "", "| model | held-out weight error | seconds |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['held-out weight error']:.3f} | {r['seconds']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"in {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        tmp = args.markdown + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
