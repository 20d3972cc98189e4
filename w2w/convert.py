"""Conversion of the released files (a folder of ``V.pt``, ``mean.pt`` ...) to our single ``.safetensors`` space.

The basis is streamed column block by column block from ``V.pt`` into the output, so it is never held whole; the
edit directions are fitted once (:func:`w2w.edit.fit_directions`) and stored with it.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .edit import fit_directions
from .rawread import torch_file_span, write_columns_t
from .space import FINGERPRINT_PCS, Space, check_release_folder, load_space, release_training_data, save_space
from .stfile import TensorSource

__all__ = ["convert_release"]


def convert_release(folder: str, out: str, *, pcs: int | None = None, dtype: torch.dtype = torch.float32,
                    training: bool = True, directions: bool = True,
                    callback: Callable[[int, int, str], None] | None = None) -> Space:
    """Convert a released-files folder to our format (atomically); returns the written space with ≤ 1000 PCs."""
    if pcs is not None and (isinstance(pcs, bool) or not isinstance(pcs, int) or pcs < 1):
        raise ValueError(f"pcs must be a positive whole number of PCs to keep (or None for all), got {pcs!r}")
    check_release_folder(folder)
    v_path = os.path.join(folder, "V.pt")
    span = torch_file_span(v_path, "V")  # (d, M)
    head = load_space(folder, min(FINGERPRINT_PCS, span.shape[1]), training=False)
    m = span.shape[1] if pcs is None else pcs
    if m > span.shape[1]:
        raise ValueError(f"asked for {m:,} PCs but {v_path} has {span.shape[1]:,}: lower pcs")

    def fill(f, offset: int) -> None:
        progress = None if callback is None else (lambda i, n: callback(i, n, "converting basis"))
        write_columns_t(span, m, dtype, f, offset, progress)

    extra = release_training_data(folder, m) if training else {}
    space = Space(head.components, head.mean, head.std, head.layout, **extra, total_pcs=span.shape[1],
                  source=f"converted from released files ({os.path.basename(os.path.normpath(folder))})",
                  fingerprint=head.fingerprint)
    if directions and space.labels is not None:
        space = fit_directions(space)
    save_space(space, out, dtype=dtype, training=training, components=TensorSource(dtype, (m, span.shape[0]), fill=fill))
    if callback is not None:
        callback(m, m, "done")
    return load_space(out, pcs=min(m, 1000))
