"""The only place that reads pickled files. Nothing here ever runs code from a file.

Tensors and plain containers go through ``torch.load(weights_only=True)`` (memory-mapped when possible).
The released ``identity_df.pt`` is a pickled pandas DataFrame: it is read by an unpickler that resolves only an
explicit allow-list of the pandas/numpy globals a DataFrame needs and refuses every other global.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import warnings
import zipfile

import torch

__all__ = ["W2WFileError", "load_tensor", "load_object", "load_dataframe", "DATAFRAME_GLOBALS"]


class W2WFileError(ValueError):
    """A file that cannot be used: missing, truncated, unsafe, or of the wrong shape or content."""


def _describe(path: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        return path
    return f"{path} ({size:,} bytes)"


def _sniff(path: str) -> None:
    """Refuse, by its first bytes, a file that is neither a torch zip nor a pickle: what a failed or incomplete
    download leaves (an empty file, a Git LFS pointer, an HTML page), named as such."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise W2WFileError(f"{path} is empty (an interrupted download?). Download it again.")
    if head.startswith(b"version https://git-lfs"):
        raise W2WFileError(f"{_describe(path)} is a Git LFS pointer, not the file itself (the repository was cloned "
                           "without LFS): fetch the real file with `git lfs pull` or `python -m w2w download`.")
    if head.lstrip()[:1] == b"<":
        raise W2WFileError(f"{_describe(path)} is an HTML or XML page, not a torch file (a failed download: an error "
                           "or login page). Download it again.")
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise W2WFileError(f"{_describe(path)} is not a torch file (neither a torch zip nor a pickle; first bytes "
                           f"{head[:8]!r}). Download it again.")


def load_object(path: str, *, mmap: bool = True, map_location: str = "cpu"):
    """``torch.load`` restricted to tensors and plain containers; clear errors for unsafe or broken files."""
    if not os.path.isfile(path):
        raise W2WFileError(f"file not found: {path}")
    _sniff(path)
    errors = []
    for use_mmap in ((True, False) if mmap else (False,)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
        except pickle.UnpicklingError as exc:
            raise W2WFileError(
                f"{_describe(path)} holds pickled objects other than tensors and plain containers; it was refused "
                f"without running any of it ({_unsafe_reason(exc)}). Use the released file as downloaded, or convert "
                "it to .safetensors with `python -m w2w convert`.") from None
        except Exception as exc:  # a damaged file raises many kinds of errors (RuntimeError, EOFError, KeyError...)
            errors.append(exc)
            if use_mmap and "mmap" in str(exc).lower():
                continue  # legacy (non-zip) torch file: retry without memory-mapping
            break
    raise W2WFileError(f"{_describe(path)} could not be read as a torch file (truncated or corrupt?): "
                       f"{_first_line(errors[-1])}. Download it again.") from None


def _unsafe_reason(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if "global" in line.lower() and "weights_only" not in line:
            return line.strip()
    return "it needs globals outside torch's weights-only allow-list"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_tensor(path: str, *, ndim: int, name: str, mmap: bool = True) -> torch.Tensor:
    """Load one tensor with a known number of dimensions (memory-mapped: slicing it reads only what is used)."""
    obj = load_object(path, mmap=mmap)
    if not isinstance(obj, torch.Tensor):
        raise W2WFileError(f"{_describe(path)} should hold the tensor {name!r} but holds a {type(obj).__name__}")
    if obj.dim() != ndim:
        raise W2WFileError(f"{_describe(path)}: {name} should have {ndim} dimensions, has shape {tuple(obj.shape)}")
    if not obj.is_floating_point():
        raise W2WFileError(f"{_describe(path)}: {name} should be floating point, is {obj.dtype}")
    return obj


# (module, name) pairs a pickled DataFrame of numbers, booleans and strings may reference, across
# pandas 1.x-3.x and numpy 1.x-2.x. Everything else is refused.
DATAFRAME_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("pandas", "DataFrame"), ("pandas.core.frame", "DataFrame"),
    ("pandas", "Series"), ("pandas.core.series", "Series"),
    ("pandas", "Index"), ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas", "RangeIndex"), ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.internals", "BlockPlacement"),
    ("pandas.core.internals.blocks", "new_block"),
    ("pandas", "StringDtype"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.arrays", "StringArray"), ("pandas.core.arrays.string_", "StringArray"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "slice"), ("__builtin__", "slice"), ("_codecs", "encode"),
    ("copyreg", "_reconstructor"), ("builtins", "object"), ("__builtin__", "object"),
})
_DTYPE_CLASSES_MODULES = ("numpy.dtypes",)  # numpy 2 pickles dtypes as numpy.dtypes.<Kind>DType


class _DataFrameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in DATAFRAME_GLOBALS or (module in _DTYPE_CLASSES_MODULES and name.endswith("DType"))
        if not allowed:
            raise W2WFileError(f"refused to load global {module}.{name}: a DataFrame of labels never needs it "
                               "(the file may be malicious); nothing from it was run")
        if module == "__builtin__":
            module = "builtins"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                if module.startswith("numpy.core"):
                    return getattr(importlib.import_module("numpy._core" + module[len("numpy.core"):]), name)
                raise

    def persistent_load(self, pid):
        raise W2WFileError("the DataFrame file references torch storages; a label table never does")


def load_dataframe(path: str):
    """Read a pickled pandas DataFrame (plain pickle or ``torch.save`` zip) through the allow-listed unpickler."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("reading identity_df.pt needs pandas: pip install pandas") from exc
    if not os.path.isfile(path):
        raise W2WFileError(f"file not found: {path}")
    _sniff(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(names) != 1:
                    raise W2WFileError(f"{_describe(path)} is a zip without a single data.pkl")
                raw = zf.read(names[0])
        except zipfile.BadZipFile as exc:
            raise W2WFileError(f"{_describe(path)} is a truncated or corrupt zip: {exc}") from None
    try:
        obj = _DataFrameUnpickler(io.BytesIO(raw)).load()
    except W2WFileError as exc:
        raise W2WFileError(f"{_describe(path)}: {exc}") from None
    except Exception as exc:  # malformed pickles raise many kinds of errors
        raise W2WFileError(f"{_describe(path)} is not a readable DataFrame pickle (truncated?): "
                           f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(obj, pd.DataFrame):
        raise W2WFileError(f"{_describe(path)} should hold a pandas DataFrame, holds a {type(obj).__name__}")
    return obj
