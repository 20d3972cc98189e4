"""``python -m demo``: run the example graph (load space → sample → edit → apply → KSampler → decode) headlessly
in a real ComfyUI, on the user's files when present and on clearly labelled stand-ins otherwise.

The server part is ``demo/run.py`` (standard library only); this module builds the graph and the stand-in space.
``--micro`` needs no ComfyUI: it writes the miniature world's contact sheet (``w2w.micro.demo``).
Run it from the pack's folder (where ``demo/`` and ``w2w/`` are).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import locate, run

REAL_CHECKPOINT = "realisticVisionV51_v51VAE.safetensors"
REAL_SPACE = "weights2weights.safetensors"
STANDIN_SPACE_VERSION = 1
STANDIN_SPACE_PCS = 64
STANDIN_SPACE_LABEL = "synthetic w2w space in the released layout (random values, NOT a real space)"
PROMPT, NEGATIVE = "sks person", "low quality, blurry, unfinished"  # reference defaults


def demo_graph(ckpt_name: str, space_name: str, pcs: int = 1000, *, size: int = 512, steps: int = 25, seed: int = 5,
               attribute: str = "Male", strength: float = 1.0, cfg: float = 3.0, prefix: str = "w2w-demo") -> dict:
    """API-format graph: CheckpointLoader → Load Space → Sample → Edit → Apply → KSampler → VAEDecode → SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "W2WLoadSpace", "inputs": {"space": space_name, "pcs": pcs}},
        "3": {"class_type": "W2WSampleIdentity", "inputs": {"space": ["2", 0], "seed": seed, "pcs": pcs, "factor": 1.0}},
        "4": {"class_type": "W2WApplyEditDirection", "inputs": {"space": ["2", 0], "identity": ["3", 0],
                                                               "attribute": attribute, "strength": strength,
                                                               "debias": "", "attribute_override": ""}},
        "5": {"class_type": "W2WApplyLoRA", "inputs": {"model": ["1", 0], "space": ["2", 0], "identity": ["4", 0],
                                                      "strength": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                                                  "scheduler": "normal", "denoise": 1.0, "model": ["5", 0],
                                                  "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["10", 0]}},
    }


def ensure_standin_space(cache: Path) -> Path:
    """The stand-in space (.safetensors, released layout, random values), built once into ``cache``."""
    from w2w.convert import convert_release
    from w2w.synthetic import write_release

    out = cache / f"w2w-standin-space-v{STANDIN_SPACE_VERSION}.safetensors"
    if out.is_file():
        return out
    import tempfile

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        write_release(tmp, pcs=STANDIN_SPACE_PCS, models=500, seed=0, weight_scale=2e-2)
        convert_release(tmp, str(out))
    return out


def _space_pcs(path: Path, wanted: int = 1000) -> int:
    """``wanted`` PCs, or all of a smaller .safetensors space (read from its header only)."""
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "components" in f.keys():
                return min(wanted, f.get_slice("components").get_shape()[0])
    return wanted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: $COMFYUI_PATH, the checkout containing "
                                                "this pack, then ~/ComfyUI)")
    p.add_argument("--models", type=Path, help="models folder with checkpoints/ and w2w/ (default: <ComfyUI>/models)")
    p.add_argument("--checkpoint", default=REAL_CHECKPOINT, help=f"SD1.5 checkpoint in models/checkpoints (default {REAL_CHECKPOINT})")
    p.add_argument("--space", default=REAL_SPACE, help=f"w2w space in models/w2w (default {REAL_SPACE})")
    p.add_argument("--attribute", default="Male", help="edit direction applied to the sampled identity")
    p.add_argument("--strength", type=float, default=1.0, help="edit strength in training-spread units")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--size", type=int, help="image size (default 512 with real files, 64 with stand-ins)")
    p.add_argument("--steps", type=int, help="sampling steps (default 25 with real files, 1 with stand-ins)")
    p.add_argument("--out", type=Path, default=Path("w2w-demo-output"), help="where the image is copied")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for the graph")
    p.add_argument("--micro", action="store_true",
                   help="no ComfyUI needed: sample, edit and invert in the shipped miniature w2w world (models/micro) "
                        "and write a contact sheet PNG to --out")
    p.add_argument("--micro-dir", type=Path, default=None, help="micro-world artifacts (default: the pack's models/micro)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _demo(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


MICRO_SHEET = "w2w-micro-contact-sheet.png"


def _micro_sheet(args) -> Path:
    from w2w.micro.demo import contact_sheet
    from w2w.micro.world import DEFAULT_DIR

    return Path(contact_sheet(str(args.out / MICRO_SHEET), str(args.micro_dir or DEFAULT_DIR)))


def _standin_sheet(args, say) -> Path | None:
    """Without the real files, the miniature world's contact sheet shows real (miniature) people beside the noise."""
    try:
        return _micro_sheet(args)
    except (FileNotFoundError, ValueError) as exc:
        say(f"no miniature-world contact sheet: {exc}")
        return None


def _demo(args) -> int:
    if args.micro:
        _micro_sheet(args)
        return 0
    comfyui = args.comfyui or locate.find_comfyui()
    if comfyui is None:
        raise FileNotFoundError("ComfyUI not found: " + locate.HOW_TO_PROVIDE)
    models = args.models or (Path(comfyui) / "models")
    real_ckpt = (models / "checkpoints" / args.checkpoint).exists()
    real_space = (models / "w2w" / args.space.rstrip("/")).exists()
    real = real_ckpt and real_space
    standins = []
    if not real_space:
        standins.append(run.Standin("w2w", args.space, ensure_standin_space(locate.cache_dir()), STANDIN_SPACE_LABEL))
    size = args.size or (512 if real else 64)
    steps = args.steps or (25 if real else 1)
    pcs = _space_pcs(models / "w2w" / args.space) if real_space else STANDIN_SPACE_PCS
    graph = demo_graph(args.checkpoint, args.space, pcs, size=size, steps=steps, seed=args.seed,
                       attribute=args.attribute, strength=args.strength)
    run.say(f"graph: {args.checkpoint} + {args.space} → sample seed {args.seed} → {args.attribute} {args.strength:+g} → "
            f"Apply w2w LoRA → KSampler {steps} step(s) at {size}×{size}")
    try:
        result = run.run_demo(graph, Path(comfyui), args.out, models if models.is_dir() else None,
                              extra_standins=standins, timeout=args.timeout)
    except run.DemoError as exc:
        run.say(f"FAILED: {exc}")
        return 1
    run.say(f"done in {result.seconds:.1f} s; image(s): {', '.join(str(p) for p in result.images)}")
    run.loud(result.standins_used)
    if result.standins_used:
        sheet = _standin_sheet(args, run.say)
        run.say(f"stand-in image (random weights, noise: it proves the ComfyUI path only): "
                f"{', '.join(str(p) for p in result.images) or 'none'}")
        if sheet is not None:
            run.say(f"miniature-world contact sheet (real trained miniature models: sampled, edited and inverted "
                    f"people, made by the same w2w code on a CPU): {sheet}")
    if result.pack_import_errors:
        return 1
    return 0 if result.images else 1

