"""Sampling new identities (paper §3.2): each PC coefficient ~ Normal(mean_k, factor · std_k) of the training models."""
from __future__ import annotations

import torch

from .identity import Identity
from .space import Space

__all__ = ["sample_identity"]


def sample_identity(space: Space, seed: int, pcs: int = 1000, factor: float = 1.0) -> Identity:
    """A new identity over the first ``pcs`` PCs; the same seed gives the same bytes."""
    if space.coef_mean is None:
        raise ValueError("this space has no sampling statistics (per-PC mean/std of training models): use the "
                         "released files with proj_1000pc.pt, or a space converted/built with training data")
    available = min(space.coef_mean.shape[0], space.pcs)
    if not 1 <= pcs <= available:
        raise ValueError(f"pcs={pcs:,} but this space has sampling statistics for {available:,} PCs: use 1..{available:,}")
    if not factor >= 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    z = torch.randn(pcs, generator=gen, dtype=torch.float32)
    coefs = space.coef_mean[:pcs] + factor * space.coef_std[:pcs] * z
    return Identity(coefs, space.fingerprint, f"sample-{seed}", (f"sample seed={seed} pcs={pcs} factor={factor:g}",))

