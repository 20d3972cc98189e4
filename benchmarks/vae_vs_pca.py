"""Held-out reconstruction error of VAE-w2w against PCA at the same size k, side by side in one process.

Two synthetic data sets in the coefficient space of a released-layout w2w space (``--dim`` PCs per model):

- ``manifold``: models on a planted smooth non-linear ``--intrinsic``-dimensional manifold (w2w.synthetic.planted_manifold),
  the case where a non-linear latent space should beat a linear one;
- ``isotropic``: i.i.d. N(0, I) coefficients, no low-dimensional structure, where nothing can beat PCA.

For each k: PCA with k components and a VAE with k latent units are fitted on the same training rows and scored on
the same held-out rows (relative squared error Σ|x - x̂|² / Σ|x - mean|²; the VAE decodes its posterior mean).
Also printed: the VAE's active units (variance of the posterior mean > 0.01), its informative units (mean KL above
0.5 nats: the stricter count), its training time, and the VAE/PCA ratio.

    nice -n 10 python benchmarks/vae_vs_pca.py                 # the full table (k = 16 ... 512), ~15 min on 1 core
    python benchmarks/vae_vs_pca.py --ks 16,32 --epochs 10     # a quick look
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from w2w.synthetic import planted_manifold  # noqa: E402
from w2w.vae import (TrainConfig, VAEConfig, active_units, informative_units,  # noqa: E402
                     pca_reconstruction_error, reconstruction_error, train_vae)


def data(kind: str, args) -> tuple[torch.Tensor, torch.Tensor]:
    n = args.train + args.test
    if kind == "manifold":
        x = planted_manifold(n, args.dim, args.intrinsic, seed=args.seed, features=args.features,
                             frequency=args.frequency)
    elif kind == "isotropic":
        x = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(args.seed))
    else:
        raise ValueError(f"unknown data set {kind!r}: use manifold or isotropic")
    return x[:args.train], x[args.train:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="16,32,64,128,256,512", help="latent sizes / PCA components")
    p.add_argument("--datasets", default="manifold,isotropic")
    p.add_argument("--dim", type=int, default=1000, help="coefficients per model (PCs of the space)")
    p.add_argument("--intrinsic", type=int, default=8, help="dimension of the planted manifold")
    p.add_argument("--features", type=int, default=256, help="linear span of the manifold")
    p.add_argument("--frequency", type=float, default=0.7, help="curvature of the manifold")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", default="512")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=128, warmup_epochs=3, ramp_epochs=8,
                            holdout=0.0, seed=args.seed, threads=args.threads)
    print(f"dim={args.dim} train={args.train} test={args.test} epochs={args.epochs} hidden={hidden} "
          f"lr={args.lr} threads={args.threads}; manifold: intrinsic={args.intrinsic} features={args.features} "
          f"frequency={args.frequency}")
    header = (f"{'data':<10} {'k':>4} {'PCA err':>8} {'VAE err':>8} {'VAE/PCA':>8} {'active':>9} {'informative':>11} "
              f"{'train s':>8}")
    print(header)
    print("-" * len(header))
    for kind in args.datasets.split(","):
        train, test = data(kind, args)
        for k in (int(k) for k in args.ks.split(",")):
            pca = pca_reconstruction_error(train, test, k)
            t0 = time.perf_counter()
            vae = train_vae(train, config=VAEConfig("coefs", args.dim, k, hidden, "benchmark"), train=train_cfg).vae
            seconds = time.perf_counter() - t0
            err = reconstruction_error(vae, test, train.mean(0))
            active, _ = active_units(vae, test)
            informative = informative_units(vae, test)
            print(f"{kind:<10} {k:>4} {pca:>8.4f} {err:>8.4f} {err / pca:>8.3f} {f'{active}/{k}':>9} "
                  f"{f'{informative}/{k}':>11} {seconds:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
