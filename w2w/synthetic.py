"""Synthetic data for tests, benchmarks and the demo stand-in: spaces written in exactly the released file format,
and points on a planted non-linear manifold (for the VAE).

Spaces have the released layout (or any layout), real file names and types, random values. They test mechanics,
never quality: nothing made here is a model of a person.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from .layout import Layout, sd15_layout

__all__ = ["SyntheticRelease", "write_release", "planted_manifold", "DEFAULT_ATTRIBUTES"]

DEFAULT_ATTRIBUTES = ("Male", "Young", "No_Beard", "Eyeglasses", "Chubby", "Blond_Hair", "Bald", "Big_Nose")


@dataclass(frozen=True)
class SyntheticRelease:
    folder: str
    layout: Layout
    pcs: int
    models: int
    attributes: tuple[str, ...]
    planted: torch.Tensor  # (k, A) the directions the labels were generated from


def write_release(folder: str, *, layout: Layout | None = None, pcs: int = 16, models: int = 200,
                  attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES, seed: int = 0, training: bool = True,
                  orthonormal: bool = True, label_values: tuple[int, int] = (-1, 1), weight_scale: float = 1e-3) -> SyntheticRelease:
    """Write V.pt, mean.pt, std.pt, weight_dimensions.pt, adapter_config.json and (``training``) proj_1000pc.pt,
    pinverse_1000pc.pt and identity_df.pt (pandas) into ``folder``, as the released files are laid out."""
    layout = layout or sd15_layout()
    d = layout.dim
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    basis = torch.randn(d, pcs, generator=gen)
    if orthonormal:
        basis = torch.linalg.qr(basis).Q
    else:
        basis /= d ** 0.5
    torch.save(basis.contiguous(), os.path.join(folder, "V.pt"))
    torch.save(torch.randn(d, generator=gen) * weight_scale, os.path.join(folder, "mean.pt"))
    std = torch.rand(d, generator=gen) * weight_scale + weight_scale / 10
    std[:3] = -1e-9  # the released std has a few tiny negative entries from numerics
    torch.save(std, os.path.join(folder, "std.pt"))
    torch.save(layout.to_weight_dimensions(), os.path.join(folder, "weight_dimensions.pt"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": layout.rank, "lora_alpha": layout.alpha,
                   "target_modules": ["to_q", "to_v"], "lora_dropout": 0.0, "bias": "none"}, f, indent=2)
    k = min(pcs, 1000)
    planted = torch.randn(k, len(attributes), generator=gen)
    if training:
        spread = torch.linspace(3.0, 0.5, k)  # decreasing variance per PC, like a PCA
        proj = torch.randn(models, k, generator=gen) * spread
        proj -= proj.mean(0)
        torch.save(proj, os.path.join(folder, "proj_1000pc.pt"))
        torch.save(torch.linalg.pinv(proj), os.path.join(folder, "pinverse_1000pc.pt"))
        score = proj @ planted + 0.5 * torch.randn(models, len(attributes), generator=gen)
        lo, hi = label_values
        labels = torch.where(score > 0, hi, lo).to(torch.int64)
        _write_dataframe(os.path.join(folder, "identity_df.pt"), labels, attributes)
    return SyntheticRelease(folder, layout, pcs, models if training else 0, tuple(attributes), planted)


def _write_dataframe(path: str, labels: torch.Tensor, attributes: tuple[str, ...]) -> None:
    import pandas as pd

    names = [f"model_{i:05d}" for i in range(labels.shape[0])]
    df = pd.DataFrame(labels.numpy(), columns=list(attributes), index=names)
    df["file"] = names
    torch.save(df, path)


def planted_manifold(n: int, dim: int, intrinsic: int, *, seed: int = 0, features: int = 64, frequency: float = 1.0,
                     noise: float = 0.01, spread: torch.Tensor | None = None) -> torch.Tensor:
    """(n, dim) points on a smooth non-linear ``intrinsic``-dimensional manifold: x = sin(z·W + b)·A + noise,
    z ~ N(0, I). Its linear span has ``features`` directions, so PCA needs many more than ``intrinsic`` components
    while a VAE with ``intrinsic`` latent units can represent it. Test and benchmark data, a model of nothing.
    ``spread`` (dim,) rescales the output dimensions (e.g. the decreasing per-PC spread of a w2w space)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(intrinsic, features, generator=gen) * frequency
    b = torch.rand(features, generator=gen) * 2 * math.pi
    a = torch.randn(features, dim, generator=gen) / math.sqrt(features)
    z = torch.randn(n, intrinsic, generator=gen)
    x = torch.sin(z @ w + b) @ a
    x = x + noise * x.std() * torch.randn(n, dim, generator=gen)
    return x * spread if spread is not None else x
