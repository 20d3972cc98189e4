"""An identity: a point of a w2w space (its PCA coefficients) tied to that space by fingerprint."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .safeload import W2WFileError
from .stfile import write_safetensors

__all__ = ["Identity", "IdentityMismatch", "save_identity", "load_identity", "IDENTITY_FORMAT"]

IDENTITY_FORMAT = "w2w-identity"


class IdentityMismatch(ValueError):
    """An identity used with a space it does not belong to."""


@dataclass(frozen=True, eq=False)
class Identity:
    """Coefficients β (k,) float32 of one model in the space whose fingerprint is ``space_fingerprint``."""

    coefficients: torch.Tensor  # (k,) float32, CPU
    space_fingerprint: str
    name: str = ""
    history: tuple[str, ...] = ()  # how it was made, e.g. ("sample seed=5 pcs=1000 factor=1", "edit Male +1")

    def __post_init__(self) -> None:
        c = self.coefficients
        if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.numel() < 1:
            raise ValueError("identity coefficients must be a non-empty 1-D tensor")
        if not torch.isfinite(c).all():
            raise ValueError("identity coefficients contain NaN or Inf")
        object.__setattr__(self, "coefficients", c.detach().to("cpu", torch.float32))
        if not self.space_fingerprint:
            raise ValueError("an identity needs the fingerprint of its space")

    @property
    def pcs(self) -> int:
        return self.coefficients.shape[0]

    def check_space(self, space) -> None:
        if space.fingerprint != self.space_fingerprint:
            raise IdentityMismatch(
                f"identity {self.name or '(unnamed)'} belongs to space {self.space_fingerprint}, not to the loaded "
                f"space {space.fingerprint}: load the space it was made with")
        if self.pcs > space.pcs:
            raise IdentityMismatch(f"identity has {self.pcs:,} coefficients but the space is loaded with {space.pcs:,} "
                                   f"PCs: raise pcs in Load w2w Space to at least {self.pcs:,}")

    def derive(self, coefficients: torch.Tensor, step: str, name: str | None = None) -> "Identity":
        return Identity(coefficients, self.space_fingerprint, self.name if name is None else name, self.history + (step,))


def save_identity(identity: Identity, path: str) -> None:
    """Write ``coefficients`` (float32, (k,)) and metadata to a .safetensors file, atomically."""
    write_safetensors(path, {"coefficients": identity.coefficients.contiguous()}, {
        "format": IDENTITY_FORMAT, "format_version": "1", "space_fingerprint": identity.space_fingerprint,
        "name": identity.name, "history": json.dumps(list(identity.history)),
    })


def load_identity(path: str) -> Identity:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise W2WFileError(f"identity file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != IDENTITY_FORMAT:
                raise W2WFileError(f"{path} is not a w2w identity file (format={meta.get('format')!r})")
            if "coefficients" not in f.keys():
                raise W2WFileError(f"{path} lacks the tensor 'coefficients'")
            coefs = f.get_tensor("coefficients")
        history = json.loads(meta.get("history", "[]"))
        if not isinstance(history, list):
            raise ValueError(f"history must be a JSON list of steps, got {type(history).__name__}")
        history = tuple(str(h) for h in history)
    except SafetensorError as exc:
        raise W2WFileError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {exc}") from None
    except ValueError as exc:
        if isinstance(exc, W2WFileError):
            raise
        raise W2WFileError(f"{path}: malformed identity metadata ({exc})") from None
    if coefs.dim() != 1 or not coefs.is_floating_point():
        raise W2WFileError(f"{path}: coefficients must be a 1-D float tensor, got {tuple(coefs.shape)} {coefs.dtype}")
    try:
        return Identity(coefs, meta.get("space_fingerprint", ""), meta.get("name", ""), history)
    except ValueError as exc:
        raise W2WFileError(f"{path}: {exc}") from None
