"""Build a space on a Dask cluster: the algorithm, standardisation and file of :func:`w2w.build.build_space`, with
every pass over the rows run by ``dask.array`` on ``dask.distributed`` workers reading a row-chunked Zarr array.

- :func:`write_zarr` (``python -m w2w to-zarr``): any build source (LoRA folder, ``.npy``/``.pt``/``.safetensors``
  matrix) to a Zarr group once, block by block: array ``weights`` (N, d) float32 in chunks of (rows, d), and the
  row names, layout and origin as attributes. Written into a temporary folder beside the target, then renamed.
- :class:`ZarrSource`: such a group (or any 2-D float Zarr array) as a :class:`w2w.build.RowSource`, so the
  single-machine engine reads it too; the Dask engine takes its path, names and layout from it.
- :func:`build_space_dask`: pass 1 is one graph giving the per-weight mean and variance (float64 accumulation),
  Xᵀ Ω and Σ Ω (Ω drawn chunk by chunk on the workers), hence the row sketch ZᵀΩ = (XᵀΩ − mean ⊗ ΣΩ)·scale;
  each block Krylov pass is one graph giving Y_j = Z G_j and ZᵀY_j together (G_j scattered to every worker); the
  last pass gives Y = Z G. The small factorisations run on the client, in :func:`w2w.build.block_krylov`:
  ``power_iters + 2`` passes, as on one machine. ``algorithm="svd_compressed"`` runs
  ``dask.array.linalg.svd_compressed`` on the lazily standardised Z instead (``2·power_iters + 4`` passes: see
  docs/building-on-dask.md for the measured comparison).

dask, distributed and zarr are optional (``pip install -r requirements-dask.txt`` or ``pip install ".[dask]"``) and
imported only inside these functions. The workers run only dask, numpy and zarr code (and :mod:`w2w.procstat`):
they never import torch.
"""
from __future__ import annotations

import importlib
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from . import procstat
from .build import (BuildConfig, BuildError, BuildResult, Callback, RowSource, _Rows, block_krylov, build_result,
                    check_build_shape, krylov_basis, name_rows, nonfinite_rows_error, open_source,
                    standardisation)
from .layout import Layout, LayoutError
from .safeload import W2WFileError

__all__ = ["INSTALL_HINT", "require_dask", "is_zarr", "open_rows", "ZarrSource", "write_zarr", "dask_client", "build_space_dask",
           "DaskBuildResult", "ClusterError", "check_dask_source", "ZARR_ARRAY", "ALGORITHMS"]

INSTALL_HINT = 'pip install -r requirements-dask.txt (or pip install ".[dask]")'
ZARR_ARRAY = "weights"  # the (N, d) array inside a group written by write_zarr
ZARR_ATTRS = "w2w"  # the group attribute holding names, layout and origin
DEFAULT_CHUNK_MB = 256
ALGORITHMS = ("krylov", "svd_compressed")


class ClusterError(BuildError):
    """The cluster could not finish a build (a worker died more often than Dask allows, the scheduler is gone)."""


def require_dask(*names: str):
    """Import and return the named modules (default: dask.array, distributed, zarr), or raise an ImportError that
    says what to install."""
    names = names or ("dask.array", "distributed", "zarr")
    modules, missing = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name.split(".")[0])
    if missing:
        raise ImportError(f"building on Dask and reading Zarr arrays need {', '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")
    if "zarr" in names:
        zarr = modules[names.index("zarr")]
        if int(zarr.__version__.split(".")[0]) < 3:
            raise ImportError(f"zarr {zarr.__version__} is installed; w2w needs zarr 3 or newer: {INSTALL_HINT}")
    return modules[0] if len(modules) == 1 else tuple(modules)


def is_zarr(path: str) -> bool:
    """A Zarr store: a folder holding ``zarr.json`` (Zarr 3) or ``.zarray``/``.zgroup`` (Zarr 2), or a URL."""
    if "://" in path:
        return True
    markers = ("zarr.json", ".zarray", ".zgroup")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in markers)


