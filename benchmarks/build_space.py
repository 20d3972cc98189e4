"""Benchmark `w2w build` against scikit-learn's randomized PCA, side by side in one process, plus an out-of-core run.

1. Same N x d matrix, same k: our streaming build (standardise + randomized SVD) vs scikit-learn
   StandardScaler + PCA(svd_solver="randomized"). Prints wall time, explained variance of both, peak RSS of
   each (Linux: VmHWM reset through /proc/self/clear_refs), and the time ratio.
2. --out-of-core: writes an .npy matrix at least 1.5x larger than an address-space cap (RLIMIT_AS) and builds from
   it in a subprocess under that cap; prints the peak RSS. Needs Linux and free disk of the file size.
3. --engine dask: writes a matrix, converts it with to-zarr, starts a LocalCluster (--workers single-thread worker
   processes, --worker-memory each) and builds from the same Zarr array, alternating: the single-machine build,
   the Dask engine (block Krylov) and dask.array.linalg.svd_compressed. Prints time, passes over the data
   (planned, and measured from the bytes the workers read), explained variance, the largest principal angle to
   the single-machine space, per-worker peak RSS next to the single-machine peak RSS increase, and time ratios.
   Needs requirements-dask.txt and free disk of twice the matrix.

    nice -n 10 python benchmarks/build_space.py                       # ~1 min on 2 cores
    nice -n 10 python benchmarks/build_space.py --rows 8000 --dim 40000 --pcs 200
    nice -n 10 python benchmarks/build_space.py --out-of-core --cap-gb 4
    nice -n 10 python benchmarks/build_space.py --engine dask         # 8,000 x 99,648 (2.97 GiB), 2 workers of 1 GiB
Full size (not run in CI; ~26 GB of disk, an estimated 30-60 min on 2 cores):
    python benchmarks/build_space.py --full-size --workdir /big/disk
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from w2w import procstat  # noqa: E402

if __name__ != "__mp_main__":  # Dask's worker processes (spawned) re-run this file's imports: keep torch out of them
    import torch

    from w2w.build import ArraySource, BuildConfig, build_space, open_source
    from w2w.layout import sd15_layout

FULL_ROWS, FULL_DIM = 64_974, 99_648


def measure(fn):
    """(result, seconds, peak RSS increase in bytes) of fn() (Linux: VmHWM reset through /proc/self/clear_refs)."""
    procstat.reset_peak()
    base = procstat.status_bytes("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, procstat.status_bytes("VmHWM") - base


def synthetic_matrix(n: int, d: int, seed: int = 0, rank: int = 400) -> np.ndarray:
    """LoRA-like rows: a decaying spectrum (power law) over ``rank`` directions plus isotropic noise, with per-weight
    offsets and scales, float32 (n, d)."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, n, d)
    basis = torch.randn(rank, d, generator=gen) / d ** 0.5
    spectrum = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32) ** 0.8
    x = (torch.randn(n, rank, generator=gen) * spectrum) @ basis * d ** 0.5
    x += 0.02 * torch.randn(n, d, generator=gen)
    x = x * (torch.rand(d, generator=gen) + 0.1) * 1e-3 + torch.randn(d, generator=gen) * 1e-3
    return x.numpy()


