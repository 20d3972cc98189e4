"""Does single-photo DreamBooth-LoRA over-fit when trained longer? The miniature world's held-out people.

    python benchmarks/micro_dreambooth.py                     # the world's recipe at 60 and 400 steps (minutes)
    python benchmarks/micro_dreambooth.py --steps 60 400 1000 --markdown dreambooth.md

DreamBooth-LoRAs from each held-out person's first photo and from their 8 training photos, trained with the world's
LoRA recipe run for each number of steps (its learning-rate schedule stretched over them; 60 is the recipe of the
space's models and of the inversion table's DreamBooth rows, 400 the inversion's step count), next to the single-photo
w2w inversion of the same people. Every figure is the judge's ID score of the model's images against unseen photos,
as in `benchmarks/micro_world.py`'s inversion table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.tables import EvalConfig, Generator, recipe_table  # noqa: E402
from w2w.micro.world import DEFAULT_DIR, load_world  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--steps", type=int, nargs="+", default=[60, 400], help="DreamBooth training steps to compare")
    p.add_argument("--people", type=int, default=0, help="held-out people (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = load_world(args.artifacts)
    config = EvalConfig(people=args.people)
    t0 = time.perf_counter()
    rows = recipe_table(world, Generator(world, config), config, tuple(args.steps))
    people = len(world.heldout_seeds) if not args.people else min(args.people, len(world.heldout_seeds))
    lines = [f"**Single-photo DreamBooth-LoRA trained longer, {people} held-out people** (judge ID score against "
             "unseen photos)", "", "| method | steps | ID score | seconds (all people) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['steps']} | {r['ID score']:.3f} | {r['seconds']:.0f} |" for r in rows]
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
