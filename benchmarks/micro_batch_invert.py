"""Batched inversions in the miniature world against one at a time, side by side in one process.

    python benchmarks/micro_batch_invert.py                   # 40 held-out people, 50 steps each
    python benchmarks/micro_batch_invert.py --people 8 --steps 20 --threads 1

Runs the held-out people's single-photo inversions (every PC, lr 0.1) twice: one after another with the pack's
engine (w2w.invert.invert, as the tables did) and side by side with w2w.micro.batch_invert.invert_batch; prints both
times, their ratio and the largest difference of the coefficients (the two give the same result up to float
rounding). Rounds alternate so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.batch_invert import invert_batch  # noqa: E402
from w2w.micro.tables import EvalConfig, invert_person  # noqa: E402
from w2w.micro.world import DEFAULT_DIR, load_world  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--people", type=int, default=40, help="held-out people inverted (default 40)")
    p.add_argument("--steps", type=int, default=50, help="inversion steps (the tables use 400; the ratio is per step)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each way (default 2)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    world = load_world(args.artifacts)
    people = list(world.heldout_seeds)[: args.people]
    photos = torch.cat([world.photos_of(s, 1, 0) for s in people])
    seeds = list(range(len(people)))
    cfg = EvalConfig(invert_steps=args.steps)
    alone_t, batch_t = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        alone = torch.stack([invert_person(world, photos[i:i + 1], cfg, seed=s)[0].coefficients
                             for i, s in enumerate(seeds)])
        alone_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched = invert_batch(world, photos, seeds, steps=args.steps)[args.steps]
        batch_t.append(time.perf_counter() - t0)
    diff = float((alone - batched).abs().max())
    scale = float(alone.abs().max())
    one, many = min(alone_t), min(batch_t)
    print(f"{len(people)} people x {args.steps} steps, {torch.get_num_threads()} thread(s), {args.rounds} rounds")
    print(f"one at a time : min {one:.1f} s  max {max(alone_t):.1f} s  ({one / len(people) / args.steps * 1e3:.1f} ms "
          f"per person-step)")
    print(f"side by side  : min {many:.1f} s  max {max(batch_t):.1f} s  ({many / len(people) / args.steps * 1e3:.1f} "
          f"ms per person-step)")
    print(f"speed-up (one at a time / side by side, min over rounds): {one / many:.2f}x")
    print(f"largest coefficient difference: {diff:.2e} (largest coefficient {scale:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
