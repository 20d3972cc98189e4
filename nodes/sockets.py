"""The pack's socket types, categories and schema helper: what every node file declares its nodes with.

Each custom socket carries its Python type (``SpaceSocket.Type`` is :class:`w2w.space.Space`), as ComfyUI's own custom
types do (``comfy_api.latest._io``), so ``execute`` parameters read typed.

Schema fields newer than the oldest ComfyUI we support (``search_aliases``; the ``advanced`` input flag) are set only
where the running host knows them, so one schema works from 0.3.64 to today's releases.
"""
from __future__ import annotations

import dataclasses
import functools
import math

from comfy_api.latest import io

from ..w2w.identity import Identity
from ..w2w.space import Space
from ..w2w.vae import VAELatent, W2WVAE

# Add Node menu: w2w/<group>.
CATEGORY_SPACE = "w2w/space"
CATEGORY_IDENTITY = "w2w/identity"
CATEGORY_INVERSION = "w2w/inversion"
CATEGORY_VAE = "w2w/vae"
CATEGORY_METRICS = "w2w/metrics"


@io.comfytype(io_type="W2W_SPACE")
class SpaceSocket(io.ComfyTypeIO):
    """A loaded w2w space (basis, statistics, labels, directions)."""

    Type = Space


@io.comfytype(io_type="W2W_IDENTITY")
class IdentitySocket(io.ComfyTypeIO):
    """An identity: coefficients of one model in a space, tied to it by fingerprint."""

    Type = Identity


@io.comfytype(io_type="W2W_VAE")
class VAESocket(io.ComfyTypeIO):
    """A trained, frozen VAE-w2w."""

    Type = W2WVAE


@io.comfytype(io_type="W2W_VAE_LATENT")
class LatentSocket(io.ComfyTypeIO):
    """A latent of one VAE-w2w, tied to it by fingerprint."""

    Type = VAELatent


SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF


def advanced(inp: io.Input) -> io.Input:
    """Mark an input advanced (newer frontends fold it away). Set through ``extra_dict``, which every host merges into
    the input's description; the ``advanced=`` keyword does not exist on older hosts."""
    inp.extra_dict = {**inp.extra_dict, "advanced": True}
    return inp


def schema(**fields) -> io.Schema:
    """``io.Schema(**fields)``, leaving out the fields this host's Schema does not have (e.g. ``search_aliases``)."""
    known = {f.name for f in dataclasses.fields(io.Schema)}
    return io.Schema(**{k: v for k, v in fields.items() if k in known})


def comfyui_version() -> str:
    """The running ComfyUI's version (for messages about what the host offers), or "(unknown version)"."""
    try:
        import comfyui_version as version
    except ImportError:
        return "(unknown version)"
    return str(getattr(version, "__version__", "(unknown version)"))


@functools.lru_cache(maxsize=None)
def _number_ranges(cls) -> dict[str, tuple]:
    return {i.id: (getattr(i, "min", None), getattr(i, "max", None)) for i in cls.define_schema().inputs
            if isinstance(i, (io.Float.Input, io.Int.Input))}


def check_numbers(cls, **values) -> None:
    """ValueError naming the input when a number input of node ``cls`` is NaN, infinite or outside the range its
    schema declares. ComfyUI checks the range when a prompt is queued, but NaN passes that check (it compares False
    both ways) and an API client can send it; it would surface later as NaN images or a bare sampler error."""
    ranges = _number_ranges(cls)
    for name, value in values.items():
        if value is None:
            continue
        low, high = ranges.get(name, (None, None))
        where = f" (from {low} to {high})" if low is not None and high is not None else ""
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{name} must be a finite number{where}, got {value!r}: set {name} on the "
                             f"{cls.__name__} node to a value in its range")
