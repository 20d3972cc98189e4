"""Read parts of a large row-major matrix from a file with plain reads: no memory map, so the resident set holds
only what is asked for (a memory-mapped strided read keeps every touched page of a 4 GB basis resident).

Works on one tensor of a ``torch.save`` zip (stored uncompressed, as torch writes it), of a ``.safetensors`` file
or of a ``.npy`` file: the ``*_span`` functions find where its data lies without reading it, ``pread_into`` reads any
part of it (positional reads, also on Windows). The space loader and the space builder both read through here.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Callable

import torch

from .safeload import W2WFileError, load_object

__all__ = ["MatrixSpan", "torch_file_span", "safetensors_span", "npy_span", "pread_into", "read_rows", "row_blocks",
           "read_columns_t", "write_columns_t"]

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_NPY_DTYPES = {"f2": torch.float16, "f4": torch.float32, "f8": torch.float64}
_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class MatrixSpan:
    """A C-contiguous 2-D tensor stored at ``offset`` bytes into ``path``."""

    path: str
    offset: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * torch.empty((), dtype=self.dtype).element_size()


def torch_file_span(path: str, name: str) -> MatrixSpan:
    """Where the data of the single 2-D tensor of a ``torch.save`` file lies (found without reading it)."""
    meta = load_object(path, mmap=False, map_location="meta")
    if not isinstance(meta, torch.Tensor) or meta.dim() != 2 or not meta.is_floating_point():
        raise W2WFileError(f"{path} should hold one 2-D float tensor ({name})")
    if not meta.is_contiguous():
        raise W2WFileError(f"{path}: {name} is not a contiguous tensor; re-save it with "
                           "torch.save(tensor.contiguous(), path)")
    itemsize = meta.element_size()
    skip = meta.storage_offset() * itemsize
    try:
        with zipfile.ZipFile(path) as zf:
            entries = [i for i in zf.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
            if len(entries) != 1 or entries[0].compress_type != zipfile.ZIP_STORED:
                raise W2WFileError(f"{path}: expected one uncompressed tensor storage, found {len(entries)}")
            info = entries[0]
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise W2WFileError(f"{path}: damaged zip entry for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + skip
    except zipfile.BadZipFile as exc:
        raise W2WFileError(f"{path} is not a zip-format torch file ({exc}); re-save it with a recent torch") from None
    if info.file_size < skip + meta.numel() * itemsize or offset + meta.numel() * itemsize > os.path.getsize(path):
        raise W2WFileError(f"{path} is truncated: {name} needs {meta.numel() * itemsize:,} bytes")
    return MatrixSpan(path, offset, tuple(meta.shape), meta.dtype)


def safetensors_span(path: str, name: str | None = None) -> MatrixSpan:
    """Where the 2-D float tensor ``name`` of a ``.safetensors`` file lies; ``name=None``: its only 2-D tensor, or
    the one named ``weights``."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise W2WFileError(f"{path} is truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", head)
        if size <= 0 or size > 100 << 20:
            raise W2WFileError(f"{path}: safetensors header of {size:,} bytes is implausible (not a .safetensors "
                               "file, or corrupt)")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise W2WFileError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise W2WFileError(f"{path}: unreadable safetensors header (not a JSON object)")
    if name is None:
        matrices = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                    and isinstance(v.get("shape"), list) and len(v["shape"]) == 2]
        if len(matrices) != 1 and "weights" not in matrices:
            raise W2WFileError(f"{path} holds {len(matrices)} 2-D tensors ({', '.join(matrices[:5])}); a weight "
                               "matrix file holds one, or names it 'weights'")
        name = matrices[0] if len(matrices) == 1 else "weights"
    entry = header.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or len(entry["shape"]) != 2:
        raise W2WFileError(f"{path} lacks a 2-D tensor {name!r}")
    if entry.get("dtype") not in _ST_DTYPES:
        raise W2WFileError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')}; it must be F32, F16, BF16 or F64")
    offsets, shape = entry.get("data_offsets"), entry["shape"]

    def counts(values, n):  # JSON integers >= 0 (not bools, floats or strings)
        return isinstance(values, list) and len(values) == n and all(
            type(v) is int and v >= 0 for v in values)

    if not counts(offsets, 2) or offsets[0] > offsets[1] or not counts(shape, 2):
        raise W2WFileError(f"{path}: tensor {name!r} has a malformed header entry (data_offsets {offsets!r}, shape "
                           f"{shape!r}); the file is corrupt or not a .safetensors file: write it again")
    start, stop = offsets
    dtype = _ST_DTYPES[entry["dtype"]]
    shape = tuple(shape)
    if stop - start != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
        raise W2WFileError(f"{path}: tensor {name!r} has inconsistent offsets")
    offset = 8 + size + start
    if offset + (stop - start) > os.path.getsize(path):
        raise W2WFileError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
    return MatrixSpan(path, offset, shape, dtype)


