"""The paper's tables in the miniature w2w world (w2w/micro), from the shipped artifacts or rebuilt from scratch.

    python benchmarks/micro_world.py                         # tables from models/micro (minutes on 2 cores)
    python benchmarks/micro_world.py --rebuild --workdir W   # train everything again into W, write models/micro,
                                                             # then the tables (resumes if stopped; see
                                                             # docs/micro-world.md)
    python benchmarks/micro_world.py --markdown results.md   # also write the tables as Markdown
    python benchmarks/micro_world.py --compare old.json      # and set every figure beside an earlier run's (--json)
    python benchmarks/micro_world.py --retrain-vaes --no-tables  # train the w2w++ VAEs of models/micro anew with
                                                             # the code's recipe (minutes), the rest untouched

Every figure is measured on images the micro model generates, read by the micro judge network, for held-out people.
The first table lists the paper's orderings and whether the world meets them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.tables import EvalConfig, compare_tables, run_tables, table_markdown, to_markdown, write_text  # noqa: E402
from w2w.micro.world import (DEFAULT_DIR, WorldConfig, build_world, first_world_config, load_world,  # noqa: E402
                             retrain_vaes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--rebuild", action="store_true", help="train the whole world first (needs --workdir)")
    p.add_argument("--workdir", help="checkpoints of the rebuild (kept, so a stopped rebuild resumes)")
    p.add_argument("--first-world", action="store_true",
                   help="with --rebuild: the first miniature world (240 LoRAs of plain photos) instead of the second")
    p.add_argument("--retrain-vaes", action="store_true",
                   help="train the artifacts' w2w++ VAEs anew with the code's recipe and write them back (every "
                        "other artifact is kept as it is)")
    p.add_argument("--no-tables", action="store_true",
                   help="with --rebuild or --retrain-vaes: stop after writing the artifacts")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--workers", type=int, default=1,
                   help="with --rebuild: processes (one thread each) that train the LoRAs; 2 suits a 2-core machine")
    p.add_argument("--markdown", help="write the tables as Markdown to this file")
    p.add_argument("--json", help="write the raw tables as JSON to this file")
    p.add_argument("--compare", help="an earlier run's --json file: print every shared figure beside this run's "
                                     "(e.g. the shipped world's tables against a rebuild's)")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="seed of the evaluation's draws (noise, samples, inversion; default 0, the published tables): "
                        "another value, e.g. 100000, redraws them for the same world — the evaluation's own noise")
    p.add_argument("--quick", action="store_true", help="fewer people, seeds and steps (a smoke run, not the figures)")
    args = p.parse_args()
    earlier = None
    if args.compare:  # read first: a wrong path should not cost a run of the tables
        try:
            with open(args.compare, encoding="utf-8") as f:
                earlier = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--compare {args.compare}: {e}")
        if not isinstance(earlier, dict) or "targets" not in earlier:
            p.error(f"--compare {args.compare}: not a tables file written by --json")
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    if args.rebuild:
        if not args.workdir:
            p.error("--rebuild needs --workdir (where the resumable checkpoints go)")
        world = build_world(args.workdir, args.artifacts, first_world_config() if args.first_world else WorldConfig(),
                            workers=args.workers)
        print(f"rebuilt the world in {time.perf_counter() - t0:.0f} s: " + json.dumps(world.info))
        if args.no_tables:
            return 0
    elif args.retrain_vaes:
        if args.first_world:
            p.error("--retrain-vaes uses the code's recipe of the second world; rebuild the first with --rebuild")
        world = retrain_vaes(args.artifacts)
        print(f"retrained the w2w++ VAEs in {time.perf_counter() - t0:.0f} s: " + json.dumps(world.info))
        if args.no_tables:
            return 0
    else:
        world = load_world(args.artifacts)
    if args.eval_seed < 0:
        p.error(f"--eval-seed must be >= 0, got {args.eval_seed}")
    config = EvalConfig(seed=args.eval_seed)
    if args.quick:
        config = EvalConfig(seed=args.eval_seed, samples=6, seeds=2, ddim_steps=10, people=6, edit_people=6,
                            edit_strengths=(0.5, 1.0), invert_steps=60, references=4, vae_people=4, curve_sizes=(300, 5000), curve_people=2)
    tables = run_tables(world, config)
    text = to_markdown(tables)
    if earlier is not None:
        text += "\n" + table_markdown(f"Against {os.path.basename(args.compare)} (before) — this run is after",
                                       compare_tables(earlier, tables)) + "\n"
    print(text)
    print(f"tables in {tables['seconds']:.0f} s; world: {world.space.train_coefs.shape[0]:,} models, "
          f"{world.space.pcs} PCs ({world.sample_pcs} for sampling and edits), {world.layout.dim:,} weights per "
          f"model; build stage seconds: {json.dumps(world.info)}")
    if args.markdown:
        write_text(args.markdown, text)
    if args.json:
        write_text(args.json, json.dumps(tables, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
