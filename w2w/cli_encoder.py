"""CLI commands for the face encoder (one-shot inversion): train-encoder, encoder-info."""
from __future__ import annotations

import os
import time

from .cli_common import NONNEGATIVE, POSITIVE, check_output, finite, print_json

SPACE_HELP = "a w2w space: our .safetensors file or a folder of the released files (V.pt, mean.pt, ...)"
EPILOG = """examples:
  # the real space, pairs rendered by your ComfyUI (this pack installed, the space in its models/w2w):
  python -m w2w train-encoder models/w2w/weights2weights.safetensors --workdir W --out models/w2w_encoders/face.safetensors \\
      --render-server http://127.0.0.1:8188 --server-space weights2weights.safetensors \\
      --checkpoint realisticVisionV51_v51VAE.safetensors --identities 20000 --backbone facenet \\
      --facenet-weights models/facenet/20180402-114759-vggface2.pt
  # your own (photo, identity) pairs (a folder with pairs.jsonl), added to or instead of rendered ones:
  python -m w2w train-encoder SPACE --workdir W --out ENC --pairs my-pairs/
  # the miniature world, on a CPU:
  python -m w2w train-encoder --micro --workdir W --out models/micro/micro-encoder.safetensors

Stop it any time: run the same command again and it resumes (rendering, framing and training checkpoint into
--workdir). docs/encoder.md has the details and what a real run needs."""