def npy_span(path: str) -> MatrixSpan:
    """Where the 2-D float array of a ``.npy`` file lies (native byte order, C order)."""
    import numpy as np

    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        except ValueError as exc:
            raise W2WFileError(f"{path} is not a readable .npy file: {exc}") from None
        offset = f.tell()
    if len(shape) != 2:
        raise W2WFileError(f"{path}: the matrix must be 2-D (rows, columns), got shape {shape}")
    if fortran:
        raise W2WFileError(f"{path} is stored in Fortran order; save it with np.save(path, np.ascontiguousarray(a))")
    if dtype.kind != "f" or dtype.byteorder == (">" if np.little_endian else "<") or dtype.str[1:] not in _NPY_DTYPES:
        raise W2WFileError(f"{path}: values must be native-endian float16/32/64, got {dtype}")
    span = MatrixSpan(path, offset, (int(shape[0]), int(shape[1])), _NPY_DTYPES[dtype.str[1:]])
    need = offset + span.shape[0] * span.row_bytes
    if os.path.getsize(path) < need:
        raise W2WFileError(f"{path} is truncated: its matrix needs {need:,} bytes, the file has "
                           f"{os.path.getsize(path):,}")
    return span


def pread_into(path: str, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous CPU ``tensor`` with the bytes at ``offset`` of ``path`` (no memory map); returns it."""
    view = _bytes_of(tensor)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise W2WFileError(f"{path} is truncated: expected {len(view) - got:,} more bytes at byte "
                                   f"{offset + got:,}")
            got += n
    return tensor


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("pread_into needs a contiguous CPU tensor")
    return memoryview(tensor.view(torch.uint8).numpy() if tensor.numel() else bytearray()).cast("B")


def read_rows(span: MatrixSpan, rows: int, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The first ``rows`` rows: one read, or ~64 MB reads with ``progress(rows_done, rows)`` after each (it may raise
    to stop)."""
    out = torch.empty(rows, span.shape[1], dtype=span.dtype)
    if progress is None:
        return pread_into(span.path, span.offset, out)
    block_rows = max(1, _BLOCK_BYTES // max(1, span.row_bytes))
    for start in range(0, rows, block_rows):
        stop = min(rows, start + block_rows)
        pread_into(span.path, span.offset + start * span.row_bytes, out[start:stop])
        progress(stop, rows)
    return out


def row_blocks(span: MatrixSpan):
    """Yield (first row, block (n, columns)) over the whole matrix in one sequential pass of ~64 MB reads.
    The block buffer is reused: copy what you keep."""
    rows_total = span.shape[0]
    block_rows = max(1, _BLOCK_BYTES // max(1, span.row_bytes))
    buf = torch.empty(min(block_rows, rows_total), span.shape[1], dtype=span.dtype)
    for start in range(0, rows_total, block_rows):
        n = min(block_rows, rows_total - start)
        yield start, pread_into(span.path, span.offset + start * span.row_bytes, buf[:n])


def read_columns_t(span: MatrixSpan, cols: int, dtype: torch.dtype | None = None,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The first ``cols`` columns of the matrix, transposed: (cols, rows), in one sequential pass;
    ``progress(rows_done, rows)`` after each block (it may raise to stop)."""
    out = torch.empty(cols, span.shape[0], dtype=dtype or span.dtype)
    for start, block in row_blocks(span):
        out[:, start:start + block.shape[0]] = block[:, :cols].T
        if progress is not None:
            progress(start + block.shape[0], span.shape[0])
    return out


def write_columns_t(span: MatrixSpan, cols: int, dtype: torch.dtype, f, offset: int, progress=None) -> None:
    """Write the first ``cols`` columns transposed, (cols, rows) row-major in ``dtype``, at ``offset`` of the open
    file ``f``: one sequential pass over the source, seeking in the output."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows_total = span.shape[0]
    for start, block in row_blocks(span):
        if progress is not None:
            progress(start, rows_total)
        part = block[:, :cols].T.to(dtype).contiguous()  # (cols, n)
        raw = part.view(torch.uint8) if part.dtype != torch.bfloat16 else part.view(torch.int16).view(torch.uint8)
        data = raw.numpy()
        for j in range(cols):
            f.seek(offset + (j * rows_total + start) * itemsize)
            f.write(data[j].tobytes())
