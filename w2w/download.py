"""``python -m w2w download``: fetch the released space from the Hugging Face Hub, then convert it.

Never called from a node: graphs only read files that are already on disk. Needs ``huggingface_hub`` (optional
dependency) and internet access. Layout written under the w2w model folder::

    models/w2w/weights2weights/files/V.pt, mean.pt, ...   the released files (a space folder by themselves)
    models/w2w/weights2weights.safetensors                 our converted single-file space (faster to load)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .cli_common import POSITIVE
from .space import OPTIONAL_RELEASE_FILES, RELEASE_FILES

REPO_ID = "snap-research/weights2weights"
HUB_FOLDER = "files"
RELEASE_NAME = "weights2weights"
DOWNLOAD_FILES = RELEASE_FILES + OPTIONAL_RELEASE_FILES  # ~4.3 GB in all (V.pt is 3.99 GB)


def _hub():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ImportError("`python -m w2w download` needs huggingface_hub: pip install huggingface_hub "
                          "(or download the files/ folder of snap-research/weights2weights by hand into "
                          "models/w2w/weights2weights/files/)") from exc
    return huggingface_hub


def download_release(dest: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Download the released files into ``dest/files/`` and return that folder."""
    hub = _hub()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hub.snapshot_download(repo_id=REPO_ID, revision=revision, local_dir=str(dest),
                          allow_patterns=[f"{HUB_FOLDER}/{name}" for name in DOWNLOAD_FILES])
    folder = dest / HUB_FOLDER
    missing = [name for name in RELEASE_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the download into {folder} lacks {', '.join(missing)}; "
                                f"check the repository {REPO_ID} and run the command again")
    return folder


def default_models_dir(env: dict | None = None) -> Path | None:
    """``<ComfyUI>/models/w2w`` for the ComfyUI containing this pack, else ``$COMFYUI_PATH``; None if neither."""
    env = os.environ if env is None else env
    here = Path(__file__).parent.parent
    for candidate in (here.absolute(), here.resolve()):  # the pack folder, as linked and as resolved
        if candidate.parent.name == "custom_nodes":
            return candidate.parent.parent / "models" / "w2w"
    if env.get("COMFYUI_PATH", "").strip():
        return Path(env["COMFYUI_PATH"]).expanduser() / "models" / "w2w"
    return None


def download_and_convert(w2w_dir: str | os.PathLike, *, convert: bool = True, pcs: int | None = None,
                         dtype=None, revision: str | None = None,
                         callback: Callable[[int, int, str], None] | None = None) -> tuple[Path, Path | None]:
    """Download into ``w2w_dir/weights2weights/files`` and (``convert``) write ``w2w_dir/weights2weights.safetensors``."""
    import torch

    from .convert import convert_release

    w2w_dir = Path(w2w_dir)
    folder = download_release(w2w_dir / RELEASE_NAME, revision=revision)
    if not convert:
        return folder, None
    out = w2w_dir / f"{RELEASE_NAME}.safetensors"
    convert_release(str(folder), str(out), pcs=pcs, dtype=dtype or torch.float32, callback=callback)
    return folder, out


def register(sub) -> None:
    p = sub.add_parser("download", help="download the released w2w space from the Hugging Face Hub and convert it")
    p.add_argument("--dest", type=Path, default=None,
                   help="the w2w model folder (default: <ComfyUI>/models/w2w for the ComfyUI containing this pack, "
                        "else $COMFYUI_PATH/models/w2w)")
    p.add_argument("--no-convert", action="store_true", help="only download (the folder of released files loads too)")
    p.add_argument("--pcs", type=POSITIVE, default=None, help="PCs kept in the converted file (default: all 10,000)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="basis dtype of the converted file")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.set_defaults(func=_download)


def _download(args) -> int:
    import torch

    dest = args.dest or default_models_dir()
    if dest is None:
        raise FileNotFoundError("cannot tell where ComfyUI's models folder is: pass --dest <ComfyUI>/models/w2w "
                                "or set COMFYUI_PATH")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ValueError(f"--dest {dest} is a file; give the w2w model folder (e.g. <ComfyUI>/models/w2w)")
    print(f"downloading {REPO_ID} {HUB_FOLDER}/ (~4.3 GB) into {Path(dest) / RELEASE_NAME}")

    def progress(i, n, what):
        print(f"\r{what}: {i}/{n}", end="", flush=True)

    folder, out = download_and_convert(dest, convert=not args.no_convert, pcs=args.pcs,
                                       dtype=getattr(torch, args.dtype), revision=args.revision, callback=progress)
    print(f"\nreleased files: {folder}")
    if out is not None:
        print(f"converted space: {out}  (choose '{out.name}' in Load w2w Space)")
    return 0
