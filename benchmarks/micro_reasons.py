"""Measurements behind the miniature world's missed targets (docs/micro-world.md), beside its tables.

    python benchmarks/micro_reasons.py dreambooth            # DreamBooth-LoRA at 60 and 400 steps (≈ 14 min, 2 cores)
    python benchmarks/micro_reasons.py dreambooth --steps 60 400 1000 --people 16
    python benchmarks/micro_reasons.py dreambooth --prior-weight 1   # with prior preservation (the paper's eq. 2)
    python benchmarks/micro_reasons.py vae                   # the w2w++ VAE's recipe varied, latent 16 (≈ 4 min)
    python benchmarks/micro_reasons.py vae --latent 32 --markdown vae-recipes.md
    python benchmarks/micro_reasons.py prompts --workdir W   # DreamBooth under scene prompts (≈ 50 min, resumable)
    python benchmarks/micro_reasons.py fig10                 # Fig. 10 on all 40 held-out people (≈ 9 min)
    python benchmarks/micro_reasons.py edits --image-seeds 16  # the edits table with 4 x the images per model
    python benchmarks/micro_reasons.py edits --debias        # the edits with debiased directions
    python benchmarks/micro_reasons.py inversion --image-seeds 16  # the inversion table, likewise
    python benchmarks/micro_reasons.py sampling --guidance 3  # the sampling table at the reference code's guidance
    python benchmarks/micro_reasons.py prior-space --workdir W --workers 2  # a space of LoRAs with prior preservation
    python benchmarks/micro_reasons.py longer-space --workdir W --steps 240 --space-models 200 --workers 2  # longer
    python benchmarks/micro_reasons.py consistent-space --workdir W --space-models 1000 --workers 2  # the paper's data
    python benchmarks/micro_reasons.py degraded              # inversion vs DreamBooth from a low-resolution photo (≈ 14 min)
    python benchmarks/micro_reasons.py degraded --degradation half-hidden  # ... from a photo half hidden by an object
    python benchmarks/micro_reasons.py degraded --degradation cap  # ... from a photo with a cap over the hair
    python benchmarks/micro_reasons.py masked                # inversion vs DreamBooth with the loss on the head only
    python benchmarks/micro_reasons.py inversion-pcs         # inversion on 24 ... 960 PCs (≈ 50 min)
    python benchmarks/micro_reasons.py sided --workdir W      # a third world's probe: sided photos (≈ 1 h, resumable)
    python benchmarks/micro_reasons.py sided --workdir W --space-models 1000 --workers 2  # ... with a space

``dreambooth`` (target 1: does single-photo DreamBooth-LoRA over-fit when trained longer?): LoRAs from each held-out
person's first photo and from their 8 training photos, trained with the world's LoRA recipe run for each number of
steps (its learning-rate schedule stretched over them; 60 is the recipe of the space's models and of the tables'
DreamBooth rows, 400 the inversion's step count), next to the single-photo w2w inversion of the same people; the
judge's ID score of each model's images against unseen photos, as in the tables' inversion table. ``--prior-weight``
adds DreamBooth's prior-preservation loss (the paper's eq. 2, which its DreamBooth baselines and dataset models use):
λ times the loss on the base model's own images of "photo person", so the LoRA must keep the class and put the person
into the identifier.

``vae`` (target 5: when does the VAE beat PCA's held-out weight error?): VAEs of one latent size trained on the
world's training coefficients with the recipe of its shipped VAEs, varied in input scaling (each PC whitened, or one
common scale, so the loss weighs the PCs as the weight error does), in length (the epoch with the lowest error on the
training models the recipe holds back, or the last of 200) and in KL weight; each scored on the held-out people's
LoRAs as the tables' PCA vs VAE table scores them (1 = the mean model), after PCA at that size, and on the training
models it fitted and held back (over-fitting shows as a gap). Then whether anything a nonlinear code could hold is
left: the rest of each model's coefficients predicted from its first PCs by k nearest neighbours and by an MLP.

``prompts`` (target 1 under the paper's protocol: models judged on images made with diverse prompts): a base model
like the shipped one whose captions also name the head turn, smile and cap of each photo (trained into ``--workdir``,
resumable, ≈ 25 min), a scene reader that reads the turn and the cap back from an image (≈ 5 min), then
DreamBooth-LoRAs of the held-out people from 1 and 8 photos at each ``--steps``, each judged under the training
prompt and under "photo sks person left / right / smiling / cap": ID score and how often the asked turn or cap shows.

``fig10`` (target 4: is the curve's shape the world's or its 12 people's?): the tables' Fig. 10 (ID score of
single-photo inversion vs the models the space is built from) on ``--people`` held-out people (default: all),
``--eval-seed`` redrawing the inversions' and images' draws as ``micro_world.py --eval-seed`` does.

``edits`` (target 2: is its verdict the method's or its draws'?): the tables' edits-vs-prompting table and target 2's
verdict, with ``--image-seeds`` images per model (the tables use 4, the same 4 for every model) and ``--eval-seed``;
``--debias`` edits along each direction debiased against every other attribute's (the reference code's debiasing);
``--direction-pcs`` fits the directions on more of the space's PCs than the world's sample PCs.
``inversion`` (target 1, likewise): the tables' inversion-vs-DreamBooth table and target 1's verdicts.
``prior-space`` (target 1 with the paper's DreamBooth everywhere): ``--space-models`` (default 1,000) of the training
identities get LoRAs with prior preservation (``--prior-weight``, default 1; resumable in ``--workdir``, ≈ 25 min on
2 workers) and a space is built on them, beside the space of the same identities' shipped LoRAs; each inverts the
held-out people's first photo, next to DreamBooth-LoRAs of them with and without the prior.
``longer-space`` (target 1 with stronger models in the space): likewise, but the space's LoRAs train ``--steps`` (one
value) steps of the world's recipe stretched (the shipped ones: 60); DreamBooth-LoRAs at both lengths stand beside,
and the 8-photo ones are projected on the space of their length (what the space can reach of these people).
``consistent-space`` (target 1 with the paper's data: its dataset models and multi-image baseline learn from
consistent generated photos of each identity, its inversion input is a real photo): likewise, but the space's LoRAs
are the world's recipe on each identity's training photos in ``--space-photos`` style (default plain: frontal,
plain backdrop, even light); the held-out people's first hard photo is inverted into both spaces and given to
single-photo DreamBooth, beside DreamBooth on their 8 hard and their 8 plain photos.
``degraded`` (target 1 where one photo shows less of a person): each held-out person's first photo, clean and taken
``--factor`` times coarser (blocks averaged, enlarged back; ``--degradation resolution``, the default) or with its left
or right half behind a flat object of one colour (``--degradation half-hidden``) — or, with ``--degradation cap``,
beside it the person's first photo after the 8 training photos without a cap and the first with one (part of the
hair hidden, and what is hidden is partly linked to what shows: grey hair to age, hair style to sex) — inverted into
the space and given
to single-photo DreamBooth-LoRAs of the world's recipe at each ``--steps``, beside DreamBooth-LoRAs of the person's 8
clean training photos; every model's images against clean unseen photos — the paper's out-of-distribution projection
(§4.5) read with its Table 2 protocol.
``masked`` (target 1 with the loss on the person alone): each held-out person's first photo, its diffusion loss
taken over the whole photo (the tables') and over the head only (its head mask: face, hair, headwear — what a
face-parsing segmenter gives, the reference inversion's optional mask), per loss the w2w inversion and single-photo
DreamBooth-LoRAs of the world's recipe at each ``--steps``; beside DreamBooth-LoRAs of the 8 training photos (whole
photo, the paper's multi-image baseline). The mask keeps the backdrop, clothes and object in front out of the
loss (the model still sees them).
``inversion-pcs`` (target 1 and the paper's appendix F: its first 1,000 PCs under-fit an identity, 20,000 over-fit the
source image): each held-out person's first photo inverted on the first 24, 60, 120 and 240 PCs of the world's space
(1 %–10 % of the LoRA's values) and on the first 240, 480 and 960 of the exact space of the 2,000 training LoRAs the
world ships as weights (10 %–40 %); per count the inversion and the 8-photo LoRA projected on those PCs (the space's
reach), each with its ID score and the inversion's objective on the photo, beside single-photo DreamBooth.
``sided`` (a probe for a third world, where one photo cannot show a person whole): a base model and a judge of the
world's recipes trained on *sided* photos (trained into ``--workdir``, resumable): the head always turned, its near
cheek's mark showing, the other cheek's mark its complement (w2w/micro/sided.py). Then what the judge reads from the
marks, and DreamBooth-LoRAs of the held-out people from their first photo (one cheek) and from their 8 training
photos at each ``--steps``, each model's images against unseen photos — all, those showing the first photo's cheek,
and the other cheek: does single-photo DreamBooth fall below 8-photo DreamBooth here (the over-fitting check)? With
``--space-models``, that many training identities get sided LoRAs of the world's recipe (resumable, ``--workers``)
and a space of the world's PCs is built on them: the w2w inversion of the first photo and the space's reach join.
``sampling`` (target 3): the tables' sampling table and target 3's verdict, with the training models projected on the
space's PCs beside them (the consistency the space keeps of real identities). ``fig10`` takes ``--image-seeds`` too;
``--guidance`` (fig10, edits, inversion, sampling, dreambooth) renders every image with classifier-free guidance, as
the reference code does (3 for samples, 2.5 for inversions and edits; the tables use none).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.tables import (DEGRADATIONS, EvalConfig, Generator, check_targets, curve_table,  # noqa: E402
                              degraded_table, editing_table, inversion_table, masked_table, pcs_table, recipe_table,
                              sampling_table, structure_table, table_markdown, vae_recipe_table, write_text)
from w2w.micro.scene import prompt_table, scene_base_config, train_scene_reader  # noqa: E402
from w2w.micro.batch_invert import invert_batch  # noqa: E402
from w2w.micro.tables import _pairwise, dreambooth_sets, photo_loss  # noqa: E402
from w2w.micro.faces import STYLES  # noqa: E402
from w2w.micro.judge import judge_quality  # noqa: E402
from w2w.micro.sided import STYLE, judge_sides_table, sided_dreambooth_table, sided_world  # noqa: E402
from w2w.micro.train import (MODEL_SEEDS, class_images, identity_images, photo_version, stage_stamp,  # noqa: E402
                            train_base, train_loras)
from w2w.micro.world import (DEFAULT_DIR, World, _lora_stage, load_world, lora_stage_stamp, make_space,  # noqa: E402
                             with_directions)


def scene_world(world, workdir: str, models: int = 0, workers: int = 1):
    """The shipped world with its base model replaced by one trained on scene captions (same recipe otherwise); the
    judge, the held-out people and the LoRA recipe stay. With ``models``, the first that many training identities get
    LoRAs on the new base (the world's recipe, resumable) and a space of the world's PCs is built on them (without,
    the space is the shipped one's and unused). Returns it and the scene reader's accuracy (+ the reader)."""
    base = scene_base_config(world.config.base)
    unet, text = train_base(workdir, base)
    space = world.space
    if models:
        seeds = [MODEL_SEEDS + i for i in range(models)]
        stamp = lora_stage_stamp("loras", world.config.lora, base, MODEL_SEEDS, models)
        weights, _ = _lora_stage(workdir, "loras", unet, text, seeds, world.config.lora, base.photos, stamp, print,
                                 workers)
        space = make_space(unet, weights, seeds, world.config.pcs, world.config.sample_pcs)
    reader, accuracy = train_scene_reader(workdir)
    scene = World(unet, text, world.judge, space, world.weights, world.model_seeds, world.heldout_weights,
                  world.heldout_seeds, {}, replace(world.config, base=base))
    return scene, {**accuracy, "reader": reader}


def variant_space_table(world, workdir: str, models: int, workers: int, lora, label: str, cfg: EvalConfig,
                        baselines: list[tuple], photos: str = "", input_photos: str = "") -> list[dict]:
    """The space's models trained with another LoRA recipe or on photos of another style: the first ``models``
    training identities get LoRAs of ``lora`` on their photos of style ``photos`` (default: the world's; resumable in
    ``workdir``) and a space of the world's PCs is built on them, beside the space of the same identities' shipped
    LoRAs (the world's recipe and photos). Each inverts the held-out people's first photo (the world's style, as the
    tables do). DreamBooth-LoRAs of them stand beside, one set per ``baselines`` entry (kind, recipe[, style]): from
    their first photo and their training photos in the world's style, or from their training photos in another
    style; the multi-photo ones whose recipe and style are a space's are also projected on that space (its reach
    for these people). ``input_photos``: the one photo inverted and given to single-photo DreamBooth is the person's
    first photo in that style instead."""
    own = world.config.photos
    photos = photos or own
    seeds = [MODEL_SEEDS + i for i in range(models)]
    name = "loras" if photos == own else f"loras-{photos}"
    stamp = lora_stage_stamp(name, lora, world.config.base, MODEL_SEEDS, models)
    if photos != own:
        stamp = stage_stamp(stamp, photo_version(photos))
    t0 = time.perf_counter()
    weights, _ = _lora_stage(workdir, name, world.unet, world.text, seeds, lora, photos, stamp, print, workers)
    print(f"  {models} LoRAs {label} in {time.perf_counter() - t0:.0f} s")
    pcs, sample = world.config.pcs, world.config.sample_pcs
    spaces = [("with the world's recipe" + (f" on {own} photos" if photos != own else ""), world.config.lora, own,
               make_space(world.unet, world.weights[:models], seeds, pcs, sample)),
              (label, lora, photos, make_space(world.unet, weights, seeds, pcs, sample))]
    gen = Generator(world, cfg)
    people, refs, sets = dreambooth_sets(world, gen, cfg, (lora.steps,))
    rows = []
    size = world.unet.config.image
    if input_photos and input_photos != own:
        sets = ((f"1 {input_photos} photo", [identity_images(s, 1, 0, size, input_photos) for s in people], 1),
                *sets[1:])
    # the training photos of each other style a baseline learns from: read by the judge here, trained on below
    other = {b[2]: [identity_images(s, b[1].images, 0, size, b[2]) for s in people]
             for b in baselines if len(b) > 2 and b[2] != own}
    for style, shots in sorted(other.items()):
        emb, _ = gen.read(torch.stack(shots))
        rows.append({"model": f"{style} training photos themselves (judge reference)",
                     "ID score": _pairwise(emb, refs), "loss on the one photo × 1,000": float("nan")})
    first = torch.cat(sets[0][1])  # the one photo of each person: inverted, and single-photo DreamBooth's
    mean = world.space.mean[None].expand(len(people), -1).clone()
    rows.append({"model": "mean model of the world's space (no inversion)",
                 "ID score": _pairwise(gen.read_models(mean)[0], refs),
                 "loss on the one photo × 1,000": photo_loss(world, mean, first)})
    for name, _, _, space in spaces:
        runs = invert_batch(world, first, [cfg.seed + i for i in range(len(people))],
                            steps=cfg.invert_steps, lr=cfg.invert_lr, space=space)
        inverted = space.weights(runs[cfg.invert_steps])
        emb, _ = gen.read_models(inverted)
        rows.append({"model": f"w2w inversion, 1 photo, space of {models:,} LoRAs trained {name}",
                     "ID score": _pairwise(emb, refs),
                     "loss on the one photo × 1,000": photo_loss(world, inverted, first)})
    prior = class_images(world.unet, world.text, lora) if any(b[1].prior_weight for b in baselines) else None
    for kind, recipe, *rest in baselines:
        style = rest[0] if rest else own
        if style == own:
            todo = [(text, images, count, own) for text, images, count in sets]
        else:
            count = recipe.images
            todo = [(f"{count} {style} photos", other[style], count, style)]
        for text, images, count, style in todo:
            trained = train_loras(world.unet, world.text, images, replace(recipe, images=count), seed=17, prior=prior)
            emb, _ = gen.read_models(trained)
            rows.append({"model": f"DreamBooth LoRA{kind}, {text}, {recipe.steps} steps",
                         "ID score": _pairwise(emb, refs),
                         "loss on the one photo × 1,000": photo_loss(world, trained, first)})
            for name, space_recipe, space_style, space in spaces:
                if count > 1 and style == space_style and replace(recipe, images=space_recipe.images) == space_recipe:
                    reach = space.weights(space.project(trained))
                    emb, _ = gen.read_models(reach)
                    rows.append({"model": f"  its projection on the {space.pcs} PCs of the space trained {name} "
                                          "(the space's reach)", "ID score": _pairwise(emb, refs),
                                 "loss on the one photo × 1,000": photo_loss(world, reach, first)})
    return rows


def prior_space_table(world, workdir: str, models: int, workers: int, weight: float, cfg: EvalConfig) -> list[dict]:
    """The paper's DreamBooth (eq. 2, prior preservation) everywhere: the first ``models`` training identities get
    LoRAs with prior weight ``weight`` (resumable in ``workdir``) and a space of the world's PCs is built on them;
    beside it the space of the same identities' shipped LoRAs (the world's recipe). Each inverts the held-out
    people's first photo; DreamBooth-LoRAs of them from 1 and 8 photos with and without the prior stand beside."""
    lora = replace(world.config.lora, prior_weight=weight)
    return variant_space_table(world, workdir, models, workers, lora, f"with prior preservation (λ {weight:g})", cfg,
                               [("", world.config.lora), (f" + prior preservation (λ {weight:g})", lora)])


def longer_space_table(world, workdir: str, models: int, workers: int, steps: int, cfg: EvalConfig) -> list[dict]:
    """The space's models trained ``steps`` steps (the world's recipe stretched, as ``dreambooth`` stretches it; the
    shipped ones train 60) instead of the world's recipe: the first ``models`` training identities get such LoRAs
    (resumable in ``workdir``) and a space of the world's PCs is built on them, beside the space of the same
    identities' shipped LoRAs. Each inverts the held-out people's first photo, next to DreamBooth-LoRAs of them from 1
    and 8 photos at both lengths and the 8-photo ones' projections on the space of their length."""
    lora = replace(world.config.lora, steps=steps)
    return variant_space_table(world, workdir, models, workers, lora, f"{steps} steps", cfg,
                               [("", world.config.lora), ("", lora)])


def consistent_space_table(world, workdir: str, models: int, workers: int, photos: str,
                           cfg: EvalConfig, input_photos: str = "") -> list[dict]:
    """The paper's data: its dataset models (and its multi-image DreamBooth baseline) are trained on consistent
    generated photos of each identity (its Sec. 4.1 and appendix E), while the photo it inverts is a real one (FFHQ).
    Here the first ``models`` training identities get LoRAs of the world's recipe on their training photos taken in
    style ``photos`` (the first world's plain photos: frontal, plain backdrop, even light), a space is built on them
    beside the space of their shipped (hard-photo) LoRAs, and each inverts the held-out people's first hard photo;
    DreamBooth-LoRAs of them from that photo, from their 8 hard photos and from their 8 photos of style ``photos``
    stand beside. ``input_photos``: the photo inverted (and given to single-photo DreamBooth) is the person's first
    one in that style instead of the world's."""
    lora = world.config.lora
    return variant_space_table(world, workdir, models, workers, lora, f"with the world's recipe on {photos} photos",
                               cfg, [("", lora), ("", lora, photos)], photos=photos, input_photos=input_photos)


def _people(world, asked: int) -> int:
    """How many held-out people a measurement uses: ``asked``, at most the world's; 0 = all of them."""
    return min(asked, len(world.heldout_seeds)) if asked else len(world.heldout_seeds)


def _verdict(target: dict) -> str:
    return "met" if target["met"] else "missed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("dreambooth", "vae", "prompts", "fig10", "edits", "inversion", "sampling", "degraded",
                                    "prior-space", "longer-space", "consistent-space", "masked", "inversion-pcs",
                                    "sided"),
                   help="which measurement")
    p.add_argument("--workdir", help="prompts: where the scene base model and the reader are trained (kept, resumes)")
    p.add_argument("--space-models", type=int, default=0,
                   help="prompts: also train this many identity LoRAs on the new base, build a space of them and "
                        "add the w2w inversion (0 = DreamBooth only; sided likewise); prior-space, longer-space, "
                        "consistent-space: the training identities retrained (default 1,000)")
    p.add_argument("--workers", type=int, default=1,
                   help="prompts, prior-space, longer-space, consistent-space, sided: processes training the space's "
                        "LoRAs")
    p.add_argument("--space-photos", choices=STYLES, default="plain",
                   help="consistent-space: the photo style the space's LoRAs (and the multi-photo DreamBooth "
                        "baseline) train on (default plain, the first world's; must differ from the world's)")
    p.add_argument("--input-photos", choices=STYLES,
                   help="consistent-space: the style of the one photo inverted and given to single-photo DreamBooth "
                        "(default: the world's own, as in the tables)")
    p.add_argument("--artifacts", default=DEFAULT_DIR, help="micro-world folder (default: the pack's models/micro)")
    p.add_argument("--steps", type=int, nargs="+", default=[60, 400],
                   help="dreambooth, prompts, degraded, masked: training steps to compare; longer-space: the steps of the "
                        "space's LoRAs (one value)")
    p.add_argument("--people", type=int, default=0,
                   help="dreambooth, prompts, degraded, masked, fig10, inversion: held-out people (0 = all)")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="fig10, edits, inversion: seed of the draws (default 0, the tables')")
    p.add_argument("--image-seeds", type=int, default=4,
                   help="fig10, edits, inversion: images per model, each with its own noise seed (default 4, the "
                        "tables')")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="fig10, edits, inversion, sampling, dreambooth: classifier-free guidance of every generated "
                        "image (default 1 = none, the tables'; the reference code samples at 3 and renders inversions "
                        "and edits at 2.5)")
    p.add_argument("--debias", action="store_true",
                   help="edits: each direction debiased against every other attribute's (the reference code's "
                        "debiasing) instead of the tables' plain least-squares directions")
    p.add_argument("--prior-weight", type=float, nargs="+", default=[0.0],
                   help="dreambooth: DreamBooth's prior-preservation weight λ, one run per value (0 = the world's "
                        "recipe, without it; the paper's DreamBooth uses it)")
    p.add_argument("--direction-pcs", type=int, default=0,
                   help="edits: fit the attribute directions on this many PCs (default: the world's sample PCs, as "
                        "the paper fits them on its first 1,000)")
    p.add_argument("--strengths", type=float, nargs="+",
                   help="edits: the sweep of w2w edit strengths, × each direction's largest training projection "
                        "(default: the tables' 0.5 1 1.5 2)")
    p.add_argument("--factor", type=int, default=4,
                   help="degraded: how many times coarser the input photo is taken (must divide the photo size)")
    p.add_argument("--degradation", choices=DEGRADATIONS, default="resolution",
                   help="degraded: what the input photo loses (resolution: taken --factor times coarser; half-hidden: "
                        "its left or right half behind an object; cap: later photos without and with a cap)")
    p.add_argument("--latent", type=int, default=16, help="vae: latent size (and PCA components)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what in ("prompts", "prior-space", "longer-space", "consistent-space", "sided") and not args.workdir:
        p.error(f"{args.what} needs --workdir (what it trains is kept there and resumes)")
    if min(args.steps) < 1:
        p.error("--steps must be positive")
    if args.eval_seed < 0:
        p.error(f"--eval-seed must be >= 0, got {args.eval_seed}")
    if min(args.prior_weight) < 0:
        p.error("--prior-weight must be >= 0")
    if not args.guidance >= 1:
        p.error(f"--guidance must be >= 1, got {args.guidance}")
    if args.image_seeds < 1:
        p.error(f"--image-seeds must be >= 1, got {args.image_seeds}")
    world = load_world(args.artifacts)
    models = args.space_models or 1000  # the *-space measurements: the training identities whose LoRAs are retrained
    if args.what in ("prior-space", "longer-space", "consistent-space") and not 3 <= models <= world.weights.shape[0]:
        p.error(f"--space-models must be 3..{world.weights.shape[0]} (the training LoRAs the world ships as weights)")
    t0 = time.perf_counter()
    extra = ""
    if args.what == "prompts":
        if args.space_models and not 3 <= args.space_models <= world.config.models:
            p.error(f"--space-models must be 3..{world.config.models} (or 0)")
        world, accuracy = scene_world(world, args.workdir, args.space_models, args.workers)
        config = EvalConfig(people=args.people)
        rows = prompt_table(world, Generator(world, config), config, accuracy.pop("reader"), tuple(args.steps),
                            inversion=bool(args.space_models))
        people = _people(world, args.people)
        title = (f"DreamBooth-LoRA under scene prompts, {people} held-out people, a base model that knows the scene "
                 "words (ID score: judge against unseen photos; shown: share of images in which the reader sees the "
                 "asked head turn or cap — reader accuracy on real photos " +
                 ", ".join(f"{w} {a:.2f}" for w, a in accuracy.items()) + ")")
    elif args.what == "fig10":
        people = _people(world, args.people)
        config = EvalConfig(curve_people=people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        rows = curve_table(world, Generator(world, config), config, log=print)
        title = (f"Inversion ID score vs models in the space (paper Fig. 10), {people} held-out people, evaluation "
                 f"seed {args.eval_seed}, {args.image_seeds} images per model; target 4 "
                 + _verdict(check_targets({"models_curve": rows})[0]))
    elif args.what == "edits":
        if args.strengths and min(args.strengths) <= 0:
            p.error("--strengths must be positive")
        config = EvalConfig(seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance,
                            **({"edit_people": args.people} if args.people else {}),
                            **({"edit_strengths": tuple(args.strengths)} if args.strengths else {}))
        if not 0 <= args.direction_pcs <= world.space.pcs:
            p.error(f"--direction-pcs must be 1..{world.space.pcs} (or 0: the world's {world.sample_pcs})")
        pcs = args.direction_pcs or world.sample_pcs
        if args.debias or args.direction_pcs:
            world = replace(world, space=with_directions(world.space, pcs, debias=args.debias))
        rows, _ = editing_table(world, Generator(world, config), config)
        target = check_targets({"editing": rows})[0]
        kind = "directions debiased against every other attribute" if args.debias else "least-squares directions"
        title = (f"Editing vs prompting, {config.edit_people} held-out people, {kind} on {pcs} PCs, evaluation seed "
                 f"{args.eval_seed}, {args.image_seeds} images per model; target 2 {_verdict(target)}: "
                 f"{target['measured']}")
    elif args.what == "inversion":
        config = EvalConfig(seed=args.eval_seed, seeds=args.image_seeds, people=args.people, cfg=args.guidance)
        rows, _ = inversion_table(world, Generator(world, config), config, log=print)
        verdicts = "; ".join(f"{t['target']}: {t['measured']} ({_verdict(t)})"
                             for t in check_targets({"inversion": rows}))
        people = _people(world, args.people)
        title = (f"Single-photo inversion vs DreamBooth-LoRA, {people} held-out people, "
                 f"evaluation seed {args.eval_seed}, {args.image_seeds} images per model; {verdicts}")
    elif args.what == "prior-space":
        weight = max(args.prior_weight) or 1.0
        config = EvalConfig(people=args.people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        rows = prior_space_table(world, args.workdir, models, args.workers, weight, config)
        title = (f"The paper's DreamBooth (prior preservation) for the space's models too, {_people(world, args.people)} "
                 f"held-out people, evaluation seed {args.eval_seed}, {args.image_seeds} images per model")
    elif args.what == "longer-space":
        if len(args.steps) != 1 or args.steps[0] == world.config.lora.steps:
            p.error(f"longer-space needs one --steps value other than the world's {world.config.lora.steps}")
        config = EvalConfig(people=args.people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        rows = longer_space_table(world, args.workdir, models, args.workers, args.steps[0], config)
        title = (f"The space's models trained {args.steps[0]} steps instead of {world.config.lora.steps}, "
                 f"{_people(world, args.people)} held-out people, evaluation seed {args.eval_seed}, {args.image_seeds} "
                 "images per model")
    elif args.what == "consistent-space":
        if args.space_photos == world.config.photos:
            p.error(f"--space-photos must differ from the world's own photo style ({world.config.photos})")
        config = EvalConfig(people=args.people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        given = args.input_photos or world.config.photos
        rows = consistent_space_table(world, args.workdir, models, args.workers, args.space_photos, config, given)
        title = (f"The paper's data: the space's models and the multi-photo baseline trained on {args.space_photos} "
                 f"photos, the input one {given} photo; {_people(world, args.people)} held-out people, "
                 f"evaluation seed {args.eval_seed}, {args.image_seeds} images per model (ID score against unseen "
                 f"{world.config.photos} photos)")
    elif args.what == "sampling":
        config = EvalConfig(seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        rows, _ = sampling_table(world, Generator(world, config), config, projected=True)
        target = check_targets({"sampling": rows})[0]
        title = (f"Sampling: consistency across seeds, evaluation seed {args.eval_seed}, {args.image_seeds} images per "
                 f"model, guidance {args.guidance:g}; target 3 {_verdict(target)}: {target['measured']}")
    elif args.what == "degraded":
        size = world.unet.config.image
        if args.factor < 2 or size % args.factor:
            p.error(f"--factor must be >= 2 and divide the photo size {size}, got {args.factor}")
        config = EvalConfig(people=args.people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        rows = degraded_table(world, Generator(world, config), config, args.factor, tuple(args.steps),
                              degradation=args.degradation)
        lost = {"resolution": f"a clean and a 1/{args.factor}-resolution photo", "half-hidden":
                "a clean and a half-hidden photo", "cap": "the first photo and later ones without and with a cap"}
        title = (f"Single-photo inversion vs DreamBooth-LoRA from {lost[args.degradation]}, "
                 f"{_people(world, args.people)} held-out people, evaluation seed {args.eval_seed}, {args.image_seeds} "
                 "images per model (ID score against clean unseen photos)")
    elif args.what == "inversion-pcs":
        config = EvalConfig(people=args.people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        rows = pcs_table(world, Generator(world, config), config)
        title = (f"Single-photo inversion vs the PCs it optimises (paper appendix F), {_people(world, args.people)} "
                 f"held-out people, evaluation seed {args.eval_seed}, {args.image_seeds} images per model (ID score "
                 "against unseen photos; loss: the inversion's objective on the one photo, 128 fixed draws)")
    elif args.what == "masked":
        config = EvalConfig(people=args.people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        rows = masked_table(world, Generator(world, config), config, tuple(args.steps))
        title = (f"Single-photo inversion vs DreamBooth-LoRA with the loss over the whole photo and over the head only, "
                 f"{_people(world, args.people)} held-out people, evaluation seed {args.eval_seed}, {args.image_seeds} "
                 "images per model (ID score against unseen photos)")
    elif args.what == "sided":
        if args.space_models and not 3 <= args.space_models <= world.config.models:
            p.error(f"--space-models must be 3..{world.config.models} (or 0)")
        world = sided_world(world, args.workdir, args.space_models, args.workers)
        config = EvalConfig(people=args.people, seed=args.eval_seed, seeds=args.image_seeds, cfg=args.guidance)
        sides = judge_sides_table(world, config)
        rows, both = sided_dreambooth_table(world, Generator(world, config), config, tuple(args.steps),
                                            inversion=bool(args.space_models))
        people = _people(world, args.people)
        quality = judge_quality(world.judge, style=STYLE)
        extra = table_markdown(f"What the sided judge reads, {people} held-out people's unseen photos (on photos of "
                               f"other unseen people: same person {quality['same_person']:.3f}, different people "
                               f"{quality['different_person']:.3f}, verification AUC {quality['verification_auc']:.3f})",
                               sides)
        title = (f"Sided photos: DreamBooth-LoRA from 1 photo (one cheek) and from {world.config.lora.images} "
                 f"(both cheeks for {both:.0%} of the people), {people} held-out people, evaluation seed "
                 f"{args.eval_seed}, {args.image_seeds} images per model (ID score against unseen photos: all, those "
                 "showing the first photo's cheek, the other cheek)")
    elif args.what == "dreambooth":
        config = EvalConfig(people=args.people, cfg=args.guidance)
        rows = recipe_table(world, Generator(world, config), config, tuple(args.steps),
                            prior_weights=tuple(args.prior_weight))
        people = _people(world, args.people)
        title = (f"Single-photo DreamBooth-LoRA trained longer, {people} held-out people (judge ID score against "
                 "unseen photos; seconds for all people)")
    else:
        if not 1 <= args.latent <= world.space.pcs:
            p.error(f"--latent must be 1..{world.space.pcs} (the space's PCs)")
        config = EvalConfig()
        rows = vae_recipe_table(world, config, args.latent)
        reach = float(world.space.train_coefs.norm(dim=1).mean())
        title = (f"w2w++ VAE recipes vs PCA, latent {args.latent}, {config.vae_people} held-out people (held-out "
                 "weight error; 1 = the mean model; errors on the training models in the space's coefficients; "
                 f"the training models lie {reach:.1f} from the mean model)")
        structure = structure_table(world, config, args.latent)
        extra = table_markdown(
            f"What the first {args.latent} PCs leave, predicted from them (error in the space's coefficients, "
            f"1 = the mean model; fitted on the training models the VAE recipe fits)", structure)
    if args.guidance != 1 and "guidance" not in title:
        title += f" — images with guidance {args.guidance:g}"
    text = table_markdown(title, rows) + "\n" + ("\n" + extra + "\n" if extra else "")
    print(text)
    print(f"in {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        write_text(args.markdown, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
