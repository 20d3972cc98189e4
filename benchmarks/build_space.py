"""Benchmark `w2w build` against scikit-learn's randomized PCA, side by side in one process, plus an out-of-core run.

1. Same N x d matrix, same k: our streaming build (standardise + randomized SVD) vs scikit-learn
   StandardScaler + PCA(svd_solver="randomized"). Prints wall time, explained variance of both, peak RSS of
   each (Linux: VmHWM reset through /proc/self/clear_refs), and the time ratio.
2. --out-of-core: writes an .npy matrix at least 1.5x larger than an address-space cap (RLIMIT_AS) and builds from
   it in a subprocess under that cap; prints the peak RSS. Needs Linux and free disk of the file size.

    nice -n 10 python benchmarks/build_space.py                       # ~1 min on 2 cores
    nice -n 10 python benchmarks/build_space.py --rows 8000 --dim 40000 --pcs 200
    nice -n 10 python benchmarks/build_space.py --out-of-core --cap-gb 4
Full size (not run in CI; ~26 GB of disk, an estimated 30-60 min on 2 cores):
    python benchmarks/build_space.py --full-size --workdir /big/disk
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from w2w.build import ArraySource, BuildConfig, build_space  # noqa: E402
from w2w.layout import sd15_layout  # noqa: E402

FULL_ROWS, FULL_DIM = 64_974, 99_648


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (Linux), or -1."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) * 1024 if match else -1
    except OSError:
        return -1


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def measure(fn):
    """(result, seconds, peak RSS increase in bytes) of fn()."""
    _reset_peak()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _status("VmHWM") - base


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


def write_npy(path: str, n: int, d: int, seed: int, chunk_rows: int = 512) -> None:
    """Write a synthetic (n, d) float32 .npy in chunks (never holding it whole)."""
    gen = torch.Generator().manual_seed(seed)
    rank = 64
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--dim", type=int, default=20000)
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
    args = p.parse_args()
    if args.full_size:
        out_of_core(cap_gb=12.0, pcs=1000, workdir=args.workdir, n=FULL_ROWS, d=FULL_DIM, memory_mb=1024)
        return
    compare(args.rows, args.dim, args.pcs, args.power_iters, args.oversample, args.seed, args.repeats)
    if args.out_of_core:
        out_of_core(args.cap_gb, args.ooc_pcs, args.workdir)


if __name__ == "__main__":
    main()
