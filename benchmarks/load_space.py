"""Peak RSS and time to first sample: our loader vs the naive full ``torch.load`` of the released basis.

Generates (once, cached in --workdir) a released-format folder with a 99,648 x 10,000 float32 ``V.pt`` (4 GB)
and its conversion to our format, then runs each loading path in a fresh child process (so each peak RSS is its
own), alternating, and prints both and their ratio.

    python benchmarks/load_space.py [--workdir DIR] [--pcs 1000] [--total-pcs 10000] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import torch
from w2w.space import load_space
from w2w.sampling import sample_identity
mode, path, pcs = sys.argv[1], sys.argv[2], int(sys.argv[3])
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
if mode == "naive":
    import os
    V = torch.load(os.path.join(path, "V.pt"), weights_only=True)  # the whole basis
    mean = torch.load(os.path.join(path, "mean.pt"), weights_only=True)
    std = torch.load(os.path.join(path, "std.pt"), weights_only=True)
    proj = torch.load(os.path.join(path, "proj_1000pc.pt"), weights_only=True)
    m, s = proj.mean(0)[:pcs], proj.std(0)[:pcs]
    g = torch.Generator().manual_seed(5)
    beta = m + s * torch.randn(pcs, generator=g)
    w = (beta @ V[:, :pcs].T) * std + mean
else:
    space = load_space(path, pcs=pcs)
    w = space.weights(sample_identity(space, 5, pcs=pcs).coefficients)
elapsed = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": elapsed, "import_seconds": t_import, "peak_rss": peak, "finite": bool(torch.isfinite(w).all())}}))
"""


def ensure_fixture(workdir: str, total_pcs: int, models: int) -> tuple[str, str]:
    release = os.path.join(workdir, f"release-{total_pcs}")
    ours = os.path.join(workdir, f"space-{total_pcs}.safetensors")
    if not os.path.isfile(os.path.join(release, "proj_1000pc.pt")):
        print(f"generating a {99648}x{total_pcs} float32 V.pt in {release} (once) ...", flush=True)
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); from w2w.synthetic import write_release; "
                f"write_release({release!r}, pcs={total_pcs}, models={models}, orthonormal=False)")
        subprocess.run([sys.executable, "-c", code], check=True)
    if not os.path.isfile(ours):
        print(f"converting to {ours} (once) ...", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "w2w", "convert", release, ours], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        print(f"  convert took {time.perf_counter() - t:.1f} s")
    return release, ours


def run_child(mode: str, path: str, pcs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), mode, path, str(pcs)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "w2w-bench-load"))
    parser.add_argument("--pcs", type=int, default=1000)
    parser.add_argument("--total-pcs", type=int, default=10000)
    parser.add_argument("--models", type=int, default=2000, help="training models in proj_1000pc.pt")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    release, ours = ensure_fixture(args.workdir, args.total_pcs, args.models)
    paths = {"naive torch.load (released dir)": ("naive", release), "w2w, released dir (streamed)": ("w2w", release),
             "w2w, our .safetensors": ("w2w", ours)}
    results: dict[str, list[dict]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, (mode, path) in paths.items():
            results[name].append(run_child(mode, path, args.pcs))
    print(f"\nbasis {99648} x {args.total_pcs} float32 ({os.path.getsize(os.path.join(release, 'V.pt')) / 1e9:.2f} GB), "
          f"pcs={args.pcs}; best of {args.repeats} runs, each in a fresh process (files in page cache)")
    print("seconds = load + sample + reconstruct, after `import torch` (import time shown apart); "
          "peak RSS of the whole process, torch included")
    print(f"{'path':36s} {'seconds':>9s} {'import s':>9s} {'peak RSS':>10s}")
    best = {k: (min(r["seconds"] for r in v), min(r["peak_rss"] for r in v)) for k, v in results.items()}
    for name, (sec, rss) in best.items():
        imp = min(r["import_seconds"] for r in results[name])
        print(f"{name:36s} {sec:9.2f} {imp:9.2f} {rss / 2**30:8.2f} GB")
    base_s, base_r = best["naive torch.load (released dir)"]
    for name in list(paths)[1:]:
        sec, rss = best[name]
        print(f"ratio {name} / naive: time {sec / base_s:.3f}, peak RSS {rss / base_r:.3f}")
    assert all(r["finite"] for v in results.values() for r in v)


if __name__ == "__main__":
    main()
