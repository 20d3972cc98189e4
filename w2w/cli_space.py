"""CLI commands over spaces and identities: info, attributes, convert, sample, edit, blend, export-lora, nearest."""
from __future__ import annotations

import argparse

import torch

from .cli_common import POSITIVE, check_output, finite, print_json

SPACE_HELP = "a w2w space: our .safetensors file or a folder of the released files (V.pt, mean.pt, ...)"


def register(sub) -> None:
    p = sub.add_parser("info", help="summarise a space")
    p.add_argument("space", help=SPACE_HELP)
    p.set_defaults(func=_info)

    p = sub.add_parser("attributes", help="list the attributes a space can edit")
    p.add_argument("space", help=SPACE_HELP)
    p.set_defaults(func=_attributes)

    p = sub.add_parser("convert", help="convert released files to one .safetensors space")
    p.add_argument("release_dir", help="folder with V.pt, mean.pt, std.pt, weight_dimensions.pt (+ proj_1000pc.pt, ...)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--pcs", type=POSITIVE, default=None, help="keep the first PCS principal components (default: all)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype of the basis")
    p.add_argument("--no-training", action="store_true", help="leave out training coefficients and labels")
    p.set_defaults(func=_convert)

    p = sub.add_parser("sample", help="sample a new identity (paper §3.2)")
    p.add_argument("space", help=SPACE_HELP)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--pcs", type=POSITIVE, default=None,
                   help="number of PCs to sample (default 1000, or every PC of a smaller space)")
    p.add_argument("--factor", type=finite, default=1.0, help="spread multiplier of each PC's std (default 1.0)")
    p.add_argument("--out", required=True, help="identity .safetensors to write")
    p.set_defaults(func=_sample)

    p = sub.add_parser("edit", help="move an identity along attribute directions (paper §3.3)")
    p.add_argument("space", help=SPACE_HELP)
    p.add_argument("identity", help="identity .safetensors")
    p.add_argument("--edit", action="append", required=True, metavar="ATTR=STRENGTH",
                   help="attribute and strength in training-spread units; repeat to compose")
    p.add_argument("--debias", default="", help="comma-separated attributes to keep unchanged (e.g. Male,Young)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_edit)

    p = sub.add_parser("blend", help="interpolate two identities: (1-t)·ID1 + t·ID2")
    p.add_argument("space", help=SPACE_HELP)
    p.add_argument("id1")
    p.add_argument("id2")
    p.add_argument("--t", type=finite, default=0.5, help="0 = ID1, 1 = ID2 (default 0.5)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_blend)

    p = sub.add_parser("export-lora", help="write an identity as a standard LoRA file")
    p.add_argument("space", help=SPACE_HELP)
    p.add_argument("identity")
    p.add_argument("--out", required=True, help=".safetensors file (kohya, diffusers) or folder (peft)")
    p.add_argument("--format", choices=("kohya", "peft", "diffusers"), default="kohya")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.set_defaults(func=_export)

    p = sub.add_parser("nearest", help="training models closest to an identity")
    p.add_argument("space", help=SPACE_HELP)
    p.add_argument("identity")
    p.add_argument("--top", type=POSITIVE, default=5, help="how many (default 5)")
    p.set_defaults(func=_nearest)


def _load(path: str, pcs=None, training=True):
    from .space import load_space

    return load_space(path, pcs, training=training)


def _info(args) -> int:
    print_json(_load(args.space, training=True).describe())
    return 0


def _attributes(args) -> int:
    for name in _load(args.space).attributes:
        print(name)
    return 0


def _convert(args) -> int:
    from .convert import convert_release

    def progress(i, n, what):
        print(f"\r{what}: {i}/{n}", end="", flush=True)

    check_output(args.out, "out", args.release_dir)
    space = convert_release(args.release_dir, args.out, pcs=args.pcs, dtype=getattr(torch, args.dtype),
                            training=not args.no_training, callback=progress)
    print()
    print_json(space.describe())
    return 0


def _sample(args) -> int:
    from .identity import save_identity
    from .sampling import sample_identity

    check_output(args.out, "--out", args.space)
    space = _load(args.space, pcs=None)
    pcs = args.pcs if args.pcs is not None else min(1000, space.coef_std.numel() if space.coef_std is not None
                                                    else space.total_pcs)
    identity = sample_identity(space, args.seed, pcs, args.factor)
    save_identity(identity, args.out)
    print(f"wrote {args.out} ({identity.pcs} coefficients)")
    return 0


def _edit(args) -> int:
    from .edit import apply_edit
    from .identity import load_identity, save_identity

    check_output(args.out, "--out", args.space)  # the identity itself may be edited in place
    space = _load(args.space)
    identity = load_identity(args.identity)
    debias = [d.strip() for d in args.debias.split(",") if d.strip()]
    for item in args.edit:
        attr, sep, strength = item.partition("=")
        if not sep:
            raise ValueError(f"--edit {item!r}: write ATTR=STRENGTH, e.g. --edit Male=1.5")
        try:
            value = finite(strength)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--edit {item!r}: the strength {exc}; write ATTR=STRENGTH, e.g. --edit Male=1.5") from None
        identity = apply_edit(space, identity, attr.strip(), value, debias)
    save_identity(identity, args.out)
    print(f"wrote {args.out}: {' | '.join(identity.history)}")
    return 0


def _blend(args) -> int:
    from .edit import blend
    from .identity import load_identity, save_identity

    check_output(args.out, "--out", args.space)
    result = blend(_load(args.space, training=False), load_identity(args.id1), load_identity(args.id2), args.t)
    save_identity(result, args.out)
    print(f"wrote {args.out}")
    return 0


def _export(args) -> int:
    from .export import export_lora
    from .identity import load_identity

    check_output(args.out, "--out", args.space, args.identity, folder=args.format == "peft")
    identity = load_identity(args.identity)
    space = _load(args.space, pcs=None, training=False)
    path = export_lora(space, identity, args.out, args.format, getattr(torch, args.dtype))
    print(f"wrote {path} ({args.format})")
    return 0


def _nearest(args) -> int:
    from .edit import nearest_training
    from .identity import load_identity

    rows = nearest_training(_load(args.space), load_identity(args.identity), args.top)
    print_json([{"row": r, "name": n, "cosine": c} for r, n, c in rows])
    return 0
