"""Clearly labelled stand-in models for the demo and the tests: NOT real models.

`ensure_sd15_standin(comfyui)` returns the path of a random-weight, full-size SD1.5-architecture
checkpoint (UNet model_channels=320 / context_dim=768, CLIP-L text encoder, AutoencoderKL), saved
fp16 as a single .safetensors with the original ldm checkpoint key names, so the stock
CheckpointLoaderSimple loads it and detects SD15. It is built once per cache in a subprocess that
runs this file with ComfyUI on sys.path; this module itself imports only the standard library.

`ensure_controlnet_standin(comfyui)` does the same for an SD1.5 ControlNet (ComfyUI's own `cldm.ControlNet` with the
SD1.5 UNet config and a 3-channel hint, ldm keys under `control_model.`), which the stock ControlNetLoader loads.

Run as a script:
    python demo/standins.py build --comfyui PATH [--kind sd15|controlnet] [--out FILE] [--seed N]  # needs ComfyUI
    python demo/standins.py path [--kind sd15|controlnet] [--seed N]                                 # the cache path
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `demo.locate` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo.locate import cache_dir  # noqa: E402

# Bump when the builder changes what it writes: the file name changes, so caches rebuild.
STANDIN_VERSION = 1
DEFAULT_SEED = 0
LABEL = "w2w-standin: random weights with the SD1.5 architecture; NOT a real model, images are noise"

# The SD1.5 UNet as ComfyUI's model detection describes it (comfy/model_detection.py, SD15).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The SD1.x AutoencoderKL (comfy/sd.py, "default SD1.x/SD2.x VAE parameters").
SD15_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


KINDS = {"sd15": "SD1.5 stand-in checkpoint", "controlnet": "SD1.5 ControlNet stand-in"}


def standin_path(kind: str = "sd15", seed: int = DEFAULT_SEED, cache: Path | None = None) -> Path:
    """Cache location of the stand-in of `kind` for `seed` (the name carries STANDIN_VERSION)."""
    if kind not in KINDS:
        raise ValueError(f"unknown stand-in kind {kind!r}; choose one of {', '.join(KINDS)}")
    directory = cache_dir() if cache is None else Path(cache)
    name = "sd15" if kind == "sd15" else "controlnet-sd15"
    return directory / f"w2w-standin-{name}-v{STANDIN_VERSION}-seed{seed}-fp16.safetensors"


def sd15_standin_path(seed: int = DEFAULT_SEED, cache: Path | None = None) -> Path:
    return standin_path("sd15", seed, cache)


@contextlib.contextmanager
def _build_lock(target: Path):
    """Serialise builds of `target` across processes (POSIX flock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds only waste time, the write stays atomic
        yield
        return
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_sd15_standin(comfyui: str | os.PathLike, seed: int = DEFAULT_SEED, cache: Path | None = None,
                        log=print, timeout: float = 1800.0, python: str = sys.executable) -> Path:
    """Return the cached SD1.5 stand-in, building it first (in a subprocess) if it is missing."""
    return ensure_standin(comfyui, "sd15", seed, cache, log, timeout, python)


def ensure_controlnet_standin(comfyui: str | os.PathLike, seed: int = DEFAULT_SEED, cache: Path | None = None,
                              log=print, timeout: float = 1800.0, python: str = sys.executable) -> Path:
    """Return the cached SD1.5 ControlNet stand-in, building it first (in a subprocess) if it is missing."""
    return ensure_standin(comfyui, "controlnet", seed, cache, log, timeout, python)


def ensure_standin(comfyui: str | os.PathLike, kind: str = "sd15", seed: int = DEFAULT_SEED, cache: Path | None = None,
                   log=print, timeout: float = 1800.0, python: str = sys.executable) -> Path:
    """Return the cached stand-in of `kind`, building it first (in a subprocess) if it is missing."""
    target = standin_path(kind, seed, cache)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if target.is_file():  # built by another process while we waited
            return target
        log(f"[w2w] building the {KINDS[kind]} (random weights, not a real model) -> {target}")
        cmd = [python, str(Path(__file__).resolve()), "build", "--comfyui", str(comfyui), "--kind", kind,
               "--out", str(target), "--seed", str(seed)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not target.is_file():
            raise RuntimeError(
                f"building the {KINDS[kind]} failed (exit {done.returncode}); command: {' '.join(cmd)}\n"
                f"--- stderr (tail) ---\n{done.stderr[-4000:]}"
            )
        stats = _last_json_line(done.stdout)
        if stats:
            log(f"[w2w] stand-in built in {stats['seconds']:.1f} s, peak memory {stats['peak_rss_mb']:.0f} MB, "
                f"{stats['parameters']:,} parameters, {stats['bytes'] / 2**30:.2f} GiB")
    return target


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


# --------------------------------------------------------------------------------------------
# Everything below runs in the build subprocess, with ComfyUI importable.

def _tensor_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed derived from (seed, key): each tensor is independent of the others."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _init_tensor(key: str, shape, seed: int, dtype):
    """Deterministic init: norms' weights 1, biases 0, matrices/convs/embeddings N(0, 1/fan_in)."""
    import torch

    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # every 1-D weight in SD1.5 (GroupNorm, LayerNorm) is a norm scale
        return torch.ones(shape, dtype=dtype)
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    generator = torch.Generator().manual_seed(_tensor_seed(seed, key))
    values = torch.randn(shape, generator=generator, dtype=torch.float32) * fan_in ** -0.5
    return values.to(dtype)


def _sd15_shapes():
    """{checkpoint key: meta tensor} for SD1.5, from ComfyUI's own classes (no memory allocated)."""
    import torch
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float16, None)
    unet = model_config.get_model({}, "", device="meta")
    clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
    with torch.device("meta"):
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD15_VAE_DDCONFIG), embed_dim=4)
    # Same conversion as comfy.sd.save_checkpoint: ldm names, model./cond_stage_model./first_stage_model.
    return unet.state_dict_for_saving(clip.state_dict(), vae.state_dict())


