"""``python -m w2w idscore REF GEN``: the paper's ID score between two folders (or files) of images."""
from __future__ import annotations

import argparse
import json
import math
import os

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def register(sub) -> None:
    p = sub.add_parser(
        "idscore", help="ID score (MTCNN + FaceNet VGGFace2 cosine similarity) of generated images vs references",
        description="Compare faces in GEN with faces in REF. REF with one image: every generated image is compared "
                    "with it. Otherwise files are paired by name without extension (a.png <-> a.jpg) and every name "
                    "must be on both sides. Images without a detectable face are listed, not averaged in. Needs "
                    "`pip install --no-deps -r requirements-idscore.txt` and the FaceNet weights file.")
    p.add_argument("ref_dir", metavar="REF_DIR", help="folder of reference images (or one image file)")
    p.add_argument("gen_dir", metavar="GEN_DIR", help="folder of generated images (or one image file)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="FaceNet 20180402-114759-vggface2.pt (default: $TORCH_HOME/checkpoints/, i.e. "
                        "~/.cache/torch/checkpoints/ unless TORCH_HOME is set)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--crops", default=None, metavar="DIR", help="also save reference|generated crop pairs as PNGs here")
    p.set_defaults(func=_idscore)


def list_images(path: str) -> list[str]:
    """Image files of a folder, sorted by name; a single image file as a one-item list."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder or image file")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def pair_files(references: list[str], generated: list[str]) -> list[tuple[int, int]]:
    """One reference: with every generated image. Otherwise pair by file name without extension."""
    if len(references) == 1:
        return [(0, g) for g in range(len(generated))]
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
    ref_index = {stem(p): i for i, p in enumerate(references)}
    gen_index = {stem(p): i for i, p in enumerate(generated)}
    only_ref, only_gen = sorted(set(ref_index) - set(gen_index)), sorted(set(gen_index) - set(ref_index))
    if only_ref or only_gen or len(ref_index) != len(references) or len(gen_index) != len(generated):
        raise ValueError(
            "with several references, files are paired by name and every name must be on both sides: "
            f"only in REF {only_ref[:5]}, only in GEN {only_gen[:5]} (or two files share a name with different "
            "extensions); or give a single reference image")
    return [(ref_index[name], gen_index[name]) for name in sorted(ref_index)]


def load_image(path: str):
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except OSError as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from None


def _idscore(args: argparse.Namespace) -> int:
    from .idscore import get_scorer, id_score, preview_crops

    if args.crops:  # crops saved among the images would be read as images by the next score
        from ..cli_common import check_output

        check_output(args.crops, "--crops", args.ref_dir, args.gen_dir, folder=True,
                     read_whole=tuple(d for d in (args.ref_dir, args.gen_dir) if os.path.isdir(d)))
    ref_files, gen_files = list_images(args.ref_dir), list_images(args.gen_dir)
    pairs = pair_files(ref_files, gen_files)
    scorer = get_scorer(args.weights, args.device)
    result = id_score(scorer, [load_image(p) for p in ref_files], [load_image(p) for p in gen_files],
                      reference_names=[os.path.basename(p) for p in ref_files],
                      generated_names=[os.path.basename(p) for p in gen_files], pairs=pairs)
    if args.crops:
        _save_crops(preview_crops(result), result, args.crops)
    if args.json:
        print(json.dumps({
            "mean": None if math.isnan(result.mean) else result.mean,
            "scored": result.n_scored, "pairs": len(result.pairs),
            "results": [{"reference": p.reference, "generated": p.generated, "score": p.score, "status": p.status}
                        for p in result.pairs],
        }, indent=2))
    else:
        print(result.report())
    return 0 if result.n_scored else 1


def _save_crops(tiles, result, folder: str) -> None:
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for tile, pair in zip(tiles, result.pairs):
        name = f"{os.path.splitext(pair.reference)[0]}__{os.path.splitext(pair.generated)[0]}.png"
        target = os.path.join(folder, name)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.partial.png")  # hidden until complete
        Image.fromarray((tile.numpy() * 255.0).round().astype("uint8")).save(tmp)
        os.replace(tmp, target)
