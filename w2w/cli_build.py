"""CLI commands that make spaces: build (streaming PCA over LoRAs or a weight matrix) and fit-directions."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .cli_common import print_json


def register(sub) -> None:
    p = sub.add_parser(
        "build", help="build a space from a folder of LoRAs or an N x d weight matrix (out-of-core PCA)",
        description="Standardise every weight over the training models, then keep the first PCS principal components "
                    "with a randomized SVD that streams over the models in blocks: the matrix is never held whole. "
                    "Passes over the data: power-iters + 2.",
        epilog="examples:\n  python -m w2w build my_space.safetensors --from loras/ --pcs 100 --labels labels.csv\n"
               "  python -m w2w build space.safetensors --from all_weights.pt --pcs 1000 --memory-mb 4096",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the space .safetensors to write (written to a temporary file, then renamed)")
    p.add_argument("--from", dest="source", required=True, metavar="SRC",
                   help="a folder of LoRA .safetensors files / PEFT adapter folders (kohya, PEFT or diffusers keys, one "
                        "layout), or an N x d matrix file: .npy, .safetensors (one 2-D tensor) or .pt (torch.save)")
    p.add_argument("--pcs", type=int, default=1000, help="principal components to keep (default 1000)")
    p.add_argument("--power-iters", type=int, default=1,
                   help="power iterations of the randomized SVD; each is one more pass (default 1)")
    p.add_argument("--oversample", type=int, default=None,
                   help="extra sketch columns beyond PCS (default max(10, PCS/4)); more = more accurate last PCs")
    p.add_argument("--memory-mb", type=int, default=1024,
                   help="memory for blocks of rows; a matrix smaller than this is cached in memory (default 1024)")
    p.add_argument("--block-rows", type=int, default=None, help="rows per block (default: from --memory-mb)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sketch (default 0)")
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
    p.set_defaults(func=_build)

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


def _progress(quiet: bool):
    started = time.perf_counter()

    def report(step: int, total: int, what: str) -> None:
        if not quiet:
            print(f"\r{what:>16}: {step}/{total} blocks, {time.perf_counter() - started:7.1f} s", end="",
                  file=sys.stderr, flush=True)
    return report


def _build(args) -> int:
    from .build import BuildConfig, build_space, open_source
    from .space import save_space

    names = None
    if args.names:
        with open(args.names) as f:
            names = [line.strip() for line in f if line.strip()]
    layout = _layout_from(args.layout)
    source = open_source(args.source, layout=layout, names=names)
    config = BuildConfig(pcs=args.pcs, oversample=args.oversample, power_iters=args.power_iters,
                         memory_mb=args.memory_mb, block_rows=args.block_rows, seed=args.seed)
    result = build_space(source, config, callback=_progress(args.quiet))
    if not args.quiet:
        print(file=sys.stderr)
    space = result.space
    if args.labels:
        space = _with_directions(space, args.labels, args.method, _split(args.debias), [])
    save_space(space, args.out, dtype=getattr(torch, args.dtype), extra_metadata=result.metadata())
    summary = space.describe()
    summary.update(explained_variance=round(float(result.explained_variance_ratio.sum()), 6),
                   seconds=round(result.seconds, 2), out=args.out)
    print_json(summary)
    return 0


def _layout_from(path: str | None):
    if path is None:
        return None
    from .build import lora_layout

    return lora_layout(path)


def _with_directions(space, labels_path: str, method: str, debias: list[str], only: list[str]):
    from .build import attach_labels, read_labels_csv
    from .edit import fit_directions

    labels, attributes = read_labels_csv(labels_path, space.train_names)
    space = attach_labels(space, labels, attributes)
    unknown = [a for a in only + debias if a not in attributes]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not among the label columns of {labels_path} "
                         f"({', '.join(attributes)})")
    names = only or list(attributes)
    return fit_directions(space, names, method=method, debias={n: debias for n in names})


def _fit_directions(args) -> int:
    from .build import load_for_labels, save_streaming

    space = load_for_labels(args.space)
    if not space.train_names or space.train_coefs is None:
        raise ValueError(f"{args.space} has no training coefficients; build it with `python -m w2w build`")
    space = _with_directions(space, args.labels, args.method, _split(args.debias), _split(args.only))
    out = args.out or args.space
    save_streaming(space, args.space, out)
    print_json({"out": out, "directions": {n: {"spread": round(d.spread, 6), "method": d.method,
                                               "debias": list(d.debias)} for n, d in space.directions.items()}})
    return 0