def open_rows(path: str, *, layout: Layout | None = None, names: Sequence[str] | None = None) -> RowSource:
    """:func:`w2w.build.open_source`, or a :class:`ZarrSource` for a Zarr array (zarr imported only then)."""
    path = os.fspath(path)
    return ZarrSource(path, layout=layout, names=names) if is_zarr(path) else open_source(path, layout=layout,
                                                                                         names=names)


# ---- Zarr sources ---------------------------------------------------------------------------------------
class ZarrSource(RowSource):
    """An (N, d) float Zarr array: a group written by :func:`write_zarr` (names and layout from its attributes), or
    a plain 2-D array (rows named 0..N-1; SD1.5 layout when d = 99,648, else give ``layout``)."""

    def __init__(self, path: str, *, names: Sequence[str] | None = None, layout: Layout | None = None):
        zarr = require_dask("zarr")
        self.path = path if "://" in path else os.path.abspath(path)
        try:
            node = zarr.open(self.path, mode="r")
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise W2WFileError(f"{path} is not a readable Zarr array: {exc}") from None
        attrs: dict = {}
        if isinstance(node, zarr.Group):
            if ZARR_ARRAY not in node:
                raise W2WFileError(f"{path} is a Zarr group without a {ZARR_ARRAY!r} array; write it with "
                                   "`python -m w2w to-zarr SOURCE OUT.zarr`")
            attrs = dict(node.attrs.get(ZARR_ATTRS, {}))
            node = node[ZARR_ARRAY]
        if node.ndim != 2 or np.dtype(node.dtype).kind != "f":
            raise W2WFileError(f"{path}: a weight matrix is a 2-D float array, got shape {node.shape} of {node.dtype}")
        self.array = node
        self.shape = (int(node.shape[0]), int(node.shape[1]))
        self.chunk_rows = int(node.chunks[0])
        self.names = tuple(str(n) for n in attrs.get("names", ())) or tuple(str(i) for i in range(self.shape[0]))
        if len(self.names) != self.shape[0]:
            raise W2WFileError(f"{path}: {len(self.names):,} row names stored for {self.shape[0]:,} rows")
        if layout is None and attrs.get("layout"):
            layout = Layout.from_json(attrs["layout"])
        origin = f", from {attrs['source']}" if attrs.get("source") else ""
        name = os.path.basename(self.path.rstrip("/"))
        self.description = f"zarr {name} ({self.shape[0]:,} x {self.shape[1]:,}{origin})"
        name_rows(self, path, names, layout)

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        out[:] = self.array[start:start + out.shape[0]]
        return out

    def dask_array(self, block_rows: int | None = None):
        """The rows as a lazy float32 ``dask.array`` of (rows, d) chunks: the stored chunks, or ``block_rows``
        rounded to a multiple of them (so every task reads whole stored chunks)."""
        da = require_dask("dask.array")
        n, d = self.shape
        rows = self.chunk_rows if block_rows is None else self.chunk_rows * max(1, round(block_rows / self.chunk_rows))
        x = da.from_zarr(self.array, chunks=(min(rows, n), d))  # the array opened here: workers get its path
        return x if x.dtype == np.float32 else x.astype(np.float32)


