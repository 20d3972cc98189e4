"""Build a w2w space from a LoRA collection or an N × d weight matrix that may not fit in memory.

Per-weight standardisation Z = (X - mean) / std with mean/std from one streaming pass (float32 block statistics
merged in float64: Chan, Golub & LeVeque 1979), then a randomized truncated SVD of Z (Halko, Martinsson & Tropp
2011) in its block Krylov form (Musco & Musco 2015), streamed over blocks of rows:

- pass 1 (with the statistics): the row sketch ZᵀΩ, Ω a random (N, l) matrix, l = pcs + oversample;
- each of ``power_iters`` passes: Y_j = Z G_j and ZᵀY_j together, block by block; the next block G_{j+1} is
  ZᵀY_j orthonormalised against G_1..G_j (Cholesky QR in float64, twice);
- last pass: Y = Z G_last; a Rayleigh–Ritz step on [Y_1 .. Y_last]ᵀ[Y_1 .. Y_last] (float64) gives the
  components G W, the training coefficients Y W and the explained variances.

So ``power_iters + 2`` passes, float32 matrix products, float64 only for statistics and small factorisations. Rows
are read with plain positional reads into two reused buffers (block i + 1 is read while block i is multiplied), so
the process never maps nor holds the whole matrix; when the matrix fits the memory budget it is read once and cached.

Sources: a folder of LoRA files (kohya, PEFT or diffusers keys; ``.safetensors`` files and PEFT adapter folders),
or one matrix file: ``.npy``, ``.safetensors`` (one 2-D tensor) or ``.pt`` (a tensor saved with ``torch.save``,
such as the released ``all_weights.pt``); :mod:`w2w.rawread` finds the matrix in the file and reads it. Zarr arrays
written by ``python -m w2w to-zarr`` (:class:`w2w.build_dask.ZarrSource`) are read in whole chunks; the same build
on a Dask cluster is :func:`w2w.build_dask.build_space_dask`, which shares the helpers at the end of this module.
"""
from __future__ import annotations

import collections
import dataclasses

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .layout import Layout, LayoutError, ModuleSlot, module_path_from_key, sd15_layout
from .rawread import MatrixSpan, npy_span, pread_into, safetensors_span, torch_file_span
from .safeload import W2WFileError
from .space import Space, load_space, save_space

__all__ = ["BuildConfig", "BuildResult", "BuildError", "RowSource", "ArraySource", "MatrixFileSource",
           "LoraFolderSource", "open_source", "build_space", "read_labels_csv", "attach_labels", "layout_of_lora",
           "load_for_labels", "save_streaming", "lora_layout", "name_rows", "block_krylov", "krylov_basis",
           "check_build_shape", "standardisation", "nonfinite_rows_error", "build_result", "MATRIX_SUFFIXES"]

MATRIX_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")
Callback = Callable[[int, int, str], None]


class BuildError(ValueError):
    """Inputs that cannot make a space: mixed layouts, NaN rows, too few models, bad labels."""


