"""The face encoder in the miniature w2w world: train it (resumable), then measure the one-shot inversion targets.

    python benchmarks/micro_encoder.py --workdir W                  # train into W (resumes), measure, print the tables
    python benchmarks/micro_encoder.py --workdir W --write-encoder  # also write models/micro/micro-encoder.safetensors
    python benchmarks/micro_encoder.py --workdir W --encoder FILE   # measure an existing encoder (e.g. the shipped one)
    python benchmarks/micro_encoder.py --workdir W --quick          # a smoke run (not the documented figures)
    python benchmarks/micro_encoder.py --workdir W --head retrieve  # the retrieval encoder (face recognition over
                                                                    # the space's training people)
    python benchmarks/micro_encoder.py --workdir W --encoder FILE --refine-sweep  # also the judge-free refinement
                                                                    # sweep on validation people (choice of `fast`)

Targets (held-out people, one photo each, the judge's ID score read from generated images):
- the encoder alone reaches >= 0.8 x the ID score of a full (400-step) inversion from the mean model, in < 1 s;
- encoder + refinement reaches the full inversion's score in >= 8x fewer steps;
- the curves ID score vs refinement steps from the mean model, the nearest training identity and the encoder;
  for a retrieval encoder also refined with the identity loss (its own face embedding of each step's predicted
  image; weight by the judge-free rule of encoder_micro.balanced_id_weight), from the encoder and from the mean
  model, and as the node does it (the weight balanced on each photo). --no-identity leaves them out.

A retrieval encoder answers its top-1 training identity (the default of the configuration, fixed before any
measurement). The table of blends (top_k, temperature) scored by the diffusion loss on validation people is printed
for information: that loss prefers blends, as it prefers the mean model, so it does not choose them
(``--blend-by-loss`` uses its pick anyway). Choices (P) are made on validation people (identity seeds 3,000,000..)
with a judge-free score: the diffusion loss of the chosen identity on unseen photos of that person. The held-out
people and the judge are only ever measured. Everything resumes from the work folder; re-run the same command on a
new world's artifacts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.encoder import load_encoder, save_encoder  # noqa: E402
from w2w.encoder_micro import (MicroEncoderConfig, TargetConfig, choose_retrieval, measure_targets,  # noqa: E402
                               pcs_curve, refinement_sweep, sweep_markdown, targets_markdown, train_micro_encoder)
from w2w.micro.world import DEFAULT_DIR, load_world  # noqa: E402

ENCODER_NAME = "micro-encoder.safetensors"
BUDGET = 25 * 2**20  # models/micro must stay within 25 MB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--workdir", required=True, help="checkpoints and caches (kept: a stopped run resumes)")
    p.add_argument("--encoder", help="measure this encoder file instead of training one")
    p.add_argument("--write-encoder", action="store_true",
                   help=f"write the trained encoder (fp16) to ARTIFACTS/{ENCODER_NAME} if the folder stays <= 25 MB")
    p.add_argument("--markdown", help="write the tables as Markdown to this file")
    p.add_argument("--json", help="write the raw results as JSON to this file")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run, not the documented figures")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    p.add_argument("--head", choices=("regress", "retrieve"), default="regress",
                   help="regress: predict the coefficients; retrieve: recognise the space's training people")
    p.add_argument("--blend-by-loss", action="store_true",
                   help="retrieve: blend the top_k/temperature the validation diffusion loss prefers (default: top-1)")
    p.add_argument("--no-nearest", action="store_true",
                   help="leave out the curve from the nearest training identity (its search costs minutes per person)")
    p.add_argument("--no-identity", action="store_true",
                   help="leave out the curves refined with the identity loss (a retrieval encoder's face embedding of "
                        "the predicted clean image; they are measured by default for a retrieval encoder)")
    p.add_argument("--refine-sweep", action="store_true",
                   help="retrieve: also refine the encoder's identity at several lr on two sets of 24 validation "
                        "people, scored judge-free by the encoder's own face embedding (minutes)")
    p.add_argument("--refine-lrs", default="0.03,0.1,0.3",
                   help="--refine-sweep: the learning rates, comma-separated (default 0.03,0.1,0.3)")
    p.add_argument("--refine-momentum", type=float, default=0.0,
                   help="--refine-sweep: refine with SGD of this momentum (0 < m < 1) instead of Adam; its lr are in "
                        "gradient units (Adam's are per coefficient), e.g. 760,1100,1900 in the shipped world")
    p.add_argument("--people", type=int, default=0,
                   help="measure on the first N held-out people (default: all; each costs three 400-step inversions)")
    args = p.parse_args()
    try:
        lrs = tuple(float(x) for x in args.refine_lrs.split(","))
    except ValueError:
        p.error(f"--refine-lrs {args.refine_lrs!r}: comma-separated numbers, e.g. 0.03,0.1,0.3")
    if not all(lr > 0 for lr in lrs) or not 0.0 <= args.refine_momentum < 1.0:
        p.error("--refine-lrs must be positive and --refine-momentum in [0, 1)")
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    world = load_world(args.artifacts)
    config = MicroEncoderConfig() if args.head == "regress" else MicroEncoderConfig.retrieval()
    targets = TargetConfig(people=args.people, nearest=not args.no_nearest)
    if args.quick:
        config = dataclasses.replace(config, rendered=32, photo_views=2, render_steps=10,
                                     train=dataclasses.replace(config.train, steps=60, eval_every=20))
        targets = TargetConfig(full_steps=40, record=(0, 5, 40), people=2, seeds=2, ddim_steps=10, references=4,
                               timing_repeats=3)
    if args.encoder:
        encoder = load_encoder(args.encoder, world.space)
        args.head = encoder.config.head
        trained = f"loaded {args.encoder}"
    else:
        result = train_micro_encoder(world, config, os.path.join(args.workdir, "encoder"), log=_log)
        encoder = result.encoder
        trained = (f"trained {result.final.step} steps, weights of step {result.chosen.step}: held-out (validation) "
                   f"relative error {result.chosen.val_error:.3f}, {result.final.seconds:.0f} s")
    choice = []
    if encoder.config.head == "retrieve" and not args.encoder:
        preferred, choice = choose_retrieval(world, encoder, log=_log)
        if args.blend_by_loss:
            encoder = preferred
        trained += f"; blends the top {encoder.config.top_k} at temperature {encoder.config.temperature:g}"
    if args.write_encoder and not args.encoder:
        _write_encoder(encoder, args.artifacts, result, config)
    _log(trained)
    pcs = pcs_curve(world, encoder, workdir=args.workdir, log=_log)
    sweeps = []
    if args.refine_sweep:
        if encoder.config.head != "retrieve":
            p.error("--refine-sweep scores with the encoder's face embedding: it needs --head retrieve")
        sweeps = [refinement_sweep(world, encoder, lrs=lrs, first=first, momentum=args.refine_momentum, log=_log)
                  for first in (0, 24)]
    targets = dataclasses.replace(targets, identity=args.head == "retrieve" and not args.no_identity)
    measured = measure_targets(world, encoder, targets, workdir=args.workdir, log=_log)
    text = targets_markdown(measured) + "\n" + pcs_markdown(pcs) + (("\n" + choice_markdown(choice)) if choice else "")
    text += "".join("\n" + sweep_markdown(sweep) for sweep in sweeps)
    print(text)
    print(f"{trained}; world: {world.space.train_coefs.shape[0]} models, {world.space.pcs} PCs; "
          f"{time.perf_counter() - t0:.0f} s in all")
    raw = {"targets": measured, "pcs": pcs, "retrieval_choice": choice, "refinement_sweeps": sweeps}
    for path, data in ((args.markdown, text), (args.json, json.dumps(raw, indent=1))):
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, path)
    return 0


def pcs_markdown(rows: list[dict]) -> str:
    lines = ["**Coefficients used (P), validation people, judge-free** (the encoder's prediction cut to its first P PCs; "
             "diffusion loss on unseen photos, relative to the mean model: 0 = the mean model, higher is better)", "",
             "| P | loss gain over the mean model |", "|---|---|"]
    lines += [f"| {r['pcs']} | {r['gain']:+.5f} |" for r in rows]
    return "\n".join(lines) + "\n"


def choice_markdown(rows: list[dict]) -> str:
    lines = ["**Retrieval: identities blended (top_k) and temperature, validation people, judge-free** (diffusion loss "
             "on unseen photos relative to the mean model; higher is better; for information: the encoder answers "
             "its top-1 unless --blend-by-loss)", "",
             "| top_k | temperature | loss gain over the mean model |", "|---|---|---|"]
    lines += [f"| {r['top_k']} | {r['temperature']:g} | {r['gain']:+.5f} ± {r['gain_sem']:.5f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_encoder(encoder, folder: str, result, config) -> None:
    path = os.path.join(folder, ENCODER_NAME)
    tmp = path + ".candidate"
    info = {"steps": result.final.step, "weights_of_step": result.chosen.step,
            "heldout_error": result.chosen.val_error, "config": config.to_json()}
    save_encoder(encoder, tmp, dtype=torch.float16, info=info)
    others = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                 if os.path.isfile(os.path.join(folder, f)) and f not in (ENCODER_NAME, os.path.basename(tmp)))
    size = os.path.getsize(tmp)
    if others + size > BUDGET:
        os.remove(tmp)
        _log(f"NOT writing {path}: the folder would hold {(others + size) / 2**20:.1f} MB (budget 25 MB)")
        return
    os.replace(tmp, path)
    _log(f"wrote {path} ({size / 2**20:.2f} MB; the folder holds {(others + size) / 2**20:.1f} MB of 25)")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