def register(sub) -> None:
    import argparse

    p = sub.add_parser("train-encoder", help="train a face encoder: photo -> the first P coefficients of a space, "
                       "in one pass (the fast path to inversion)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", nargs="?", help=SPACE_HELP + " (not with --micro)")
    p.add_argument("--out", required=True, help="encoder .safetensors to write (ComfyUI: models/w2w_encoders/)")
    p.add_argument("--workdir", required=True, help="checkpoints, rendered pairs and caches; re-running resumes")
    g = p.add_argument_group("pairs")
    g.add_argument("--pairs", action="append", default=[], metavar="DIR",
                   help="a pairs folder (pairs.jsonl: photo + identity file per line); repeatable")
    g.add_argument("--render-server", metavar="URL", help="render pairs through this ComfyUI server (with this pack) "
                   "into WORKDIR/rendered first")
    g.add_argument("--server-space", help="the space's name on the server (Load w2w Space's choice)")
    g.add_argument("--checkpoint", help="the server's SD1.5 checkpoint file (the space's base model)")
    g.add_argument("--identities", type=POSITIVE, default=20_000, help="identities sampled and rendered (default 20,000)")
    g.add_argument("--renders-per-identity", type=POSITIVE, default=2, help="noise seeds/prompts per identity (default 2)")
    g.add_argument("--sample-pcs", type=POSITIVE, default=1000, help="PCs sampled per identity (default 1000, the paper's)")
    g.add_argument("--factor", type=finite, default=1.0, help="sampling spread (default 1.0)")
    g.add_argument("--prompts", metavar="FILE", help="prompts, one per line, each naming 'sks' (default: six "
                   "portrait prompts around 'sks person')")
    g.add_argument("--size", type=POSITIVE, default=512, help="rendered image side (default 512)")
    g.add_argument("--steps", type=POSITIVE, default=25, help="sampler steps per render (default 25)")
    g.add_argument("--cfg", type=finite, default=3.0, help="guidance scale (default 3.0, the paper's sampling cfg)")
    g.add_argument("--render-seed", type=NONNEGATIVE, default=0, help="identity i is sampled with seed render-seed + i")
    g.add_argument("--face", choices=("auto", "off"), default="auto",
                   help="auto: frame every photo around its largest face as the inversion node does (MTCNN from "
                        "facenet-pytorch; photos without a face are left out); off: centre crop")
    m = p.add_argument_group("encoder")
    m.add_argument("--pcs", type=POSITIVE, default=None, help="coefficients predicted (default: 1000, or every PC the "
                   "space's sampling statistics cover if fewer)")
    m.add_argument("--backbone", choices=("conv", "facenet"), default="conv",
                   help="conv: a CNN trained from scratch (default); facenet: FaceNet's frozen embedding + a head")
    m.add_argument("--facenet-weights", help="the FaceNet weights file for --backbone facenet "
                   "(20180402-114759-vggface2.pt)")
    m.add_argument("--image-size", type=POSITIVE, default=64, help="conv: input side, 4 times a power of two (default 64)")
    m.add_argument("--width", type=POSITIVE, default=32, help="conv: channels of the first stage (default 32)")
    m.add_argument("--hidden", type=POSITIVE, default=None, help="head width (default 512; 256 for --micro --head retrieve)")
    m.add_argument("--head", choices=("regress", "retrieve"), default="regress",
                   help="regress: predict the coefficients (default); retrieve: recognise the space's training models "
                        "(pairs must name them: \"row\" in pairs.jsonl; the miniature world's photo pairs do) and "
                        "blend the most similar ones' coefficients")
    m.add_argument("--embed", type=POSITIVE, default=128, help="retrieve: face-embedding size (default 128)")
    m.add_argument("--top-k", type=POSITIVE, default=1,
                   help="retrieve: training models blended (default 1: the most similar one)")
    m.add_argument("--temperature", type=finite, default=0.05,
                   help="retrieve: softmax temperature over the blended models' cosine similarities (default 0.05)")
    t = p.add_argument_group("training")
    t.add_argument("--train-steps", type=POSITIVE, default=None, help="default 3000 (6000 for --micro --head retrieve)")
    t.add_argument("--batch", type=POSITIVE, default=None, help="default 64 (128 for --micro --head retrieve)")
    t.add_argument("--lr", type=finite, default=1e-3)
    t.add_argument("--augment", type=finite, default=1.0, help="strength of the photo augmentation (0 = off)")
    t.add_argument("--holdout", type=finite, default=0.1, help="fraction of identities held out for the report "
                   "and for early stopping")
    t.add_argument("--keep-last", action="store_true", help="write the last step's weights (default: the "
                   "evaluation with the lowest held-out error)")
    t.add_argument("--seed", type=NONNEGATIVE, default=0)
    t.add_argument("--threads", type=NONNEGATIVE, default=0, help="CPU threads (default: torch's)")
    t.add_argument("--fp16", action="store_true", help="store the encoder's weights in float16 (half the size)")
    w = p.add_argument_group("miniature world")
    w.add_argument("--micro", action="store_true", help="train the miniature world's encoder (CPU; docs/micro-world.md)")
    w.add_argument("--world", default=None, help="micro-world folder (default: the pack's models/micro)")
    w.add_argument("--rendered", type=POSITIVE, default=None, help="micro: sampled identities rendered for pairs")
    w.add_argument("--photo-views", type=POSITIVE, default=None, help="micro: photos per training person")
    w.add_argument("--diffusion-weight", type=finite, default=None, help="micro: weight of the diffusion term")
    p.set_defaults(func=_train)

    p = sub.add_parser("encoder-info", help="summarise an encoder file (space, P, backbone, training)")
    p.add_argument("encoder", help="encoder .safetensors")
    p.set_defaults(func=_info)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _train(args) -> int:
    import torch

    check_output(args.out, "--out", args.space, args.facenet_weights, args.prompts, args.world, *args.pairs)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.micro:
        if args.space:
            raise ValueError("--micro trains the miniature world's encoder: give no space")
        return _train_micro(args)
    if not args.space:
        raise ValueError("give the space to train for (or --micro)")
    return _train_real(args)


def _train_config(args, base=None):
    from dataclasses import replace

    from .encoder import EncoderTrainConfig

    base = base or EncoderTrainConfig()
    return replace(base, steps=args.train_steps or base.steps, batch=args.batch or base.batch, lr=args.lr,
                   augment=args.augment, holdout=args.holdout, seed=args.seed, keep_best=not args.keep_last)