@dataclass(frozen=True)
class BuildConfig:
    """How to build: PCs kept, oversampling and power iterations of the randomized SVD, memory, seed."""

    pcs: int = 1000  # k: principal components kept
    oversample: int | None = None  # extra sketch columns, l = pcs + oversample (default max(10, pcs // 4))
    power_iters: int = 1  # block Krylov iterations on ZᵀZ; each costs one pass and adds pcs + oversample columns
    memory_mb: int = 1024  # budget for row blocks; a matrix smaller than it is read once and kept in memory
    block_rows: int | None = None  # rows per block (default: from memory_mb)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("pcs", "memory_mb"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("oversample", "power_iters"):
            if name == "oversample" and self.oversample is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.block_rows is not None and (not isinstance(self.block_rows, int) or self.block_rows < 1):
            raise ValueError(f"block_rows must be a positive integer or None, got {self.block_rows!r}")

    @property
    def columns(self) -> int:
        """Sketch columns per Krylov block: pcs + oversample."""
        return self.pcs + (max(10, self.pcs // 4) if self.oversample is None else self.oversample)

    @property
    def passes(self) -> int:
        """Passes over the rows: statistics with the first sketch, power_iters Krylov passes, the projection."""
        return self.power_iters + 2


@dataclass(frozen=True, eq=False)
class BuildResult:
    space: Space
    explained_variance: torch.Tensor  # (k,) float64 variance of the standardised weights along each PC
    explained_variance_ratio: torch.Tensor  # (k,) float64, share of the total standardised variance
    total_variance: float
    rows_read: int  # rows read from the source, over all passes
    seconds: float

    def metadata(self) -> dict:
        return {"explained_variance_ratio": [round(float(v), 9) for v in self.explained_variance_ratio],
                "total_variance": self.total_variance}


# ---- sources --------------------------------------------------------------------------------------------
class RowSource:
    """N rows of d float32 weights, read in blocks. ``names`` (N,) label the rows (file names, or row numbers)."""

    shape: tuple[int, int]
    names: tuple[str, ...]
    layout: Layout | None
    description: str
    dtype_bytes: int = 4
    chunk_rows: int = 1  # rows the source stores together (a Zarr chunk): blocks are whole multiples of it

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (b, d) float32 with rows start..start+b and return it."""
        raise NotImplementedError

    def view(self, start: int, stop: int) -> np.ndarray | None:
        """Rows start..stop as a float32 array without copying, if the source is in memory (else None)."""
        return None

    def row_name(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else str(i)


class ArraySource(RowSource):
    """An in-memory (N, d) tensor or array (benchmarks, tests, and callers that already hold the weights)."""

    def __init__(self, matrix, names: Sequence[str] | None = None, layout: Layout | None = None):
        self.matrix = matrix.numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
        if self.matrix.ndim != 2:
            raise BuildError(f"a weight matrix must be 2-D (models, weights), got shape {self.matrix.shape}")
        self.shape = tuple(self.matrix.shape)
        self.names = tuple(names) if names is not None else tuple(str(i) for i in range(self.shape[0]))
        self.layout = layout
        self.description = f"in-memory matrix {self.shape[0]:,} x {self.shape[1]:,}"

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        out[:] = self.matrix[start:start + out.shape[0]]
        return out

    def view(self, start: int, stop: int) -> np.ndarray | None:
        if self.matrix.dtype == np.float32 and self.matrix.flags.c_contiguous:
            return self.matrix[start:stop]
        return None


class MatrixFileSource(RowSource):
    """A C-ordered (N, d) float matrix stored raw in a file (:class:`w2w.rawread.MatrixSpan`), read with positional
    reads (no memory map) and converted to float32 block by block."""

    def __init__(self, span: MatrixSpan, names: Sequence[str] | None = None, layout: Layout | None = None,
                 kind: str = "matrix"):
        self.span = span
        self.path, self.shape = span.path, (int(span.shape[0]), int(span.shape[1]))
        self.dtype_bytes = torch.empty((), dtype=span.dtype).element_size()  # the span finders checked the size
        self.names = tuple(names) if names is not None else tuple(str(i) for i in range(self.shape[0]))
        self.layout = layout
        self.description = f"{kind} {os.path.basename(span.path)} ({self.shape[0]:,} x {self.shape[1]:,})"
        self._scratch: dict[int, torch.Tensor] = {}

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        rows, d = out.shape
        target = torch.from_numpy(out)
        if self.span.dtype == torch.float32 and out.flags.c_contiguous:
            raw = target
        else:  # read raw values into a per-buffer scratch tensor, then convert
            key = out.ctypes.data
            if key not in self._scratch or self._scratch[key].numel() < rows * d:
                self._scratch[key] = torch.empty(rows * d, dtype=self.span.dtype)
            raw = self._scratch[key][: rows * d].view(rows, d)
        pread_into(self.path, self.span.offset + start * self.span.row_bytes, raw)
        if raw is not target:
            target.copy_(raw)
        return out


# ---- LoRA folders ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LoraFile:
    name: str  # row name: file name without extension, or the PEFT folder's name
    path: str  # the tensor file
    config: str | None  # PEFT adapter_config.json beside it


def _repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted (one pass: a folder may hold 65,000 models)."""
    return sorted(name for name, count in collections.Counter(names).items() if count > 1)


def _lora_entries(folder: str) -> list[_LoraFile]:
    entries = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if entry.startswith("."):  # hidden: files being written, an unfinished adapter folder, system files
            continue
        if os.path.isfile(full) and entry.endswith(".safetensors"):
            entries.append(_LoraFile(entry[: -len(".safetensors")], full, None))
        elif os.path.isdir(full):
            for inner in ("adapter_model.safetensors", "adapter_model.bin"):
                if os.path.isfile(os.path.join(full, inner)):
                    config = os.path.join(full, "adapter_config.json")
                    entries.append(_LoraFile(entry, os.path.join(full, inner), config if os.path.isfile(config) else None))
                    break
    twice = _repeated(e.name for e in entries)
    if twice:
        raise BuildError(f"{folder}: two LoRAs share the model name {', '.join(map(repr, twice[:10]))} (a file "
                         "NAME.safetensors and an adapter folder NAME/); labels and names would be ambiguous: rename "
                         "or move one of each pair")
    return entries


def _read_lora(entry: _LoraFile, keys_only: bool = False) -> tuple[dict[str, tuple], dict[str, float]]:
    """{module path: (A, B) tensors or shapes}, {module path: alpha of the file (ΔW = alpha/rank · B @ A)}."""
    raw: dict[str, torch.Tensor | tuple] = {}
    if entry.path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(entry.path, framework="pt") as f:
                meta = f.metadata() or {}
                for key in f.keys():
                    if key.endswith(".alpha") or not keys_only:
                        raw[key] = f.get_tensor(key)
                    else:
                        raw[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as exc:
            raise W2WFileError(f"{entry.path} is not a readable .safetensors LoRA (truncated?): {exc}") from None
    else:
        from .safeload import load_object

        meta = {}
        obj = load_object(entry.path, mmap=False)
        if not isinstance(obj, dict):
            raise W2WFileError(f"{entry.path} does not hold a LoRA state dict")
        raw = {k: (tuple(v.shape) if keys_only and not k.endswith(".alpha") else v) for k, v in obj.items()}
    config_alpha = _peft_alpha(entry.config)
    factors: dict[str, dict[str, object]] = {}
    alphas: dict[str, float] = {}
    for key, value in raw.items():
        if key.endswith(".alpha"):
            alphas[_kohya_module(key)] = float(value)
            continue
        try:
            path, which = module_path_from_key(key)
        except LayoutError as exc:
            raise W2WFileError(f"{entry.path}: {exc}") from None
        factors.setdefault(path, {})[which] = value
    out: dict[str, tuple] = {}
    rank = None
    for path, parts in factors.items():
        if set(parts) != {"A", "B"}:
            raise W2WFileError(f"{entry.path}: module {path} has only its {''.join(parts)} factor")
        out[path] = (parts["A"], parts["B"])
        shape = parts["A"] if isinstance(parts["A"], tuple) else tuple(parts["A"].shape)
        rank = shape[0]
    for path in out:
        if path not in alphas:
            if _key_style(raw) == "diffusers":
                alphas[path] = float(rank)  # diffusers files fold alpha/rank into B
            elif config_alpha is not None:
                alphas[path] = config_alpha
            else:
                alphas[path] = float(meta.get("ss_network_alpha", rank))
    return out, alphas


def _key_style(raw: dict) -> str:
    key = next(k for k in raw if not k.endswith(".alpha"))
    return "kohya" if key.startswith("lora_unet_") else "diffusers" if key.startswith("unet.") else "peft"


def _kohya_module(alpha_key: str) -> str:
    from .layout import _kohya_to_diffusers

    name = alpha_key[: -len(".alpha")]
    return _kohya_to_diffusers(name) if name.startswith("lora_unet_") else name


def _peft_alpha(config: str | None) -> float | None:
    if config is None:
        return None
    try:
        with open(config) as f:
            return float(json.load(f)["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise W2WFileError(f"{config} is not a valid PEFT adapter config (needs lora_alpha): {exc}") from None


def layout_of_lora(factors: dict[str, tuple], alpha: float) -> Layout:
    """The layout of one LoRA: modules in sorted diffusers-path order (the released order for SD1.5), A then B."""
    modules = []
    offset = 0
    ranks = set()
    for path in sorted(factors):
        a, b = factors[path]
        a_shape = a if isinstance(a, tuple) else tuple(a.shape)
        b_shape = b if isinstance(b, tuple) else tuple(b.shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise LayoutError(f"module {path}: factors {a_shape} and {b_shape} are not (rank, in) and (out, rank)")
        ranks.add(a_shape[0])
        modules.append(ModuleSlot(path, a_shape[1], b_shape[0], offset, offset + a_shape[0] * a_shape[1]))
        offset += a_shape[0] * (a_shape[1] + b_shape[0])
    if len(ranks) != 1:
        raise LayoutError(f"modules have different ranks {sorted(ranks)}; one rank per space is supported")
    layout = Layout(tuple(modules), rank=ranks.pop(), alpha=alpha)
    sd15 = sd15_layout(layout.rank, alpha)
    return sd15 if sd15.modules == layout.modules else layout


def _layout_difference(layout: Layout, factors: dict[str, tuple]) -> str | None:
    names = {m.name for m in layout.modules}
    missing, extra = sorted(names - set(factors)), sorted(set(factors) - names)
    if missing or extra:
        parts = ([f"lacks {len(missing)} modules (e.g. {missing[0]})"] if missing else []) + \
                ([f"has {len(extra)} extra modules (e.g. {extra[0]})"] if extra else [])
        return ", ".join(parts)
    for m in layout.modules:
        a, b = factors[m.name]
        a_shape = a if isinstance(a, tuple) else tuple(a.shape)
        b_shape = b if isinstance(b, tuple) else tuple(b.shape)
        if a_shape != (layout.rank, m.in_features) or b_shape != (m.out_features, layout.rank):
            return f"module {m.name} has factors {a_shape}, {b_shape} instead of " \
                   f"{(layout.rank, m.in_features)}, {(m.out_features, layout.rank)}"
    return None


class LoraFolderSource(RowSource):
    """A folder of LoRAs sharing one layout (the first file, in name order, defines it); one row per LoRA.

    Each LoRA is flattened through the layout; B is rescaled so that every row has the first file's alpha
    (kohya ``.alpha`` keys, PEFT ``adapter_config.json``, diffusers files with alpha folded into B all agree on ΔW).
    """

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise W2WFileError(f"{folder} is not a folder")
        self.entries = _lora_entries(folder)
        if not self.entries:
            raise BuildError(f"{folder} holds no LoRA: put .safetensors LoRA files (kohya, PEFT or diffusers keys) "
                             "or PEFT adapter folders (adapter_model.safetensors + adapter_config.json) in it")
        first, alphas = _read_lora(self.entries[0], keys_only=True)
        alpha = next(iter(alphas.values()))
        self.layout = layout_of_lora(first, alpha)
        bad = []
        for entry in self.entries[1:]:
            factors, _ = _read_lora(entry, keys_only=True)
            why = _layout_difference(self.layout, factors)
            if why is not None:
                bad.append(f"{os.path.basename(entry.path) if entry.config is None else entry.name}: {why}")
        if bad:
            raise BuildError(f"{len(bad)} of {len(self.entries)} LoRAs in {folder} do not share the layout of "
                             f"{os.path.basename(self.entries[0].path)} ({len(self.layout.modules)} modules, rank "
                             f"{self.layout.rank}, {self.layout.dim:,} weights): " + "; ".join(bad[:20]) +
                             ("; ..." if len(bad) > 20 else "") + ". Move them to another folder.")
        self.shape = (len(self.entries), self.layout.dim)
        self.names = tuple(e.name for e in self.entries)
        self.description = f"LoRA folder {os.path.basename(os.path.normpath(folder))} ({len(self.entries):,} LoRAs)"

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        for i in range(out.shape[0]):
            entry = self.entries[start + i]
            factors, alphas = _read_lora(entry)
            if _layout_difference(self.layout, factors) is not None:
                raise BuildError(f"{entry.path} changed while the space was being built")
            scaled = {p: (a, b.float() * (alphas[p] / self.layout.alpha)) for p, (a, b) in factors.items()}
            out[i] = self.layout.flatten(scaled).numpy()
        return out


def lora_layout(path: str) -> Layout:
    """The layout of one LoRA file, or of the first LoRA of a folder (for matrices whose rows follow it)."""
    if os.path.isdir(path):
        return LoraFolderSource(path).layout
    if not os.path.isfile(path):
        raise W2WFileError(f"layout LoRA not found: {path}")
    factors, alphas = _read_lora(_LoraFile(os.path.basename(path), path, None), keys_only=True)
    return layout_of_lora(factors, next(iter(alphas.values())))


def open_source(path: str, *, layout: Layout | None = None, names: Sequence[str] | None = None) -> RowSource:
    """A folder of LoRAs, or one matrix file (.npy, .safetensors, .pt) — never loaded whole. (Zarr arrays:
    :func:`w2w.build_dask.open_rows`.)"""
    path = os.fspath(path)
    if os.path.isdir(path):
        if names is not None:
            raise BuildError("row names come from the file names of a LoRA folder; do not pass names")
        return LoraFolderSource(path)
    if not os.path.isfile(path):
        raise W2WFileError(f"source not found: {path}. Give a folder of LoRAs or an N x d matrix file "
                           f"({', '.join(MATRIX_SUFFIXES)})")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        source = MatrixFileSource(npy_span(path), kind="npy matrix")
    elif suffix == ".safetensors":
        source = MatrixFileSource(safetensors_span(path), kind="safetensors matrix")
    elif suffix in (".pt", ".pth"):
        source = MatrixFileSource(torch_file_span(path, "weight matrix"), kind="torch matrix")
    else:
        raise W2WFileError(f"{path}: unknown matrix format {suffix!r}; use {', '.join(MATRIX_SUFFIXES)} or a LoRA folder")
    return name_rows(source, path, names, layout)


def name_rows(source: RowSource, path: str, names: Sequence[str] | None, layout: Layout | None) -> RowSource:
    """Give a matrix source its row names (default: kept) and layout (default: SD1.5 when the width matches)."""
    n, d = source.shape
    if names is not None:
        if len(names) != n:
            raise BuildError(f"{len(names):,} row names for a matrix of {n:,} rows")
        twice = _repeated(names)
        if twice:
            raise BuildError(f"row names appear more than once ({', '.join(map(repr, twice[:10]))}); each model "
                             "needs its own name, as labels are keyed by it")
        source.names = tuple(names)
    source.layout = layout if layout is not None else (sd15_layout() if d == sd15_layout().dim else None)
    if source.layout is None:
        raise BuildError(f"{path} has {d:,} weights per row, not the {sd15_layout().dim:,} of the SD1.5 w2w layout: "
                         "give the layout (`--layout LORA`: a LoRA file or folder whose layout the rows follow)")
    if source.layout.dim != d:
        raise LayoutError(f"{path} has {d:,} weights per row; the layout given has {source.layout.dim:,}")
    return source


# ---- streaming passes -----------------------------------------------------------------------------------
class _Rows:
    """Blocks of standardised rows Z_b = (X_b - mean) / std: read double-buffered, viewed, or from a cache."""

    def __init__(self, source: RowSource, block: int, callback: Callback | None, total_steps: int):
        self.source, self.block = source, block
        self.callback, self.total_steps, self.step = callback, total_steps, 0
        self.buffers: list[np.ndarray] = []
        self.zbuffer: torch.Tensor | None = None
        self.cache: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None  # (d,) float32 mean
        self.scale: torch.Tensor | None = None  # (d,) float32 1/std (0 for constant weights)
        self.rows_read = 0

    def raw_blocks(self, what: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Raw rows; they may be views of the source (never modify them)."""
        n, d = self.source.shape
        starts = list(range(0, n, self.block))
        if self.source.view(0, 1) is not None:
            for start in starts:
                self._progress(what)
                x = self.source.view(start, min(n, start + self.block))
                self.rows_read += x.shape[0]
                yield start, torch.from_numpy(x)
            return
        if not self.buffers:
            self.buffers = [np.empty((min(self.block, n), d), np.float32) for _ in range(min(2, len(starts)))]

        def load(i: int) -> np.ndarray:
            buf = self.buffers[i % len(self.buffers)][: min(self.block, n - starts[i])]
            return self.source.read(starts[i], buf)

        with ThreadPoolExecutor(1) as pool:  # reads block i + 1 while block i is multiplied
            pending = pool.submit(load, 0)
            for i, start in enumerate(starts):
                self._progress(what)
                x = pending.result()
                if i + 1 < len(starts):
                    pending = pool.submit(load, i + 1)
                self.rows_read += x.shape[0]
                yield start, torch.from_numpy(x)

    def blocks(self, what: str) -> Iterator[tuple[int, torch.Tensor]]:
        if self.cache is not None:
            for start in range(0, self.cache.shape[0], self.block):
                self._progress(what)
                yield start, self.cache[start:start + self.block]
            return
        for start, x in self.raw_blocks(what):
            if self.buffers:  # our own buffer: standardise in place
                yield start, x.sub_(self.shift).mul_(self.scale)
                continue
            if self.zbuffer is None:
                self.zbuffer = torch.empty(min(self.block, self.source.shape[0]), x.shape[1])
            yield start, torch.sub(x, self.shift, out=self.zbuffer[: x.shape[0]]).mul_(self.scale)

    def _progress(self, what: str) -> None:
        if self.callback is not None:
            self.callback(self.step, self.total_steps, what)
        self.step += 1


_CHUNK_ROWS = 256  # at most this many rows squared at a time in the statistics pass


def _statistics(rows: _Rows, keep: bool, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-weight mean and std (ddof 1) — float32 block statistics merged in float64 (Chan et al.) — and the
    row-space sketch (X - mean)ᵀ Ω in the same pass. With ``keep`` the centred rows are cached. Rejects NaN/Inf rows."""
    n_total, d = rows.source.shape
    mean = torch.zeros(d, dtype=torch.float64)
    m2 = torch.zeros(d, dtype=torch.float64)
    sketch = torch.zeros(d, omega.shape[1])
    count = 0
    bad: list[int] = []
    cache = torch.empty(n_total, d) if keep else None
    block_means: list[tuple[int, int, torch.Tensor]] = []
    chunk = max(1, min(_CHUNK_ROWS, rows.block // 4, n_total))  # two chunks: half a block of scratch
    centred_chunk, square_chunk = torch.empty(chunk, d), torch.empty(chunk, d)
    ones = torch.ones(1, max(chunk, min(rows.block, n_total)))
    for start, x in rows.raw_blocks("statistics"):
        b = x.shape[0]
        block_mean = (ones[:, :b] @ x).squeeze(0).div_(b)  # column sums as a matrix product: fast on any CPU
        block_m2 = torch.zeros(d)
        for c in range(0, b, chunk):
            stop = min(b, c + chunk)
            target = cache[start + c:start + stop] if cache is not None else centred_chunk[: stop - c]
            centred = torch.sub(x[c:stop], block_mean, out=target)
            square = torch.mul(centred, centred, out=square_chunk[: stop - c])
            block_m2 += (ones[:, : stop - c] @ square).squeeze(0)
        if not bool(torch.isfinite(block_m2).all()):  # NaN/Inf anywhere in a column makes its sum non-finite
            nonfinite = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten()
            if len(nonfinite):
                bad.extend(start + int(i) for i in nonfinite)
                continue
            block_mean, block_m2 = _float64_moments(x, chunk)  # finite weights whose squares overflow float32
            if cache is not None:
                torch.sub(x, block_mean, out=cache[start:start + b])
        sketch.addmm_(x.T, omega[start:start + b])
        if cache is not None:
            block_means.append((start, b, block_mean))
        delta = block_mean.double() - mean
        total = count + b
        mean += delta * (b / total)
        m2 += block_m2.double() + delta.square() * (count * b / total)
        count = total
    del centred_chunk, square_chunk
    if bad:
        raise nonfinite_rows_error(rows.source, bad)
    mean32 = mean.float()
    sketch.addr_(mean32, omega.sum(0, dtype=torch.float64).float(), alpha=-1.0)  # Xᵀ Ω - mean ⊗ Σ Ω
    for start, b, block_mean in block_means:  # cached rows were centred on their block's mean
        cache[start:start + b].add_(block_mean - mean32)
    rows.cache = cache
    return mean, (m2 / max(1, count - 1)).sqrt(), sketch


def _float64_moments(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and sum of squared deviations of a block, in float64 a chunk of rows at a time: for weights above
    about 1e19, whose squares (or sums) overflow float32."""
    mean = x.sum(0, dtype=torch.float64) / x.shape[0]
    m2 = torch.zeros(x.shape[1], dtype=torch.float64)
    for c in range(0, x.shape[0], chunk):
        m2 += (x[c:c + chunk].double() - mean).square_().sum(0)
    return mean.float(), m2


@contextmanager
def _one_thread():
    """Small LAPACK factorisations run single-threaded: on a busy CPU, threaded ones can be 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orthonormal(h: torch.Tensor, previous: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """An orthonormal basis of span(h) orthogonal to the orthonormal ``previous`` blocks: block Gram–Schmidt and
    Cholesky QR (factor in float64), twice (CholeskyQR2); Householder QR if h is rank-deficient."""
    for sweep in range(2):
        for q in previous:
            h = h - q @ (q.T @ h)
        hd = h.double()
        gram = hd.T @ hd if sweep == 0 else (h.T @ h).double()  # the second sweep sees a well-conditioned h
        with _one_thread():
            chol, info = torch.linalg.cholesky_ex(gram)
            inverse = torch.linalg.inv(chol).T.float() if int(info) == 0 else None
        if inverse is not None:
            h = h @ inverse
        else:
            h = torch.linalg.qr(hd).Q.float()
    return h


def _krylov_step(rows: _Rows, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One pass: Y = Z G (written into y, (N, l)) and the returned H = Zᵀ Y = ZᵀZ G (d, l), block by block."""
    h = torch.zeros(g.shape)
    for start, z in rows.blocks("krylov"):
        yb = y[start:start + z.shape[0]]
        yb.copy_(z @ g)
        h.addmm_(z.T, yb)
    return h


def _project(rows: _Rows, g: torch.Tensor, y: torch.Tensor) -> None:
    """Y = Z G written into y (N, l), one pass."""
    for start, z in rows.blocks("projection"):
        y[start:start + z.shape[0]].copy_(z @ g)


def _block_rows(config: BuildConfig, n: int, d: int, l: int, chunk_rows: int = 1) -> int:
    if config.block_rows is not None:
        return min(n, config.block_rows)
    per_row = 4 * (5 * d // 2 + 2 * l)  # two read buffers, statistics scratch, the block's sketch and projection
    rows = max(1, min(n, (config.memory_mb << 20) // per_row))
    return rows - rows % chunk_rows if chunk_rows <= rows < n else rows  # a block never ends inside a chunk


def _rayleigh_ritz(g: torch.Tensor, y: torch.Tensor, k: int, block: int):
    """Best rank-k approximation within span(G) (G orthonormal, Y = Z G): components (k, d), coefficients (N, k) and
    the squared singular values, from the eigenvectors of YᵀY (float64)."""
    gram = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64)
    for s in range(0, y.shape[0], block):
        yb = y[s:s + block].double()
        gram.addmm_(yb.T, yb)
    with _one_thread():
        evals, w = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)[:k]
    w = w[:, order].float()  # (L, k)
    components = (g @ w).T  # (k, d)
    coefs = y @ w  # (N, k)
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1  # the largest entry of each component is positive: deterministic signs
    return components * signs[:, None], coefs * signs[None, :], evals[order].clamp_min(0)


def build_space(source: RowSource, config: BuildConfig = BuildConfig(), *, callback: Callback | None = None,
                base_model: str = "SD1.5") -> BuildResult:
    """Standardise the rows of ``source`` and keep their first ``config.pcs`` principal components.

    Block Krylov iteration (Musco & Musco 2015) on the standardised rows Z, started from the row sketch ZᵀΩ that
    the statistics pass computes: G₁ = orth(ZᵀΩ), G_{j+1} = orth(ZᵀZ G_j ⟂ G_1..G_j), then Rayleigh–Ritz on
    span(G_1..G_{q+1}) with Y = Z [G_1..G_{q+1}] (see module doc). ``power_iters + 2`` passes over the rows.
    """
    t0 = time.perf_counter()
    n, d = source.shape
    check_build_shape(source, config)
    k = config.pcs
    l = min(config.columns, d)
    block = _block_rows(config, n, d, l, source.chunk_rows)
    keep = n * d * 4 <= (config.memory_mb << 20)
    rows = _Rows(source, block, callback, math.ceil(n / block) * config.passes)
    gen = torch.Generator().manual_seed(config.seed)
    omega = torch.randn(n, l, generator=gen)
    omega -= omega.mean(0)
    mean, std, sketch = _statistics(rows, keep, omega)
    del omega
    std, rows.shift, rows.scale, constant = standardisation(mean, std)
    if rows.cache is not None:  # already centred by _statistics
        rows.cache.mul_(rows.scale)
    g = krylov_basis(sketch.mul_(rows.scale[:, None]), config.power_iters)
    del sketch
    components, coefs, eigenvalues = block_krylov(g, n, l, k, block,
                                                  krylov_pass=lambda gj, yj: _krylov_step(rows, gj, yj),
                                                  projection_pass=lambda gj, yj: _project(rows, gj, yj))
    del g
    if callback is not None:
        callback(rows.step, rows.total_steps, "done")
    return build_result(source, mean, std, constant, components, coefs, eigenvalues, rows.rows_read, t0, base_model)


# ---- shared by the engines (this module's streaming passes, and w2w.build_dask) ----------------------------
def krylov_basis(sketch: torch.Tensor, power_iters: int) -> torch.Tensor:
    """The Krylov basis (d, (power_iters + 1)·l) to fill, its first block the orthonormalised row sketch (d, l)."""
    d, l = sketch.shape
    g = torch.empty(d, (power_iters + 1) * l)  # [G_1 .. G_{q+1}]
    g[:, :l] = _orthonormal(sketch)
    return g


def block_krylov(g: torch.Tensor, n: int, l: int, k: int, block: int, *,
                 krylov_pass: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 projection_pass: Callable[[torch.Tensor, torch.Tensor], None]):
    """Block Krylov iteration on ZᵀZ from the basis of :func:`krylov_basis`, then Rayleigh–Ritz: components (k, d),
    coefficients (N, k) = Z componentsᵀ and the eigenvalues (k,) of ZᵀZ. The engine does the passes over Z:
    ``krylov_pass(G_j, Y_j)`` writes Y_j = Z G_j into Y_j (N, l) and returns ZᵀY_j (d, l); ``projection_pass(G, Y)``
    writes Y = Z G. One Krylov pass per block after the first, then one projection pass."""
    blocks = g.shape[1] // l
    y = torch.empty(n, blocks * l)  # Z [G_1 .. G_{q+1}]
    for j in range(blocks - 1):
        current = slice(j * l, (j + 1) * l)
        h = krylov_pass(g[:, current], y[:, current])
        g[:, (j + 1) * l:(j + 2) * l] = _orthonormal(h, [g[:, :(j + 1) * l]])
        del h
    projection_pass(g[:, -l:], y[:, -l:])
    return _rayleigh_ritz(g, y, k, block)


def check_build_shape(source: RowSource, config: BuildConfig) -> None:
    """Reject a source that cannot give ``config.pcs`` PCs (too few models, no layout of its width)."""
    n, d = source.shape
    if source.layout is None or source.layout.dim != d:
        raise LayoutError(f"{source.description}: a layout with {d:,} weights is needed")
    if n < 2:
        raise BuildError(f"{source.description} has {n} model(s); a space needs at least 2")
    if config.pcs > min(n - 1, d):
        raise BuildError(f"asked for {config.pcs:,} PCs but {n:,} models of {d:,} weights give at most "
                         f"{min(n - 1, d):,}: lower pcs")
    width = min(config.columns, d)
    if config.power_iters and (config.power_iters + 1) * width > d:
        # the Krylov basis [G_1 .. G_{q+1}] cannot have more orthonormal columns than the weights it spans
        most = max(0, d // width - 1)
        raise BuildError(f"{config.power_iters} Krylov iteration(s) of {width:,} columns (pcs + oversample) need "
                         f"{(config.power_iters + 1) * width:,} directions but a model has {d:,} weights: use "
                         f"power_iters {most} (--power-iters {most}) or fewer pcs/oversample")


def standardisation(mean: torch.Tensor, std: torch.Tensor):
    """From float64 per-weight mean and std: (std with constant weights set to 0, shift (d,) float32 = mean,
    scale (d,) float32 = 1/std or 0 for constant weights, constant (d,) bool). Z = (X - shift) * scale."""
    constant = std <= 1e-6 * mean.abs()
    std = torch.where(constant, torch.zeros_like(std), std)
    scale = torch.where(constant, torch.zeros_like(std), 1.0 / std.clamp_min(1e-300)).float()
    return std, mean.float(), scale, constant


def nonfinite_rows_error(source: RowSource, bad: Sequence[int]) -> BuildError:
    """The error naming the models (rows) that hold NaN or Inf weights."""
    names = ", ".join(f"row {i} ({source.row_name(i)})" for i in bad[:10])
    return BuildError(f"{len(bad):,} of {source.shape[0]:,} models contain NaN or Inf weights: {names}"
                      f"{', ...' if len(bad) > 10 else ''}. Remove or repair them.")


def build_result(source: RowSource, mean: torch.Tensor, std: torch.Tensor, constant: torch.Tensor,
                 components: torch.Tensor, coefs: torch.Tensor, eigenvalues: torch.Tensor, rows_read: int,
                 started: float, base_model: str) -> BuildResult:
    """The space and its explained variances from a finished decomposition (shared by every engine):
    components (k, d), training coefficients (N, k) = Z componentsᵀ, eigenvalues (k,) of ZᵀZ."""
    n = source.shape[0]
    variance = eigenvalues / (n - 1)
    total = float((~constant).sum())
    coefs32 = coefs.float()
    space = Space(components.float().contiguous(), mean.float(), std.float(), source.layout,
                  coef_mean=coefs32.mean(0), coef_std=coefs32.std(0), train_coefs=coefs32,
                  train_names=tuple(source.names), base_model=base_model, source=f"built from {source.description}")
    return BuildResult(space, variance, variance / max(total, 1.0), total, rows_read, time.perf_counter() - started)


# ---- labels ---------------------------------------------------------------------------------------------
_KEY_COLUMNS = ("file", "name", "filename", "model")


def read_labels_csv(path: str, names: Sequence[str]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Labels (N, A) float32 and attribute names from a CSV: one row per training model, in build order, or keyed
    by a file-name column (``file``, ``name``, ``filename`` or ``model``; extensions are ignored)."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("reading a labels CSV needs pandas: pip install pandas") from exc
    from .space import labels_from_dataframe

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise W2WFileError(f"labels file {path} could not be read as CSV: {exc}") from None
    key = next((c for c in df.columns if str(c).strip().lower() in _KEY_COLUMNS), None)
    if key is None and len(df.columns) and not _is_number_column(df[df.columns[0]]):
        key = df.columns[0]
    n = len(names)
    if key is None:
        if len(df) != n:
            raise BuildError(f"{path} has {len(df):,} label rows but the space has {n:,} training models; give one "
                             "row per model in build order, or add a 'file' column with the model file names")
    else:
        keys = [_strip_ext(str(v)) for v in df[key]]
        dupes = _repeated(keys)
        if dupes:
            raise BuildError(f"{path}: models listed twice in column {key!r}: {', '.join(dupes[:10])}")
        known = set(names)
        missing = [m for m in names if m not in set(keys)]
        extra = [k for k in keys if k not in known]
        if missing or extra:
            msg = []
            if missing:
                msg.append(f"{len(missing):,} training models have no label row (e.g. {', '.join(missing[:5])})")
            if extra:
                msg.append(f"{len(extra):,} label rows name no training model (e.g. {', '.join(extra[:5])})")
            raise BuildError(f"{path}: " + "; ".join(msg) + f". Column {key!r} must list each model's file name once.")
        df = df.assign(**{str(key): keys}).set_index(str(key)).loc[list(names)].reset_index(drop=True)
    if key is not None and key in df.columns:
        df = df.drop(columns=[key])
    non_numeric = [str(c) for c in df.columns if not _is_number_column(df[c])]
    if non_numeric:
        raise BuildError(f"{path}: columns {', '.join(non_numeric)} are not numeric; labels are numbers (0/1, -1/1, "
                         "or real values) and only one file-name column is allowed")
    _, labels, attributes = labels_from_dataframe(df, path)
    return labels, attributes


def _is_number_column(column) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column))


def _strip_ext(name: str) -> str:
    base = os.path.basename(name.rstrip("/"))
    for ext in (".safetensors", ".bin", ".pt", ".ckpt"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def attach_labels(space: Space, labels: torch.Tensor, attributes: Sequence[str]) -> Space:
    """A copy of ``space`` carrying training labels (N rows, same order as its training coefficients)."""
    if space.train_coefs is None:
        raise BuildError("this space has no training coefficients; labels can only be attached to a built space")
    return dataclasses.replace(space, labels=labels, attribute_names=tuple(attributes), directions={})


def load_for_labels(path: str) -> Space:
    """A space with only the PCs its fingerprint needs (the rest is streamed back when saving)."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise W2WFileError(f"{path} is a folder (released files?); directions are fitted into a space .safetensors "
                           "written by `python -m w2w build` (the released files carry their own labels)")
    if not os.path.isfile(path):
        raise W2WFileError(f"space not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            total = f.get_slice("components").get_shape()[0] if "components" in f.keys() else 1
    except (SafetensorError, OSError) as exc:
        raise W2WFileError(f"{path} is not a readable .safetensors space (truncated or corrupt?): {exc}") from None
    return load_space(path, pcs=min(8, total))


def save_streaming(space: Space, source_path: str, out: str) -> None:
    """Save ``space`` (loaded with few PCs) with every PC of ``source_path`` streamed across, keeping its metadata."""
    from safetensors import safe_open

    from .space import FORMAT
    from .stfile import TensorSource

    with safe_open(source_path, framework="pt") as f:
        meta = f.metadata() or {}
        comp = f.get_slice("components")
        shape = tuple(comp.get_shape())
        dtype = {"F32": torch.float32, "F16": torch.float16}[comp.get_dtype()]
    own = {"format", "format_version", "base_model", "layout", "fingerprint", "source", "attributes", "train_names",
           "directions"}
    extra = {k: v for k, v in meta.items() if k not in own}

    def blocks() -> Iterator[torch.Tensor]:
        with safe_open(source_path, framework="pt") as f:
            sl = f.get_slice("components")
            for start in range(0, shape[0], 256):
                yield sl[start:min(shape[0], start + 256)]

    if meta.get("format") != FORMAT:
        raise W2WFileError(f"{source_path} is not a w2w space file")
    save_space(space, out, dtype=dtype, components=TensorSource(dtype, shape, blocks), extra_metadata=extra)
