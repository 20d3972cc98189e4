"""CLI commands for VAE-w2w: vae-train, vae-info."""
from __future__ import annotations

import math
import sys

from .cli_common import NONNEGATIVE, POSITIVE, check_output, finite, print_json

SPACE_HELP = "a w2w space: our .safetensors file or a folder of the released files (V.pt, mean.pt, ...)"


def register(sub) -> None:
    p = sub.add_parser("vae-train", help="train a VAE-w2w (w2w++) over a space's coefficients or weight vectors")
    p.add_argument("space", help=SPACE_HELP)
    p.add_argument("--out", required=True, help="VAE .safetensors to write")
    p.add_argument("--input", choices=("coefs", "weights"), default="coefs",
                   help="coefs: the space's PCA coefficients, whitened (default); weights: standardised weight vectors")
    p.add_argument("--weights", default=None, metavar="MATRIX",
                   help="(rows, d) weights matrix on disk (.npy, .safetensors, torch file such as all_weights.pt), "
                        "streamed in blocks; required for --input weights, optional for coefs (projected)")
    p.add_argument("--key", default=None, help="tensor name inside a .safetensors weights matrix")
    p.add_argument("--no-whiten", action="store_true",
                   help="coefs: scale all PCs by one common std instead of whitening each (leading PCs weigh more)")
    p.add_argument("--pcs", type=POSITIVE, default=None, help="coefficients per model (default: all training PCs)")
    p.add_argument("--latent", type=POSITIVE, default=64, help="latent units (default 64)")
    p.add_argument("--hidden", default="512,256", help="encoder widths, comma-separated (decoder mirrors)")
    p.add_argument("--epochs", type=POSITIVE, default=40)
    p.add_argument("--batch-size", type=POSITIVE, default=128)
    p.add_argument("--lr", type=finite, default=1e-3)
    p.add_argument("--beta", type=finite, default=1.0, help="final KL weight")
    p.add_argument("--warmup", type=NONNEGATIVE, default=5, help="epochs with KL weight 0")
    p.add_argument("--ramp", type=NONNEGATIVE, default=10, help="epochs over which the KL weight rises to --beta")
    p.add_argument("--free-bits", type=finite, default=0.1, help="nats per latent unit not penalised (0 = off)")
    p.add_argument("--holdout", type=finite, default=0.1, help="fraction of models held out for the error report")
    p.add_argument("--keep-best", action="store_true",
                   help="keep the weights of the epoch with the lowest held-out error among those at the full KL "
                        "weight (early stopping), not the last epoch's")
    p.add_argument("--block-rows", type=POSITIVE, default=4096, help="rows read at a time from --weights")
    p.add_argument("--seed", type=NONNEGATIVE, default=0)
    p.set_defaults(func=_train)

    p = sub.add_parser("vae-info", help="summarise a trained VAE and its training history")
    p.add_argument("vae", help="VAE .safetensors")
    p.set_defaults(func=_info)


def _fmt(stats) -> str:
    err = "   n/a" if math.isnan(stats.heldout_error) else f"{stats.heldout_error:.4f}"
    return (f"epoch {stats.epoch:3d}  beta {stats.beta:.3f}  loss {stats.loss:10.3f}  recon {stats.recon:10.3f}  "
            f"kl {stats.kl:8.3f}  active {stats.active:4d}  informative {stats.informative:4d}  held-out error {err}  {stats.seconds:6.1f}s")


def _train(args) -> int:
    from .space import load_space
    from .vae import TrainConfig, WeightsMatrix, save_vae, train_from_space

    check_output(args.out, "--out", args.space, args.weights)
    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError:
        raise ValueError(f"--hidden {args.hidden!r}: write whole numbers separated by commas, e.g. 512,256") from None
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                        warmup_epochs=args.warmup, ramp_epochs=args.ramp, free_bits=args.free_bits,
                        holdout=args.holdout, seed=args.seed, block_rows=args.block_rows, keep_best=args.keep_best)
    if args.input == "weights":
        space = load_space(args.space, 1, training=False)  # its mean and std standardise the weights
    else:  # never hold more PCs than the coefficients need (the released basis has 10,000 columns, 4 GB)
        pcs = args.pcs or min(1000, load_space(args.space, 1, training=False).total_pcs)
        space = load_space(args.space, pcs, training=args.weights is None)
    weights = WeightsMatrix(args.weights, args.key) if args.weights else None

    def progress(step, total, info):
        if info is not None:
            print(_fmt(info), flush=True)

    result = train_from_space(space, input=args.input, pcs=args.pcs, latent=args.latent, hidden=hidden,
                              weights=weights, train=train, whiten=not args.no_whiten, callback=progress)
    save_vae(result.vae, args.out)
    final = result.chosen
    chosen = f" (weights of epoch {result.chosen_epoch}, the lowest held-out error)" if args.keep_best else ""
    print(f"wrote {args.out}{chosen}: {final.active}/{result.vae.latent} latent units active"
          + ("" if math.isnan(final.heldout_error) else f", held-out relative error {final.heldout_error:.4f}"))
    if final.active < result.vae.latent / 2:
        print("note: fewer than half the latent units are active; the data may need fewer units, or lower --beta / "
              "raise --free-bits", file=sys.stderr)
    return 0


def _info(args) -> int:
    from .vae import describe_vae, load_vae

    vae = load_vae(args.vae)
    print_json(describe_vae(vae))
    for stats in vae.history:
        print(_fmt(stats))
    return 0