def compare(n: int, d: int, k: int, power_iters: int, oversample: int | None, seed: int, repeats: int) -> None:
    x = synthetic_matrix(n, d, seed)
    print(f"matrix {n:,} x {d:,} float32 ({x.nbytes / 2**30:.2f} GiB), k = {k}, torch threads {torch.get_num_threads()}")
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    def ours():
        layout = sd15_layout() if d == sd15_layout().dim else None
        source = ArraySource(x, layout=layout)
        if layout is None:  # any layout of d weights: the build only needs its size
            source.layout = _flat_layout(d)
        return build_space(source, BuildConfig(pcs=k, power_iters=power_iters, oversample=oversample, seed=seed,
                                               memory_mb=max(1024, x.nbytes // 2**20 + 1)))

    def sklearn():
        z = StandardScaler().fit_transform(x)
        return PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(z)

    t_ours = t_sk = float("inf")
    rss_ours = rss_sk = 0
    for _ in range(repeats):  # alternate, keep the fastest: the machine may be shared
        result, t, rss = measure(ours)
        t_ours, rss_ours = min(t_ours, t), max(rss_ours, rss)
        pca, t, rss = measure(sklearn)
        t_sk, rss_sk = min(t_sk, t), max(rss_sk, rss)
    ev_ours = float(result.explained_variance_ratio.sum())
    ev_sk = float(pca.explained_variance_ratio_.sum())
    print(f"{'':24}{'seconds':>10}{'explained var':>15}{'peak RSS +GiB':>15}")
    print(f"{'w2w build':24}{t_ours:10.2f}{ev_ours:15.6f}{rss_ours / 2**30:15.2f}")
    print(f"{'sklearn randomized PCA':24}{t_sk:10.2f}{ev_sk:15.6f}{rss_sk / 2**30:15.2f}")
    rel = (ev_ours - ev_sk) / ev_sk
    print(f"time ratio sklearn / w2w = {t_sk / t_ours:.2f}x; explained variance difference {100 * rel:+.4f} % "
          f"(target: >= 3x at +-0.1 %: {'met' if t_sk / t_ours >= 3 and abs(rel) <= 1e-3 else 'NOT met'})")
    cos = np.linalg.svd(result.space.components.double().numpy() @ pca.components_.astype(np.float64).T,
                        compute_uv=False)
    print(f"subspace agreement: smallest cosine of principal angles {cos.min():.6f}")


def _flat_layout(d: int):
    from w2w.layout import Layout, ModuleSlot

    return Layout((ModuleSlot("flat", d - 1, 1, 0, d - 1),), rank=1)


def write_npy(path: str, n: int, d: int, seed: int, chunk_rows: int = 512, rank: int = 64) -> None:
    """Write a synthetic (n, d) float32 .npy in chunks (never holding it whole): a rank-``rank`` signal with a 1/i
    spectrum over a little isotropic noise, per-weight scales."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=gen)
    scale = torch.rand(d, generator=gen) + 0.1
    spectrum = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    del arr  # header written; fill the data with plain writes
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        offset = f.tell() - n * d * 4
        f.seek(offset)
        for start in range(0, n, chunk_rows):
            b = min(chunk_rows, n - start)
            block = ((torch.randn(b, rank, generator=gen) * spectrum) @ basis + 0.05 * torch.randn(b, d, generator=gen))
            f.write((block * scale).numpy().tobytes())


_CHILD = r"""
import os, resource, sys, time
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.path.insert(0, sys.argv[5])
from w2w.build import BuildConfig, build_space, open_source
from w2w.layout import Layout, ModuleSlot, sd15_layout
from w2w.space import save_space
t0 = time.perf_counter()
d = int(sys.argv[7])
layout = sd15_layout() if d == sd15_layout().dim else Layout((ModuleSlot("flat", d - 1, 1, 0, d - 1),))
source = open_source(sys.argv[2], layout=layout)
result = build_space(source, BuildConfig(pcs=int(sys.argv[4]), memory_mb=int(sys.argv[6])))
save_space(result.space, sys.argv[3], extra_metadata=result.metadata())
status = open("/proc/self/status").read()
peak = [l for l in status.splitlines() if l.startswith(("VmHWM", "VmPeak"))]
print("built", result.space.pcs, "PCs from", source.shape, "in", round(time.perf_counter() - t0, 1), "s;",
      "explained variance", round(float(result.explained_variance_ratio.sum()), 4), ";", "; ".join(peak))
"""


def out_of_core(cap_gb: float, pcs: int, workdir: str | None, n: int | None = None, d: int = FULL_DIM,
                memory_mb: int = 256, keep: bool = False) -> None:
    cap = int(cap_gb * 2**30)
    n = n or int(np.ceil(1.5 * cap / (4 * d))) + 1
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, "weights.npy")
        t0 = time.perf_counter()
        write_npy(path, n, d, seed=0)
        size = os.path.getsize(path)
        print(f"wrote {path}: {n:,} x {d:,} float32 = {size / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s); "
              f"address-space cap (RLIMIT_AS) {cap / 2**30:.2f} GiB = file / {size / cap:.2f}")
        repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(cap), path, os.path.join(tmp, "space.safetensors"),
                               str(pcs), repo, str(memory_mb), str(d)], capture_output=True, text=True, env=env)
        print(proc.stdout.strip() or proc.stderr.strip()[-2000:])
        print("out-of-core build", "succeeded" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})")
        if keep:
            input("press Enter to delete the files")


def dask_compare(n: int, d: int, k: int, power_iters: int, workers: int, worker_memory: str, chunk_rows: int,
                 repeats: int, workdir: str | None) -> None:
    """Single-machine build vs the Dask engine (block Krylov) vs svd_compressed, on the same Zarr array."""
    from distributed import Client, LocalCluster

    from w2w.build_dask import build_space_dask, write_zarr
    from w2w.layout import Layout, ModuleSlot

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        write_npy(os.path.join(tmp, "w.npy"), n, d, seed=0, rank=k)  # signal of rank k: its subspace is well defined
        t_npy = time.perf_counter() - t0
        layout = sd15_layout() if d == sd15_layout().dim else Layout((ModuleSlot("flat", d - 1, 1, 0, d - 1),))
        t0 = time.perf_counter()
        zs = write_zarr(open_source(os.path.join(tmp, "w.npy"), layout=layout), os.path.join(tmp, "w.zarr"),
                        chunk_rows=chunk_rows)
        t_zarr = time.perf_counter() - t0
        size = n * d * 4
        print(f"matrix {n:,} x {d:,} float32 = {size / 2**30:.2f} GiB; wrote .npy in {t_npy:.0f} s, to-zarr in "
              f"{t_zarr:.0f} s (chunks of {zs.chunk_rows} rows = {zs.chunk_rows * d * 4 / 2**20:.0f} MiB); k = {k}, "
              f"power_iters = {power_iters}, torch threads {torch.get_num_threads()}")
        cfg = BuildConfig(pcs=k, power_iters=power_iters, memory_mb=1024)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=worker_memory,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            limit = next(iter(client.scheduler_info()["workers"].values()))["memory_limit"]
            print(f"LocalCluster: {workers} workers x 1 thread, memory limit {limit / 2**30:.2f} GiB each "
                  f"(matrix / limit = {size / limit:.1f}); idle worker RSS "
                  f"{max(w['rss'] for w in client.run(procstat.snapshot).values()) / 2**20:.0f} MiB")
            same_passes = dataclasses.replace(cfg, power_iters=2 * power_iters + 2)  # as many as svd_compressed
            dask_runs = {"dask krylov": (cfg, "krylov"), "dask svd_compressed": (cfg, "svd_compressed"),
                         f"dask krylov, q={same_passes.power_iters}": (same_passes, "krylov")}
            runs: dict[str, list] = {"single machine": [], **{name: [] for name in dask_runs}}
            for _ in range(repeats):  # alternate, keep the fastest: the machine may be shared
                before = procstat.read_bytes()
                res, t, rss = measure(lambda: build_space(zs, cfg))
                runs["single machine"].append((t, res, rss, procstat.read_bytes() - before))
                for name, (config, algorithm) in dask_runs.items():
                    res, t, _ = measure(lambda: build_space_dask(zs, config, client=client, algorithm=algorithm))
                    runs[name].append((t, res, max(w["peak_rss"] for w in res.workers.values()),
                                       sum(w["read_bytes"] for w in res.workers.values())))
        t0 = time.perf_counter()
        accurate = build_space(zs, BuildConfig(pcs=k, power_iters=4, oversample=k, memory_mb=1024))
        reference = accurate.space.components
        print(f"reference: single machine, power_iters 4, oversample {k} ({time.perf_counter() - t0:.0f} s), "
              f"explained variance {float(accurate.explained_variance_ratio.sum()):.6f}")
        t_local = min(r[0] for r in runs["single machine"])
        print(f"{'':24}{'passes':>6}{'measured':>10}{'seconds':>9}{'x single':>10}{'explained var':>15}"
              f"{'max angle':>11}{'peak RSS':>18}")
        for name, rs in runs.items():
            t, res, rss, read = min(rs, key=lambda r: r[0])
            passes = getattr(res, "passes", cfg.passes)
            angle = _max_angle(res.space.components, reference)
            where = "process +" if name == "single machine" else "per worker"
            print(f"{name:24}{passes:6d}{read / size:10.2f}{t:9.1f}{t / t_local:10.2f}"
                  f"{float(res.explained_variance_ratio.sum()):15.6f}{angle:11.2e}"
                  f"{where:>12} {rss / 2**20:5.0f} MiB")
        print("max angle: largest principal angle (radians) between the k PCs and the reference's (the matrix "
              "holds a rank-k signal); measured passes: bytes read (by the workers, or by this process) / matrix "
              "bytes")


def _max_angle(a, b) -> float:
    qa, qb = torch.linalg.qr(a.double().T).Q, torch.linalg.qr(b.double().T).Q
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="default 4000 (8000 with --engine dask)")
    p.add_argument("--dim", type=int, default=None, help="default 20000 (99648 with --engine dask)")
    p.add_argument("--pcs", type=int, default=100)
    p.add_argument("--power-iters", type=int, default=1)
    p.add_argument("--oversample", type=int, default=None, help="default: the build's (max(10, pcs // 4))")
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-of-core", action="store_true", help="also run the capped out-of-core build")
    p.add_argument("--cap-gb", type=float, default=4.0, help="RLIMIT_AS of the out-of-core child (GiB)")
    p.add_argument("--ooc-pcs", type=int, default=16)
    p.add_argument("--workdir", default=None, help="where the big matrix file is written (default: temp dir)")
    p.add_argument("--full-size", action="store_true",
                   help=f"only the out-of-core build on a {FULL_ROWS:,} x {FULL_DIM:,} synthetic matrix (25.9 GB)")
    p.add_argument("--engine", choices=("local", "dask"), default="local",
                   help="dask: the single-machine build vs the Dask engine and svd_compressed on one Zarr array")
    p.add_argument("--workers", type=int, default=2, help="--engine dask: LocalCluster worker processes")
    p.add_argument("--worker-memory", default="1GiB", help="--engine dask: memory limit of each worker")
    p.add_argument("--chunk-rows", type=int, default=128, help="--engine dask: rows per Zarr chunk")
    args = p.parse_args()
    if args.full_size:
        out_of_core(cap_gb=12.0, pcs=1000, workdir=args.workdir, n=FULL_ROWS, d=FULL_DIM, memory_mb=1024)
        return
    if args.engine == "dask":
        dask_compare(args.rows or 8000, args.dim or FULL_DIM, args.pcs, args.power_iters, args.workers,
                     args.worker_memory, args.chunk_rows, args.repeats, args.workdir)
        return
    compare(args.rows or 4000, args.dim or 20000, args.pcs, args.power_iters, args.oversample, args.seed,
            args.repeats)
    if args.out_of_core:
        out_of_core(args.cap_gb, args.ooc_pcs, args.workdir)


if __name__ == "__main__":
    main()