def _train_real(args) -> int:
    from .encoder import build_encoder, retrieval_rows, train_encoder
    from .encoder_pairs import DEFAULT_PROMPTS, ComfyRenderer, RenderSettings, load_pairs, render_pairs
    from .space import load_space

    probe = load_space(args.space, 1)  # a released folder's sampling statistics come with its training data
    stats_pcs = probe.coef_mean.shape[0] if probe.coef_mean is not None else 0
    if stats_pcs == 0:
        raise ValueError(f"{args.space} has no sampling statistics (proj_1000pc.pt): an encoder needs them")
    pcs = args.pcs or min(1000, stats_pcs)
    folders = list(args.pairs)
    # training data: the sampling statistics of a released folder, a retrieval gallery, pairs named by row
    space = load_space(args.space, max(pcs, min(args.sample_pcs, probe.total_pcs)))
    if args.render_server:
        if not (args.server_space and args.checkpoint):
            raise ValueError("--render-server needs --server-space (the space's name on the server) and --checkpoint")
        prompts = DEFAULT_PROMPTS
        if args.prompts:
            with open(args.prompts, encoding="utf-8") as f:
                prompts = tuple(line.strip() for line in f if line.strip())
        settings = RenderSettings(args.checkpoint, args.server_space, space.fingerprint, args.identities,
                                  args.renders_per_identity, args.sample_pcs, args.factor, prompts,
                                  size=args.size, steps=args.steps, cfg=args.cfg, seed=args.render_seed)
        rendered = os.path.join(args.workdir, "rendered")
        count = render_pairs(ComfyRenderer(args.render_server, settings), space, rendered, _log)
        _log(f"rendered pairs: {count} in {rendered}")
        folders.append(rendered)
    if not folders:
        raise ValueError("no training pairs: give --pairs DIR and/or --render-server URL")
    size = args.image_size if args.backbone == "conv" else 256
    pairs = load_pairs(folders, space, size, args.face, cache_dir=args.workdir, log=_log)
    train = _train_config(args)
    rows = retrieval_rows(pairs, train.holdout, train.seed) if args.head == "retrieve" else None
    encoder = build_encoder(space, pcs, args.backbone, image_size=args.image_size, width=args.width,
                            hidden=args.hidden or 512, facenet_weights=args.facenet_weights, seed=args.seed,
                            head=args.head, embed=args.embed, gallery_rows=rows, top_k=args.top_k,
                            temperature=args.temperature)
    _log(f"encoder: {len(pairs)} pairs ({pairs.source}); P = {pcs}, backbone {args.backbone}, head {args.head}")
    result = train_encoder(encoder, pairs, train, workdir=args.workdir, log=_log)
    _write(encoder, args, result, pairs.source)
    return 0


def _train_micro(args) -> int:
    from dataclasses import replace

    from .encoder_micro import MicroEncoderConfig, train_micro_encoder
    from .micro.world import DEFAULT_DIR, load_world

    world = load_world(args.world or DEFAULT_DIR)
    config = MicroEncoderConfig() if args.head == "regress" else MicroEncoderConfig.retrieval()
    changes = {k: v for k, v in (("rendered", args.rendered), ("photo_views", args.photo_views),
                                 ("diffusion_weight", args.diffusion_weight), ("pcs", args.pcs),
                                 ("hidden", args.hidden)) if v is not None}
    config = replace(config, **changes, width=args.width, embed=args.embed,
                     train=_train_config(args, config.train))
    result = train_micro_encoder(world, config, args.workdir, log=_log)
    encoder = result.encoder
    if args.head == "retrieve":
        encoder = encoder.with_retrieval(args.top_k, args.temperature)
    _write(encoder, args, result, f"miniature world ({config.to_json()})")
    return 0


def _write(encoder, args, result, source: str) -> None:
    import json
    import math

    import torch

    from .encoder import save_encoder

    final, chosen = result.final, result.chosen
    info = {"pairs": source, "steps": final.step, "weights_of_step": chosen.step, "train_loss": chosen.loss,
            "heldout_error": None if math.isnan(chosen.val_error) else chosen.val_error,
            "heldout_identities": len(result.holdout_groups), "seconds": final.seconds}
    save_encoder(encoder, args.out, dtype=torch.float16 if args.fp16 else torch.float32, info=info)
    _log(f"wrote {args.out}: {json.dumps(info)}")


def _info(args) -> int:
    import json

    from .encoder import EncoderConfig, read_encoder_metadata

    meta = read_encoder_metadata(args.encoder)
    config = EncoderConfig.from_json(meta["config"])
    print_json({"space_fingerprint": meta["space_fingerprint"], "pcs": config.pcs, "backbone": config.backbone,
                "config": json.loads(meta["config"]), "training": json.loads(meta.get("info", "{}"))})
    return 0
