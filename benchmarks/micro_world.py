"""The paper's tables in the miniature w2w world (w2w/micro), from the shipped artifacts or rebuilt from scratch.

    python benchmarks/micro_world.py                         # tables from models/micro (minutes on 2 cores)
    python benchmarks/micro_world.py --rebuild --workdir W   # train everything again into W, write models/micro,
                                                             # then the tables (resumes if stopped; see README)
    python benchmarks/micro_world.py --markdown results.md   # also write the tables as Markdown

Every figure is measured on images the micro model generates, read by the micro judge network.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.tables import EvalConfig, run_tables, to_markdown  # noqa: E402
from w2w.micro.world import DEFAULT_DIR, WorldConfig, build_world, load_world  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--rebuild", action="store_true", help="train the whole world first (needs --workdir)")
    p.add_argument("--workdir", help="checkpoints of the rebuild (kept, so a stopped rebuild resumes)")
    p.add_argument("--markdown", help="write the tables as Markdown to this file")
    p.add_argument("--json", help="write the raw tables as JSON to this file")
    p.add_argument("--quick", action="store_true", help="fewer models, seeds and steps (a smoke run, not the README figures)")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    if args.rebuild:
        if not args.workdir:
            p.error("--rebuild needs --workdir (where the resumable checkpoints go)")
        world = build_world(args.workdir, args.artifacts, WorldConfig())
        print(f"rebuilt the world in {time.perf_counter() - t0:.0f} s: " + json.dumps(world.info))
    else:
        world = load_world(args.artifacts)
    config = EvalConfig()
    if args.quick:
        config = EvalConfig(samples=6, seeds=2, ddim_steps=10, edit_people=6, invert_steps=60, references=4,
                            curve_sizes=(30, 240), curve_people=2)
    tables = run_tables(world, config)
    text = to_markdown(tables)
    print(text)
    print(f"tables in {tables['seconds']:.0f} s; world: {world.weights.shape[0]} models, {world.space.pcs} PCs, "
          f"{world.layout.dim:,} weights per model; build stage seconds: {json.dumps(world.info)}")
    for path, data in ((args.markdown, text), (args.json, json.dumps(tables, indent=1, default=str))):
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
