"""Streaming, atomic writer for .safetensors files (the format: 8-byte header size, JSON header, raw data).

The ``safetensors`` package writes whole tensors from memory; a w2w basis can be larger than we want to hold
twice, so large tensors are given as an iterator of row blocks and written as they come. Files are read back
with the ``safetensors`` package itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = ["TensorSource", "write_safetensors", "atomic_path", "read_format_metadata", "tensors_fingerprint"]

_DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2),
           torch.float64: ("F64", 8), torch.int64: ("I64", 8), torch.int32: ("I32", 4), torch.uint8: ("U8", 1)}


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its dtype and shape, and a function returning its row blocks in order."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[torch.Tensor]] | None = None
    fill: Callable[[object, int], None] | None = None  # fill(file, offset): writes the data itself, seeking freely

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSource":
        tensor = tensor.detach().cpu()
        return cls(tensor.dtype, tuple(tensor.shape), lambda: [tensor])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype][1]


def _umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux); else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class atomic_path:
    """Context manager giving a temporary path beside ``path``; renamed onto it only if the block succeeds.

    The temporary file is hidden and does not end in the destination's extension (``.NAME.XXXX.partial``, NAME cut to
    40 characters so any legal file name works), so folder listings never offer a file being written; it is removed
    whatever fails, the block or the final rename."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __enter__(self) -> str:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"cannot write {self.path}: a folder of that name is there; choose another name")
        fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path)[:40] + ".", suffix=".partial",
                                        dir=directory)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                # mkstemp creates the file readable by its owner only; give it the mode open() would have (0666 less
                # the umask), so other users and services of a shared install can read what the pack writes
                os.chmod(self.tmp, 0o666 & ~_umask())
                os.replace(self.tmp, self.path)
        finally:
            if os.path.lexists(self.tmp):
                os.remove(self.tmp)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor | TensorSource], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (whole, or as :class:`TensorSource` row blocks) to ``path`` atomically."""
    sources = {k: (v if isinstance(v, TensorSource) else TensorSource.of(v)) for k, v in tensors.items()}
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad[:3]}")
        header["__metadata__"] = metadata
    offset = 0
    for name, src in sources.items():
        if src.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {src.dtype} is not supported")
        header[name] = {"dtype": _DTYPES[src.dtype][0], "shape": list(src.shape), "data_offsets": [offset, offset + src.nbytes]}
        offset += src.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        data_start = f.tell()
        for name, src in sources.items():
            if src.fill is not None:
                region = data_start + header[name]["data_offsets"][0]
                f.truncate(region + src.nbytes)
                src.fill(f, region)
                f.seek(region + src.nbytes)
                continue
            written = 0
            for block in src.blocks():
                block = block.detach().to("cpu", src.dtype).contiguous()
                f.write(block.reshape(-1).view(torch.uint8).numpy().tobytes() if block.numel() else b"")
                written += block.numel() * block.element_size()
            if written != src.nbytes:
                raise ValueError(f"tensor {name!r}: blocks gave {written} bytes, shape {src.shape} needs {src.nbytes}")


def read_format_metadata(path: str, fmt: str, what: str, how_to_make: str) -> dict[str, str]:
    """The metadata of the .safetensors file ``path``, checked to be of format ``fmt`` (its ``format`` entry). Errors
    (:class:`w2w.safeload.W2WFileError`) name the file and, for another kind of file, how to make a ``what``."""
    from safetensors import SafetensorError, safe_open

    from .safeload import W2WFileError

    if not os.path.isfile(path):
        raise W2WFileError(f"{what} file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except SafetensorError as exc:
        raise W2WFileError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {exc}") from None
    if meta.get("format") != fmt:
        raise W2WFileError(f"{path} is not a w2w {what} file (format={meta.get('format')!r}); {how_to_make}")
    return meta


def tensors_fingerprint(tensors: dict[str, torch.Tensor], *, prefix: bytes = b"",
                        skip: tuple[str, ...] = ()) -> str:
    """Stable id (16 hex digits) of named tensors: ``prefix``, then each name and its values as float32 bytes, in
    name order; names starting with one of ``skip`` are left out. The same on any thread count or machine."""
    h = hashlib.sha256(prefix)
    for key in sorted(k for k in tensors if not k.startswith(skip)):
        h.update(key.encode())
        h.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