def _controlnet_shapes():
    """{file key: meta tensor} of an SD1.5 ControlNet (ldm names under `control_model.`, as the .pth releases)."""
    import torch
    import comfy.cldm.cldm

    config = {k: v for k, v in SD15_UNET_CONFIG.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, dtype=torch.float16, device="meta")
    return {f"control_model.{k}": v for k, v in net.state_dict().items()}


def build_sd15_checkpoint(out_path: Path, seed: int = DEFAULT_SEED) -> dict:
    """Build the SD1.5 stand-in into `out_path` atomically; ComfyUI must be importable. Returns stats."""
    import comfy.model_detection
    import comfy.supported_models

    def check(state_dict):
        detected = comfy.model_detection.model_config_from_unet(state_dict, "model.diffusion_model.")
        if not isinstance(detected, comfy.supported_models.SD15):
            raise RuntimeError(f"ComfyUI detects the stand-in as {type(detected).__name__}, expected SD15")

    return _build(out_path, seed, _sd15_shapes(), "SD15", check)


def build_controlnet(out_path: Path, seed: int = DEFAULT_SEED) -> dict:
    """Build the SD1.5 ControlNet stand-in into `out_path` atomically; ComfyUI must be importable. Returns stats."""
    import comfy.model_detection
    import comfy.supported_models

    def check(state_dict):
        detected = comfy.model_detection.model_config_from_unet(state_dict, "control_model.", True)
        if not isinstance(detected, comfy.supported_models.SD15):
            raise RuntimeError(f"ComfyUI detects the ControlNet stand-in as {type(detected).__name__}, expected SD15")

    return _build(out_path, seed, _controlnet_shapes(), "SD15 ControlNet", check)


def _build(out_path: Path, seed: int, shapes: dict, architecture: str, check) -> dict:
    import torch
    import comfy.utils

    start = time.perf_counter()
    state_dict = {key: _init_tensor(key, tuple(meta.shape), seed, torch.float16) for key, meta in sorted(shapes.items())}
    check(state_dict)
    metadata = {"w2w.standin": LABEL, "w2w.standin.version": str(STANDIN_VERSION), "w2w.standin.seed": str(seed),
                "w2w.standin.architecture": architecture}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        comfy.utils.save_torch_file(state_dict, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(),
            "parameters": sum(t.numel() for t in state_dict.values()), "bytes": out_path.stat().st_size,
            "tensors": len(state_dict)}


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _import_comfyui(comfyui: Path) -> None:
    """Put ComfyUI first on sys.path and force CPU before anything imports comfy.model_management."""
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a stand-in (needs ComfyUI)")
    build.add_argument("--comfyui", required=True, type=Path, help="ComfyUI checkout to import")
    build.add_argument("--kind", choices=sorted(KINDS), default="sd15")
    build.add_argument("--out", type=Path, help="output file (default: the cache path)")
    build.add_argument("--seed", type=int, default=DEFAULT_SEED)
    path = sub.add_parser("path", help="print where the stand-in is cached")
    path.add_argument("--kind", choices=sorted(KINDS), default="sd15")
    path.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    if args.command == "path":
        print(standin_path(args.kind, args.seed))
        return 0
    if hasattr(os, "nice"):
        os.nice(10)  # a background build should not starve interactive work
    _import_comfyui(args.comfyui.resolve())
    build_fn = build_sd15_checkpoint if args.kind == "sd15" else build_controlnet
    stats = build_fn(args.out or standin_path(args.kind, args.seed), args.seed)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
