"""CLI commands that make spaces: build (streaming PCA over LoRAs or a weight matrix, on this machine or on a Dask
cluster), to-zarr (a source as a row-chunked Zarr array, for the Dask engine) and fit-directions."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .cli_common import NONNEGATIVE, POSITIVE, check_output, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "build", help="build a space from a folder of LoRAs or an N x d weight matrix (out-of-core PCA)",
        description="Standardise every weight over the training models, then keep the first PCS principal components "
                    "with a randomized SVD that streams over the models in blocks: the matrix is never held whole. "
                    "Passes over the data: power-iters + 2.",
        epilog="examples:\n  python -m w2w build my_space.safetensors --from loras/ --pcs 100 --labels labels.csv\n"
               "  python -m w2w build space.safetensors --from all_weights.pt --pcs 1000 --memory-mb 4096\n"
               "  python -m w2w build space.safetensors --from weights.zarr --pcs 1000 --engine dask "
               "--scheduler tcp://scheduler:8786\n\n"
               "--engine dask reads a Zarr array made by `python -m w2w to-zarr`; it needs the optional Dask "
               "requirements:\n  pip install -r requirements-dask.txt   (or pip install \".[dask]\")\n"
               "See docs/building-on-dask.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the space .safetensors to write (written to a temporary file, then renamed)")
    p.add_argument("--from", dest="source", required=True, metavar="SRC",
                   help="a folder of LoRA .safetensors files / PEFT adapter folders (kohya, PEFT or diffusers keys, "
                        "one layout), an N x d matrix file: .npy, .safetensors (one 2-D tensor) or .pt (torch.save), "
                        "or a Zarr array written by `to-zarr` (the only source of --engine dask)")
    p.add_argument("--pcs", type=POSITIVE, default=1000, help="principal components to keep (default 1000)")
    p.add_argument("--power-iters", type=NONNEGATIVE, default=1,
                   help="power iterations of the randomized SVD; each is one more pass (default 1)")
    p.add_argument("--oversample", type=NONNEGATIVE, default=None,
                   help="extra sketch columns beyond PCS (default max(10, PCS/4)); more = more accurate last PCs")
    p.add_argument("--memory-mb", type=POSITIVE, default=1024,
                   help="memory for blocks of rows; a matrix smaller than this is cached in memory (default 1024)")
    p.add_argument("--block-rows", type=POSITIVE, default=None,
                   help="rows per block (default: from --memory-mb); with --engine dask, rows per task, rounded to "
                        "whole Zarr chunks (default: one chunk)")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the random sketch (default 0)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype of the basis")
    p.add_argument("--layout", default=None, metavar="LORA",
                   help="for a matrix whose rows are not the 99,648-value SD1.5 layout: a LoRA file or folder whose "
                        "layout the rows follow")
    p.add_argument("--names", default=None, metavar="TXT",
                   help="for a matrix: a text file with one model name per row (used to key --labels)")
    p.add_argument("--labels", default=None, metavar="CSV",
                   help="attribute labels: one row per model in build order, or keyed by a 'file' column")
    p.add_argument("--method", choices=("lstsq", "logistic"), default="lstsq", help="how directions are fitted")
    p.add_argument("--debias", default="", metavar="A,B",
                   help="attributes whose directions are projected out of every fitted direction")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    dask = p.add_argument_group("Dask engine (docs/building-on-dask.md)")
    dask.add_argument("--engine", choices=("local", "dask"), default="local",
                      help="local: stream the rows on this machine (default); dask: run every pass on a Dask cluster "
                           "that reads the Zarr array given by --from (the same space, within the randomized SVD's "
                           "accuracy)")
    dask.add_argument("--scheduler", default=None, metavar="ADDRESS",
                      help="the Dask scheduler to use (tcp://host:8786, or a scheduler file .json); default: start a "
                           "local cluster of worker processes")
    dask.add_argument("--workers", type=POSITIVE, default=None, metavar="N",
                      help="local cluster: worker processes (default: Dask's)")
    dask.add_argument("--threads-per-worker", type=POSITIVE, default=None, metavar="N",
                      help="local cluster: threads per worker (default: Dask's)")
    dask.add_argument("--worker-memory", default=None, metavar="SIZE",
                      help="local cluster: memory limit of each worker, e.g. 4GiB (default: Dask's, the machine's "
                           "memory shared among the workers)")
    p.set_defaults(func=_build)

    p = sub.add_parser(
        "to-zarr", help="copy a LoRA folder or weight matrix into a row-chunked Zarr array (for build --engine dask)",
        description="Read SOURCE block by block (never whole) and write it as a Zarr group: array 'weights' (N x d\n"
                    "float32, chunks of rows x d, uncompressed) with the row names, the layout and the origin as\n"
                    "attributes. Written into a temporary folder beside OUT, renamed when complete. Needs the\n"
                    "optional Dask requirements: pip install -r requirements-dask.txt (or pip install \".[dask]\").",
        epilog="examples:\n  python -m w2w to-zarr all_weights.pt /shared/weights.zarr --chunk-rows 1024\n"
               "  python -m w2w build space.safetensors --from /shared/weights.zarr --engine dask --pcs 1000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a LoRA folder or an N x d matrix file (.npy, .safetensors, .pt), as for build")
    p.add_argument("out", help="the Zarr folder to create (it must not exist); put it where every worker can read it")
    chunks = p.add_mutually_exclusive_group()
    chunks.add_argument("--chunk-rows", type=POSITIVE, default=None,
                        help="rows per chunk; at least pcs + oversample of the builds to come keeps each chunk's "
                             "partial products smaller than the chunk (default: from --chunk-mb)")
    chunks.add_argument("--chunk-mb", type=POSITIVE, default=256, help="target chunk size in MiB (default 256)")
    p.add_argument("--layout", default=None, metavar="LORA", help="as for build: the layout of a matrix's rows")
    p.add_argument("--names", default=None, metavar="TXT", help="as for build: one model name per matrix row")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_to_zarr)

    p = sub.add_parser(
        "fit-directions", help="add edit directions fitted to labels of the training models to a built space",
        description="Fit one linear direction per label column (least squares or logistic regression) in the space's "
                    "coefficient space and store them in the space file.")
    p.add_argument("space", help="a space .safetensors written by `build` (it holds the training coefficients)")
    p.add_argument("labels", help="CSV: one row per training model in build order, or keyed by a 'file' column")
    p.add_argument("--method", choices=("lstsq", "logistic"), default="lstsq", help="default lstsq (the paper's)")
    p.add_argument("--debias", default="", metavar="A,B",
                   help="attributes whose directions are projected out of every fitted direction")
    p.add_argument("--only", default="", metavar="A,B", help="fit only these label columns (default: all)")
    p.add_argument("--out", default=None, help="write here instead of replacing SPACE")
    p.set_defaults(func=_fit_directions)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _progress(quiet: bool, unit: str = "blocks"):
    started = time.perf_counter()

    def report(step: int, total: int, what: str) -> None:
        if not quiet:
            print(f"\r{what:>16}: {step}/{total} {unit}, {time.perf_counter() - started:7.1f} s", end="",
                  file=sys.stderr, flush=True)
    return report


def _names(path: str | None) -> list[str] | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--names {path} could not be read as a text file of model names: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None


def _build(args) -> int:
    from .build import BuildConfig, build_space
    from .build_dask import open_rows
    from .space import save_space

    cluster = {"workers": args.workers, "threads_per_worker": args.threads_per_worker,
               "worker_memory": args.worker_memory}
    if args.engine == "local" and (args.scheduler or any(v is not None for v in cluster.values())):
        raise ValueError("--scheduler, --workers, --threads-per-worker and --worker-memory are for --engine dask")
    check_output(args.out, "out", args.source, args.labels, args.names, args.layout,
                 read_whole=(args.source if os.path.isdir(args.source) else None,))
    source = open_rows(args.source, layout=_layout_from(args.layout), names=_names(args.names))
    labels = _read_labels(args.labels, source.names, _split(args.debias), []) if args.labels else None
    config = BuildConfig(pcs=args.pcs, oversample=args.oversample, power_iters=args.power_iters,
                         memory_mb=args.memory_mb, block_rows=args.block_rows, seed=args.seed)
    if args.engine == "dask":
        from .build_dask import build_space_dask, check_dask_source, dask_client

        check_dask_source(source)  # before starting a cluster
        with dask_client(args.scheduler, **cluster) as client:
            result = build_space_dask(source, config, client=client, callback=_progress(args.quiet, "passes"))
    else:
        result = build_space(source, config, callback=_progress(args.quiet))
    if not args.quiet:
        print(file=sys.stderr)
    space = result.space
    if labels is not None:  # read and checked before the build
        space = _with_directions(space, labels, args.method, _split(args.debias), [])
    save_space(space, args.out, dtype=getattr(torch, args.dtype), extra_metadata=result.metadata())
    summary = space.describe()
    summary.update(explained_variance=round(float(result.explained_variance_ratio.sum()), 6),
                   seconds=round(result.seconds, 2), out=args.out)
    if args.engine == "dask":
        gib = {"peak_rss": "peak_rss_gib", "memory_limit": "memory_limit_gib", "read_bytes": "read_gib"}
        summary.update(passes=result.passes, workers={
            address: {name: round(w[key] / 2**30, 3) for key, name in gib.items()}
            for address, w in result.workers.items()})
    print_json(summary)
    return 0


def _to_zarr(args) -> int:
    from .build import open_source
    from .build_dask import is_zarr, write_zarr

    if is_zarr(args.source):
        raise ValueError(f"{args.source} is already a Zarr array")
    check_output(args.out, "out", args.source, args.names, args.layout,
                 read_whole=(args.source if os.path.isdir(args.source) else None,), folder=True)
    source = open_source(args.source, layout=_layout_from(args.layout), names=_names(args.names))
    zs = write_zarr(source, args.out, chunk_rows=args.chunk_rows, chunk_mb=args.chunk_mb,
                    callback=_progress(args.quiet))
    if not args.quiet:
        print(file=sys.stderr)
    print_json({"out": args.out, "rows": zs.shape[0], "weights": zs.shape[1], "chunk_rows": zs.chunk_rows,
                "gib": round(zs.shape[0] * zs.shape[1] * 4 / 2**30, 3), "source": source.description})
    return 0


def _layout_from(path: str | None):
    if path is None:
        return None
    from .build import lora_layout

    return lora_layout(path)


def _read_labels(path: str, names, debias: list[str], only: list[str]):
    """(labels, attributes) of a labels CSV for these model names, with --debias/--only checked against them."""
    from .build import read_labels_csv

    labels, attributes = read_labels_csv(path, names)
    unknown = [a for a in only + debias if a not in attributes]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not among the label columns of {path} ({', '.join(attributes)})")
    return labels, attributes


def _with_directions(space, labels, method: str, debias: list[str], only: list[str]):
    from .build import attach_labels
    from .edit import fit_directions

    space = attach_labels(space, *labels)
    names = only or list(labels[1])
    return fit_directions(space, names, method=method, debias={n: debias for n in names})


def _fit_directions(args) -> int:
    from .build import load_for_labels, save_streaming

    out = args.out or args.space
    if args.out is not None:  # replacing SPACE itself is the default; any other input is refused
        check_output(args.out, "--out", args.labels)
    space = load_for_labels(args.space)
    if not space.train_names or space.train_coefs is None:
        raise ValueError(f"{args.space} has no training coefficients; build it with `python -m w2w build`")
    labels = _read_labels(args.labels, space.train_names, _split(args.debias), _split(args.only))
    space = _with_directions(space, labels, args.method, _split(args.debias), _split(args.only))
    save_streaming(space, args.space, out)
    print_json({"out": out, "directions": {n: {"spread": round(d.spread, 6), "method": d.method,
                                               "debias": list(d.debias)} for n, d in space.directions.items()}})
    return 0