def write_zarr(source: RowSource, out: str, *, chunk_rows: int | None = None, chunk_mb: int = DEFAULT_CHUNK_MB,
               callback: Callback | None = None) -> ZarrSource:
    """Copy ``source`` block by block into a new Zarr group ``out`` (array ``weights``, (N, d) float32, chunks of
    ``chunk_rows`` × d; default: about ``chunk_mb`` MiB), with its row names, layout and description. Atomic: the
    group is written into a temporary folder beside ``out`` and renamed when complete."""
    zarr = require_dask("zarr")
    if not str(out).strip():
        raise ValueError("the Zarr folder to write has an empty name: give its path")
    if "://" in out:
        raise W2WFileError(f"{out}: write the Zarr array to a local or mounted folder, then copy it to object storage")
    n, d = source.shape
    if source.layout is None or source.layout.dim != d:
        raise LayoutError(f"{source.description}: a layout with {d:,} weights is needed")
    if os.path.exists(out):
        raise W2WFileError(f"{out} already exists: delete it or choose another name")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    rows = min(n, chunk_rows or max(1, (chunk_mb << 20) // (4 * d)))
    out = os.path.abspath(out)
    tmp = tempfile.mkdtemp(prefix=".partial-", suffix=os.path.basename(out), dir=os.path.dirname(out))
    try:
        group = zarr.open_group(tmp, mode="w")
        array = group.create_array(ZARR_ARRAY, shape=(n, d), chunks=(rows, d), dtype="float32",
                                   compressors=None,  # LoRA weights barely compress; decoding would cost every pass
                                   fill_value=np.nan)  # a chunk missing on a worker's storage reads as NaN, never 0
        blocks = _Rows(source, rows, callback, math.ceil(n / rows))
        for start, x in blocks.raw_blocks("to-zarr"):  # the next block is read while this one is written
            array[start:start + x.shape[0]] = x.numpy()
        group.attrs[ZARR_ATTRS] = {"format": "w2w-rows", "names": list(source.names),
                                   "layout": source.layout.to_json(), "source": source.description}
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if callback is not None:
        callback(blocks.step, blocks.total_steps, "done")
    return ZarrSource(out)


# ---- the cluster ----------------------------------------------------------------------------------------
@contextmanager
def dask_client(scheduler: str | None = None, *, workers: int | None = None, threads_per_worker: int | None = None,
                worker_memory: str | int | None = None) -> Iterator:
    """A ``distributed.Client``: connected to ``scheduler`` (an address such as ``tcp://host:8786``, or a scheduler
    file ending in ``.json``), or to a new ``LocalCluster`` of worker processes, each with ``worker_memory`` as its
    memory limit (default: Dask's, the machine's memory divided among the workers)."""
    distributed = require_dask("distributed")
    if scheduler is not None:
        if workers is not None or threads_per_worker is not None or worker_memory is not None:
            raise ValueError("workers, threads per worker and worker memory configure the local cluster; with a "
                             "scheduler address they are the cluster's own settings: leave them out")
        if scheduler.endswith(".json") and not os.path.isfile(scheduler):  # the client would wait for it to appear
            raise ClusterError(f"scheduler file not found: {scheduler}. Start the scheduler with `dask scheduler "
                               "--scheduler-file FILE` first, or give its address (tcp://host:8786)")
        kw = {"scheduler_file": scheduler} if scheduler.endswith(".json") else {"address": scheduler}
        try:
            client = distributed.Client(**kw, timeout="30s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {exc}. Start the cluster first "
                               "(dask-jobqueue, dask-kubernetes, `dask scheduler`), or leave out --scheduler to "
                               "build on a local cluster") from None
        with client:
            yield client
        return
    for name, value in (("workers", workers), ("threads per worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number of at least 1 (a cluster without any would wait "
                             f"forever), got {value!r}")
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                                  memory_limit="auto" if worker_memory is None else worker_memory) as cluster, \
            distributed.Client(cluster) as client:
        yield client


# ---- the build ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DaskBuildResult(BuildResult):
    algorithm: str = "krylov"
    passes: int = 0  # passes over the rows that the graphs make
    # worker address -> {"rss", "peak_rss": since the build started, "read_bytes": during the build, "memory_limit"}
    # in bytes, -1 if unknown
    workers: dict = field(default_factory=dict)


def check_dask_source(source: RowSource) -> None:
    """The Dask engine reads a Zarr array; any other source must be converted once with to-zarr."""
    if not isinstance(source, ZarrSource):
        raise BuildError(f"the Dask engine reads a row-chunked Zarr array, not {source.description}: convert it once "
                         "with `python -m w2w to-zarr SOURCE OUT.zarr` (on storage every worker can read)")


def _passes(algorithm: str, power_iters: int) -> int:
    return power_iters + 2 if algorithm == "krylov" else 2 * power_iters + 4


def build_space_dask(source: ZarrSource, config: BuildConfig = BuildConfig(), *, client,
                     callback: Callback | None = None, base_model: str = "SD1.5",
                     algorithm: str = "krylov") -> DaskBuildResult:
    """:func:`w2w.build.build_space` on a Dask cluster (``client``): same standardisation, components, coefficients
    (= Z componentsᵀ) and explained variances, within the accuracy of the randomized SVD. ``config.block_rows``
    sets the rows per task (rounded to whole stored chunks); ``memory_mb`` is not used (workers have their own
    memory limits). Raises :class:`ClusterError` when the cluster gives up; nothing is written here."""
    da, distributed = require_dask("dask.array", "distributed")
    check_dask_source(source)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    t0 = time.perf_counter()
    check_build_shape(source, config)
    n, d = source.shape
    k, q = config.pcs, config.power_iters
    l = min(config.columns, d)
    _check_workers_see(client, source)
    x = source.dask_array(config.block_rows)
    progress = _Progress(callback, _passes(algorithm, q))
    _on_workers(client, procstat.reset_peak)
    before = _on_workers(client, procstat.snapshot)
    with _cluster_errors(distributed):
        progress("statistics")
        omega = da.random.default_rng(config.seed).standard_normal((n, l), chunks=(x.chunks[0], l), dtype=np.float32)
        stats = [x.mean(0, dtype="f8"), x.var(0, ddof=1, dtype="f8")]
        if algorithm == "krylov":  # the row sketch in the same pass
            stats += [x.T @ omega, omega.sum(0, dtype="f8")]
        stats = client.compute(stats, sync=True)
        mean, var = torch.from_numpy(stats[0]), torch.from_numpy(stats[1])
        if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
            bad = client.compute(da.flatnonzero(~da.isfinite(x).all(axis=1)), sync=True)
            raise nonfinite_rows_error(source, [int(i) for i in bad])
        std, shift, scale, constant = standardisation(mean, var.clamp_min(0).sqrt())
        z = (x - shift.numpy()) * scale.numpy()  # lazy: every pass reads X and standardises chunk by chunk
        passes = _Passes(client, z, progress)
        if algorithm == "krylov":
            sketch = torch.from_numpy(stats[2]).addr_(shift, torch.from_numpy(stats[3]).float(), alpha=-1.0)
            g = krylov_basis(sketch.mul_(scale[:, None]), q)  # Xᵀ Ω - mean ⊗ Σ Ω, standardised
            del sketch, stats
            components, coefs, eigenvalues = block_krylov(g, n, l, k, max(x.chunks[0]),
                                                          krylov_pass=passes.krylov, projection_pass=passes.project)
            del g
        else:
            components, coefs, eigenvalues = _svd_compressed(da, z, passes, k, l, q, config.seed)
    progress("done")
    workers = _on_workers(client, procstat.snapshot)
    limits = {address: info.get("memory_limit") for address, info in client.scheduler_info()["workers"].items()}
    for address, now in workers.items():  # bytes read during the build (all of them for a restarted worker)
        start = before.get(address, {}).get("read_bytes", 0)
        if now["read_bytes"] >= 0 and start >= 0:
            now["read_bytes"] -= start
        now["memory_limit"] = limits.get(address) or -1
    base = build_result(source, mean, std, constant, components, coefs, eigenvalues, progress.total * n, t0,
                        base_model)
    return DaskBuildResult(**{f: getattr(base, f) for f in BuildResult.__dataclass_fields__},
                           algorithm=algorithm, passes=progress.total, workers=workers)


class _Progress:
    """Calls ``callback(passes done, passes, what)`` as each step of ``passes`` passes starts, then
    ``(passes, passes, "done")``."""

    def __init__(self, callback: Callback | None, total: int):
        self.callback, self.total, self.step = callback, total, 0

    def __call__(self, what: str, passes: int = 1) -> None:
        if self.callback is not None:
            self.callback(self.total if what == "done" else self.step, self.total, what)
        if what != "done":
            self.step += passes


class _Passes:
    """The passes over Z that :func:`w2w.build.block_krylov` asks for, each one Dask graph."""

    def __init__(self, client, z, progress: _Progress):
        self.client, self.z, self.progress = client, z, progress

    def _broadcast(self, g: torch.Tensor):
        """G (d, l) on every worker (sent once, not inside each task), as a one-chunk dask array."""
        import dask.array as da

        future = self.client.scatter(np.ascontiguousarray(g.numpy()), broadcast=True, hash=False)
        return da.from_delayed(future, shape=tuple(g.shape), dtype=np.float32)

    def krylov(self, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Y = Z G into y and ZᵀY returned, in one pass: each chunk of Z is read once and feeds both."""
        self.progress("krylov")
        y_lazy = self.z @ self._broadcast(g)
        y_kept, h_kept = self.client.persist([y_lazy, self.z.T @ y_lazy])
        self._gather_rows(y_kept, y)
        return torch.from_numpy(self.client.compute(h_kept, sync=True))

    def project(self, g: torch.Tensor, y: torch.Tensor) -> None:
        self.progress("projection")
        self._gather_rows(self.client.persist(self.z @ self._broadcast(g)), y)

    def _gather_rows(self, kept, out: torch.Tensor) -> None:
        """Copy a persisted (N, l) dask array into ``out`` chunk by chunk (no worker concatenates it whole)."""
        from distributed import futures_of

        by_key = {f.key: f for f in futures_of(kept)}
        start = 0
        for key, rows in zip((row[0] for row in kept.__dask_keys__()), kept.chunks[0]):
            out[start:start + rows] = torch.from_numpy(by_key[key].result())
            start += rows


def _svd_compressed(da, z, passes: _Passes, k: int, l: int, q: int, seed: int):
    """``dask.array.linalg.svd_compressed`` (Halko et al.'s subspace iteration, TSQR) on Z, then one more pass for
    the coefficients Z componentsᵀ (its U·S is only their part inside the sketched subspace)."""
    passes.progress("svd_compressed", passes=2 * q + 2)  # ZΩ, 2 per power iteration, then QᵀZ
    with passes.client.as_current():  # svd_compressed persists its intermediates on the default scheduler
        _, _, vt = da.linalg.svd_compressed(z, k, n_power_iter=q, n_oversamples=l - k, seed=seed, compute=True)
        components = torch.from_numpy(passes.client.compute(vt, sync=True)).float()  # (k, d)
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1  # the largest entry of each component is positive, as in w2w.build
    components *= signs[:, None]
    coefs = torch.empty(z.shape[0], k)
    passes.project(components.T.contiguous(), coefs)
    return components, coefs, coefs.double().square().sum(0)


@contextmanager
def _cluster_errors(distributed):
    """Turn the cluster giving up into a ClusterError that says what happened and what to change."""
    try:
        yield
    except distributed.KilledWorker as exc:
        raise ClusterError(f"Dask gave up on the build: {exc}. Workers died while computing it (out of memory, or "
                           "killed). Nothing was written. Give each worker more memory, use fewer rows per task "
                           "(--block-rows) or fewer threads per worker, or allow more retries "
                           "(distributed.scheduler.allowed-failures)") from None
    except (distributed.comm.CommClosedError, distributed.client.FutureCancelledError) as exc:
        raise ClusterError(f"the connection to the Dask cluster was lost during the build ({exc}); nothing was "
                           "written. Check that the scheduler is still running, then build again") from None


def _check_workers_see(client, source: ZarrSource) -> None:
    """Every worker must read the array at the client's path (Zarr reads a missing chunk as its fill value)."""
    if "://" in source.path:
        return  # object storage: the same URL everywhere
    marker = os.path.join(source.path, "zarr.json")
    blind = sorted(address for address, seen in client.run(os.path.isfile, marker).items() if not seen)
    if blind:
        raise ClusterError(f"{len(blind)} Dask worker(s) cannot see {source.path} ({', '.join(blind[:5])}): put the "
                           "Zarr array on storage that every worker mounts at the same path as this machine")


def _on_workers(client, fn) -> dict:
    """``fn()`` of :mod:`w2w.procstat` run on every worker ({address: result}). Sent by value, so workers need
    neither w2w installed nor torch imported."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(procstat)
    return client.run(fn)
