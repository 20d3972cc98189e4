"""Shared builders for core tests: synthetic released-format spaces, built once per session."""
from __future__ import annotations

import os

import torch

from w2w.synthetic import write_release


def released_reference_weights(folder: str, coefs: torch.Tensor) -> torch.Tensor:
    """Weights straight from the released files with plain torch (no w2w code): (β @ V[:, :k].T) * std + mean."""
    V = torch.load(os.path.join(folder, "V.pt"), weights_only=True)
    mean = torch.load(os.path.join(folder, "mean.pt"), weights_only=True)
    std = torch.load(os.path.join(folder, "std.pt"), weights_only=True)
    k = coefs.shape[-1]
    return (coefs.float() @ V[:, :k].T) * std + mean


def released_reference_deltas(folder: str, weights: torch.Tensor, scale: float = 27.0) -> dict[str, torch.Tensor]:
    """ΔW per module the way the released files define it: walk weight_dimensions in order, A then B."""
    dims = torch.load(os.path.join(folder, "weight_dimensions.pt"), weights_only=True)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    offset = 0
    for key, (numel, shape) in dims.items():
        tensor = weights[offset: offset + numel[0]].reshape(shape)
        offset += numel[0]
        module = key.replace("base_model.model.", "").rsplit(".lora_", 1)[0]
        factors.setdefault(module, {})["A" if ".lora_A." in key else "B"] = tensor
    assert offset == weights.shape[0]
    return {m: scale * f["B"] @ f["A"] for m, f in factors.items()}


def make_release(tmp_path_factory, name: str = "release", **kw):
    folder = tmp_path_factory.mktemp(name)
    return write_release(str(folder), **kw)
