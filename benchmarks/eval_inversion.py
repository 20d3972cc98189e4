"""Inversion evaluation protocol (paper Table 3): invert N face photos, generate each inverted identity with a fixed
set of prompts x seeds, ID-score every generated image against its input photo, and time every inversion.

Baseline, measured side by side in the same process: the mean identity (all coefficients at the training mean)
generated with the same prompts and seeds and scored against the same photos. The ratio inverted / baseline says how
much of the identity the inversion recovers beyond "a face made by the base model".

    nice -n 10 python benchmarks/eval_inversion.py --smoke            # CPU, ~1 min: core stand-ins only
    nice -n 10 python benchmarks/eval_inversion.py --miniature        # CPU, ~5 min: the real node graphs on stand-ins
    python benchmarks/eval_inversion.py --server http://127.0.0.1:8188 --photos faces/ \
        --checkpoint realisticVisionV51_v51VAE.safetensors --space weights2weights/ --json-out eval.json

--smoke: drawn faces as "photos", a tiny random space and a toy denoiser for the inversion (the real engine,
w2w.invert, on a toy model), a stand-in renderer instead of Stable Diffusion, random FaceNet weights.
--miniature: the same graphs as a real run (Load w2w Space, Invert Image to w2w, Apply w2w LoRA, KSampler) in a
ComfyUI started here on the CPU, with the random-weight SD1.5 stand-in, a synthetic space, 64 px and 2 inversion
steps. Both say so in their output: their numbers say nothing about w2w's quality.

A real run (GPU, the paper's settings: 10,000 PCs, 400 steps, 50 sampling steps, cfg 3.0) talks to a running ComfyUI
that has this pack, the SD1.5 checkpoint (Realistic Vision v5.1) and the released space; FaceNet's weights
(20180402-114759-vggface2.pt) are read here (--facenet, default TORCH_HOME's cache). Reference figures: paper
Table 3, w2w inversion 0.64 ID score; w2w++ reports 0.557 over 100 FFHQ faces at ~66 s per inversion (A100).
Inversion time is measured from queueing the inversion graph to its completion.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from w2w.metrics.idscore import IDScorer, IDScoreResult, get_scorer, id_score  # noqa: E402

# Prompts of the protocol: the identity token alone and in a few contexts (fixed so runs are comparable).
DEFAULT_PROMPTS = (
    "sks person",
    "a photo of sks person",
    "sks person wearing a hat",
    "a close-up portrait of sks person, outdoors",
)
DEFAULT_SEEDS = (0, 1, 2, 3)

Inverter = Callable[[object], object]  # photo (PIL image) -> identity (w2w.identity.Identity or a stand-in)
Generator = Callable[[object, str, int], object]  # (identity or None for the mean model, prompt, seed) -> image


@dataclass(frozen=True)
class Protocol:
    """What is generated for every inverted identity (and for the baseline)."""
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS

    def __post_init__(self):
        if not self.prompts or not self.seeds:
            raise ValueError(f"the protocol needs at least one prompt and one seed, got {self.prompts}, {self.seeds}")

    def jobs(self) -> list[tuple[str, int]]:
        return [(p, s) for p in self.prompts for s in self.seeds]


@dataclass(frozen=True)
class PhotoResult:
    name: str
    invert_seconds: float
    inverted: IDScoreResult  # input photo vs each generation of the inverted identity
    baseline: IDScoreResult  # input photo vs each generation of the mean identity


@dataclass
class Summary:
    photos: int
    id_inverted: float  # mean over photos of the per-photo mean (photos with at least one scored image)
    id_baseline: float
    ratio: float  # id_inverted / id_baseline
    scored_inverted: int  # generated images with a face on both sides
    scored_baseline: int
    total_images: int  # per side
    photos_without_face: list[str] = field(default_factory=list)
    invert_seconds_mean: float = math.nan
    invert_seconds_median: float = math.nan


def evaluate(photos: Sequence[tuple[str, object]], invert: Inverter, generate: Generator, scorer: IDScorer,
             protocol: Protocol = Protocol(), log: Callable[[str], None] = print) -> list[PhotoResult]:
    """Run the protocol: per photo, time the inversion, generate prompts x seeds, ID-score against the photo."""
    jobs = protocol.jobs()
    labels = [f"{prompt!r} seed {seed}" for prompt, seed in jobs]
    baseline_images = [generate(None, prompt, seed) for prompt, seed in jobs]  # the same for every photo
    results = []
    for index, (name, photo) in enumerate(photos):
        start = time.perf_counter()
        identity = invert(photo)
        seconds = time.perf_counter() - start
        images = [generate(identity, prompt, seed) for prompt, seed in jobs]
        inverted = id_score(scorer, [photo], images, reference_names=[name], generated_names=labels)
        baseline = id_score(scorer, [photo], baseline_images, reference_names=[name], generated_names=labels)
        results.append(PhotoResult(name, seconds, inverted, baseline))
        log(f"[{index + 1}/{len(photos)}] {name}: inversion {seconds:.1f} s, ID {_fmt(inverted.mean)} "
            f"({inverted.n_scored}/{len(jobs)} scored), mean-identity baseline {_fmt(baseline.mean)}")
    return results


def summarise(results: Sequence[PhotoResult]) -> Summary:
    inv = [r.inverted.mean for r in results if r.inverted.n_scored]
    base = [r.baseline.mean for r in results if r.baseline.n_scored]
    id_inv = statistics.fmean(inv) if inv else math.nan
    id_base = statistics.fmean(base) if base else math.nan
    seconds = [r.invert_seconds for r in results]
    return Summary(
        photos=len(results), id_inverted=id_inv, id_baseline=id_base,
        ratio=id_inv / id_base if inv and base and id_base != 0 else math.nan,
        scored_inverted=sum(r.inverted.n_scored for r in results),
        scored_baseline=sum(r.baseline.n_scored for r in results),
        total_images=sum(len(r.inverted.pairs) for r in results),
        photos_without_face=[r.name for r in results if r.inverted.reference_faces[0] is None],
        invert_seconds_mean=statistics.fmean(seconds) if seconds else math.nan,
        invert_seconds_median=statistics.median(seconds) if seconds else math.nan,
    )


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def print_summary(summary: Summary, smoke: bool) -> None:
    print()
    if smoke:
        print("RUN ON STAND-INS (drawn faces, random FaceNet weights, random or toy models): it checks that the "
              "protocol runs end to end; these numbers say NOTHING about w2w's quality.")
    print(f"photos: {summary.photos} ({len(summary.photos_without_face)} without a detectable face: "
          f"{summary.photos_without_face or 'none'})")
    print(f"ID score, inverted identity:  {_fmt(summary.id_inverted)}  "
          f"({summary.scored_inverted} of {summary.total_images} generated images scored)")
    print(f"ID score, mean identity:      {_fmt(summary.id_baseline)}  "
          f"({summary.scored_baseline} of {summary.total_images} scored)  [baseline, same process]")
    print(f"ratio inverted / baseline:    {_fmt(summary.ratio)}")
    print(f"time per inversion:           mean {summary.invert_seconds_mean:.2f} s, "
          f"median {summary.invert_seconds_median:.2f} s")
    if not smoke:
        print("paper Table 3: w2w inversion 0.64; w2w++ over 100 FFHQ faces: 0.557, ~66 s per inversion (A100)")


def to_json(results: Sequence[PhotoResult], summary: Summary, smoke: bool) -> dict:
    def pairs(result: IDScoreResult):
        return [{"generated": p.generated, "score": p.score, "status": p.status} for p in result.pairs]
    return {
        "smoke_run_on_stand_ins": smoke,
        "summary": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(summary).items()},
        "photos": [{"name": r.name, "invert_seconds": r.invert_seconds, "inverted": pairs(r.inverted),
                    "baseline": pairs(r.baseline)} for r in results],
    }


# ---- smoke backends: stand-ins that run on a CPU in seconds -------------------------------------------------

SMOKE_PHOTOS = {  # drawn people (skin, hair) that MTCNN detects
    "drawn_a": dict(skin=(225, 180, 150), hair=(60, 40, 30)),
    "drawn_b": dict(skin=(190, 140, 110), hair=(120, 60, 30)),
    "drawn_c": dict(skin=(225, 180, 150), hair=(200, 170, 90)),
}


class _ToyDenoiser:
    """Per-pixel MLP over 4-channel latents whose three Linear weights are W + scale * B @ A (the w2w patch)."""

    def __init__(self, scale: float, hidden: int, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.weights = [torch.randn(o, i, generator=gen) / i ** 0.5 for i, o in ((4, hidden), (hidden, hidden), (hidden, 4))]

    def __call__(self, x_t, t, cond, factors):
        n, c, h, w = x_t.shape
        x = x_t.permute(0, 2, 3, 1).reshape(n, h * w, c)
        for index, (weight, (a, b)) in enumerate(zip(self.weights, factors)):
            x = x @ (weight + self.scale * (b @ a).to(weight.dtype)).T
            if index == 0:
                x = x + (t.float() / 1000.0).view(n, 1, 1)
            if index < 2:
                x = torch.tanh(x)
        return x.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _toy_space(hidden: int = 16, pcs: int = 12, seed: int = 0):
    from w2w.layout import Layout, ModuleSlot
    from w2w.space import Space
    modules, offset = [], 0
    for name, fan_in, fan_out in (("net.0", 4, hidden), ("net.1", hidden, hidden), ("net.2", hidden, 4)):
        modules.append(ModuleSlot(name, fan_in, fan_out, offset, offset + fan_in))
        offset += fan_in + fan_out
    layout = Layout(tuple(modules), rank=1, alpha=2.0)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(layout.dim, pcs, generator=gen, dtype=torch.float64)).Q.T.float()  # (pcs, d)
    mean = 0.1 * torch.randn(layout.dim, generator=gen)
    std = 0.2 + torch.rand(layout.dim, generator=gen)
    return Space(basis.contiguous(), mean, std, layout)


def _toy_latents(photo) -> torch.Tensor:
    """Stand-in VAE encoder: the photo area-downsampled to 8x8, RGB plus luminance as 4 channels, centred."""
    import numpy as np
    x = torch.from_numpy(np.asarray(photo.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    return torch.cat([x, x.mean(1, keepdim=True)], dim=1)  # (1, 4, 8, 8)


def smoke_backends(steps: int, log: Callable[[str], None] = print) -> tuple[Inverter, Generator]:
    from w2w.metrics.standins import draw_face
    try:
        from w2w.invert import InvertSettings, invert as w2w_invert
    except ImportError as exc:
        w2w_invert = None
        log(f"w2w.invert is not available ({exc}): the smoke run uses a stand-in inverter (a fixed projection of "
            "the photo's pixels)")
    space = _toy_space()
    denoiser = _ToyDenoiser(space.layout.scale, hidden=16)
    projection = torch.randn(4 * 8 * 8, space.pcs, generator=torch.Generator().manual_seed(7)) / 16.0

    def invert(photo):
        latents = _toy_latents(photo)
        if w2w_invert is None:
            return latents.flatten() @ projection  # (pcs,)
        settings = InvertSettings(pcs=space.pcs, steps=steps, lr=0.1, seed=0)
        return w2w_invert(space, denoiser, latents, None, settings).identity.coefficients

    def generate(identity, prompt: str, seed: int):
        """Stand-in renderer: the drawn face, tinted by the first coefficients, moved and blurred by the seed."""
        beta = torch.zeros(3) if identity is None else torch.as_tensor(identity, dtype=torch.float32).flatten()[:3]
        tint = (40.0 * torch.tanh(beta)).round().int().tolist()
        skin = tuple(int(max(0, min(255, c + d))) for c, d in zip((210, 165, 135), tint))
        rng = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, prompt)))
        dx = int(torch.randint(-8, 9, (1,), generator=rng))
        return draw_face(256, skin=skin, offset=(dx, 0), blur=0.5 + float(torch.rand(1, generator=rng)))

    return invert, generate


# ---- real backends: the pack's nodes in a running ComfyUI ----------------------------------------------------

@dataclass(frozen=True)
class GraphSettings:
    """The paper's defaults (REFERENCE §4) for inversion and sampling, as node inputs."""
    checkpoint: str
    space: str  # as listed by Load w2w Space (a .safetensors file or a 'folder/' of released files)
    space_pcs: int = 10_000
    preset: str = "reference"  # reference: 10,000 PCs, lr 0.1, 400 steps; custom uses the three fields below
    pcs: int = 10_000
    invert_steps: int = 400
    lr: float = 0.1
    invert_seed: int = 0
    resolution: int = 512
    size: int = 512
    sampler_steps: int = 50
    cfg: float = 3.0
    sampler: str = "ddim"
    scheduler: str = "ddim_uniform"
    identity_prompt: str = "sks person"
    negative: str = "low quality, blurry, unfinished"


def _loaders(cfg: GraphSettings, photo_name: str | None) -> dict:
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": cfg.checkpoint}},
        "space": {"class_type": "W2WLoadSpace", "inputs": {"space": cfg.space, "pcs": cfg.space_pcs}},
    }
    if photo_name is not None:
        graph["photo"] = {"class_type": "LoadImage", "inputs": {"image": photo_name}}
        graph["invert"] = {"class_type": "W2WInvertImage", "inputs": {
            "model": ["ckpt", 0], "vae": ["ckpt", 2], "image": ["photo", 0], "space": ["space", 0],
            "preset": cfg.preset, "pcs": cfg.pcs, "steps": cfg.invert_steps, "lr": cfg.lr, "seed": cfg.invert_seed,
            "clip": ["ckpt", 1], "prompt": cfg.identity_prompt, "resolution": cfg.resolution}}
    return graph


def invert_graph(cfg: GraphSettings, photo_name: str, identity_prefix: str) -> dict:
    """Load the photo, invert it, save the identity: the part that is timed."""
    graph = _loaders(cfg, photo_name)
    graph["save_identity"] = {"class_type": "W2WSaveIdentity",
                              "inputs": {"identity": ["invert", 0], "filename_prefix": identity_prefix}}
    return graph


def generate_graph(cfg: GraphSettings, photo_name: str | None, jobs: Sequence[tuple[str, int]],
                   image_prefix: str) -> dict:
    """Generate every (prompt, seed) job with the inverted identity (same node ids as invert_graph, so ComfyUI
    reuses the cached inversion), or with the mean identity (all coefficients at the training mean) when
    ``photo_name`` is None. Output node ``save_<j>`` holds job j."""
    graph = _loaders(cfg, photo_name)
    if photo_name is None:
        graph["mean_identity"] = {"class_type": "W2WSampleIdentity",
                                  "inputs": {"space": ["space", 0], "seed": 0, "pcs": min(1000, cfg.space_pcs),
                                             "factor": 0.0}}
    identity = ["invert", 0] if photo_name is not None else ["mean_identity", 0]
    graph["apply"] = {"class_type": "W2WApplyLoRA",
                      "inputs": {"model": ["ckpt", 0], "space": ["space", 0], "identity": identity, "strength": 1.0}}
    graph["negative"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": cfg.negative}}
    graph["latent"] = {"class_type": "EmptyLatentImage",
                       "inputs": {"width": cfg.size, "height": cfg.size, "batch_size": 1}}
    for j, (prompt, seed) in enumerate(jobs):
        graph[f"positive_{j}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": prompt}}
        graph[f"sample_{j}"] = {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "seed": seed, "steps": cfg.sampler_steps, "cfg": cfg.cfg,
            "sampler_name": cfg.sampler, "scheduler": cfg.scheduler, "positive": [f"positive_{j}", 0],
            "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
        graph[f"decode_{j}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample_{j}", 0], "vae": ["ckpt", 2]}}
        graph[f"save_{j}"] = {"class_type": "SaveImage",
                              "inputs": {"images": [f"decode_{j}", 0], "filename_prefix": f"{image_prefix}_{j:03d}"}}
    return graph


class ComfyClient:
    """The few HTTP calls of a ComfyUI server the protocol needs: upload, queue, wait, fetch images."""

    def __init__(self, url: str, timeout: float = 7200.0, alive: Callable[[], bool] = lambda: True):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.alive = alive  # False once a server started here has exited: stop waiting for it

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60.0):
        import urllib.error
        import urllib.request
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"ComfyUI {path}: HTTP {error.code}: {error.read().decode('utf-8', 'replace')[:2000]}")

    def upload(self, image, name: str) -> str:
        """Upload a PIL image into ComfyUI's input folder; returns the name LoadImage takes."""
        import io as _io
        import uuid
        buffer = _io.BytesIO()
        image.save(buffer, format="PNG")
        boundary = uuid.uuid4().hex
        parts = [
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n".encode(),
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n".encode() + buffer.getvalue() + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        reply = json.loads(self._request("/upload/image", b"".join(parts),
                                         {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]

    def run(self, graph: dict) -> tuple[dict, float]:
        """Queue a graph and wait for it; (history entry, seconds from queueing to completion)."""
        import uuid
        start = time.perf_counter()
        body = json.dumps({"prompt": graph, "client_id": uuid.uuid4().hex}).encode()
        prompt_id = json.loads(self._request("/prompt", body, {"Content-Type": "application/json"},
                                             timeout=300.0))["prompt_id"]
        while time.perf_counter() - start < self.timeout:
            try:
                entry = json.loads(self._request(f"/history/{prompt_id}", timeout=300.0)).get(prompt_id)
            except (TimeoutError, ConnectionError, OSError):  # a busy CPU server can be slow to answer: ask again
                if not self.alive():
                    raise RuntimeError("the ComfyUI server exited while running the graph") from None
                time.sleep(2.0)
                continue
            status = (entry or {}).get("status", {})
            if status.get("status_str") == "error":
                errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                detail = errors[0][1] if errors else status
                raise RuntimeError(f"ComfyUI failed to run the graph: {json.dumps(detail)[:3000]}")
            if status.get("completed"):
                return entry, time.perf_counter() - start
            time.sleep(0.5)
        raise TimeoutError(f"the graph did not finish within {self.timeout:.0f} s")

    def image(self, info: dict):
        from urllib.parse import urlencode
        from PIL import Image
        import io as _io
        query = urlencode({"filename": info["filename"], "subfolder": info.get("subfolder", ""),
                           "type": info.get("type", "output")})
        return Image.open(_io.BytesIO(self._request(f"/view?{query}", timeout=300.0))).convert("RGB")


def real_backends(client: ComfyClient, cfg: GraphSettings, protocol: Protocol,
                  log: Callable[[str], None] = print) -> tuple[Inverter, Generator]:
    """Inversion and generation with the pack's nodes in a running ComfyUI (W2WInvertImage, W2WApplyLoRA, KSampler).

    The inverter returns the uploaded photo's name; the generator renders all jobs of an identity in one graph the
    first time one of them is asked for (the inversion itself is reused from ComfyUI's cache, not recomputed)."""
    jobs = protocol.jobs()
    rendered: dict[object, dict[tuple[str, int], object]] = {}
    run_tag = time.strftime("%Y%m%d-%H%M%S")

    def invert(photo):
        name = f"w2w_eval_{run_tag}_{len(rendered):04d}.png"
        uploaded = client.upload(photo, name)
        client.run(invert_graph(cfg, uploaded, f"w2w_eval/{run_tag}/{os.path.splitext(name)[0]}"))
        rendered[uploaded] = {}
        return uploaded

    def generate(identity, prompt: str, seed: int):
        key = identity  # the uploaded photo name, or None for the mean identity
        if not rendered.get(key):
            prefix = f"w2w_eval/{run_tag}/" + ("mean" if key is None else os.path.splitext(key)[0])
            entry, seconds = client.run(generate_graph(cfg, key, jobs, prefix))
            log(f"  generated {len(jobs)} images in {seconds:.1f} s ({'mean identity' if key is None else key})")
            outputs = entry.get("outputs", {})
            rendered[key] = {job: client.image(outputs[f"save_{j}"]["images"][0]) for j, job in enumerate(jobs)}
        return rendered[key][(prompt, seed)]

    return invert, generate


MINIATURE = dict(space_pcs=16, preset="custom", pcs=16, invert_steps=2, lr=0.1, resolution=64, size=64,
                 sampler_steps=1)  # --miniature: the real graphs, shrunk to run on a CPU


def _miniature_models(comfyui, workdir: str) -> list[tuple[str, object]]:
    """Stand-ins for --miniature: the random-weight SD1.5 checkpoint and a synthetic released-format space."""
    from pathlib import Path
    from demo import standins
    from w2w.synthetic import write_release
    space_dir = Path(workdir) / "w2w-standin-space"
    write_release(str(space_dir), pcs=MINIATURE["space_pcs"], models=64)
    return [("checkpoints", Path(standins.ensure_sd15_standin(comfyui))), ("w2w", space_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_argument_group("mode (one of)")
    mode.add_argument("--smoke", action="store_true",
                      help="CPU, seconds: core stand-ins only (toy denoiser, drawn faces, stand-in renderer)")
    mode.add_argument("--miniature", action="store_true",
                      help="CPU, minutes: the real node graphs in a local ComfyUI on stand-ins (random SD1.5, "
                           "synthetic space, 64 px, 2 inversion steps, 1 sampling step)")
    mode.add_argument("--server", metavar="URL", help="real run against a running ComfyUI with this pack "
                                                      "(e.g. http://127.0.0.1:8188)")
    mode.add_argument("--start-server", action="store_true",
                      help="real run in a local ComfyUI started here on the CPU (found via $COMFYUI_PATH or "
                           "~/ComfyUI), with the models of --models")
    parser.add_argument("--models", default=None, help="--start-server: a models folder (checkpoints/, w2w/, ...)")
    parser.add_argument("--photos", help="folder of face photos (real runs; default for --smoke/--miniature: drawn faces)")
    parser.add_argument("--checkpoint", help="real runs: SD1.5 checkpoint name as ComfyUI lists it")
    parser.add_argument("--space", help="real runs: w2w space name as Load w2w Space lists it ('folder/' or file)")
    parser.add_argument("--facenet", default=None, help="FaceNet weights (default: TORCH_HOME's cache; "
                                                        "--smoke/--miniature: random weights)")
    parser.add_argument("--prompts", nargs="+", default=None, help=f"prompts (default: {list(DEFAULT_PROMPTS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"seeds (default: {list(DEFAULT_SEEDS)})")
    parser.add_argument("--steps", type=int, default=30, help="--smoke: inversion steps on the toy model (default 30)")
    parser.add_argument("--json-out", default=None, help="also write every score as JSON here")
    args = parser.parse_args(argv)
    chosen = [args.smoke, args.miniature, bool(args.server), args.start_server]
    if sum(chosen) != 1:
        parser.error("choose one of --smoke, --miniature, --server URL, --start-server")
    stand_ins = args.smoke or args.miniature
    short = stand_ins and not args.prompts and not args.seeds
    protocol = Protocol(tuple(args.prompts or (DEFAULT_PROMPTS[:1] if short else DEFAULT_PROMPTS)),
                        tuple(args.seeds or (DEFAULT_SEEDS[:2] if short else DEFAULT_SEEDS)))

    with tempfile.TemporaryDirectory() as tmp:
        if stand_ins:
            from w2w.metrics.standins import draw_face, save_random_facenet
            print("RUN ON STAND-INS: drawn faces and random FaceNet weights" +
                  (", a toy denoiser and a stand-in renderer." if args.smoke else
                   ", a random-weight SD1.5 checkpoint and a synthetic space in a real ComfyUI."))
            scorer = get_scorer(args.facenet or save_random_facenet(os.path.join(tmp, "random-facenet.pt"), seed=0))
            photos = [(name, draw_face(256, **colours)) for name, colours in SMOKE_PHOTOS.items()]
            if args.miniature:
                photos = photos[:1]
        else:
            scorer = get_scorer(args.facenet)
        if args.photos:
            from w2w.metrics.cli import list_images, load_image
            photos = [(os.path.basename(p), load_image(p)) for p in list_images(args.photos)]

        if args.smoke:
            invert, generate = smoke_backends(args.steps)
            return _finish(evaluate(photos, invert, generate, scorer, protocol), args, smoke=True)
        if args.miniature:
            cfg = GraphSettings(checkpoint="(the stand-in)", space="w2w-standin-space/", **MINIATURE)
        else:
            if not (args.photos and args.checkpoint and args.space):
                parser.error("real runs need --photos, --checkpoint and --space")
            cfg = GraphSettings(checkpoint=args.checkpoint, space=args.space)
        if args.server:
            invert, generate = real_backends(ComfyClient(args.server), cfg, protocol)
            return _finish(evaluate(photos, invert, generate, scorer, protocol), args, smoke=False)
        return _run_local(args, cfg, photos, scorer, protocol, tmp)


def _run_local(args, cfg: GraphSettings, photos, scorer, protocol: Protocol, tmp: str) -> int:
    """Start ComfyUI on the CPU in a throw-away base directory (the demo's server runner), then run the protocol."""
    from pathlib import Path
    from demo.locate import HOW_TO_PROVIDE, find_comfyui
    from demo.run import ComfyServer, prepare_base_dir
    comfyui = find_comfyui()
    if comfyui is None:
        raise SystemExit("ComfyUI not found: " + HOW_TO_PROVIDE)
    stage = _miniature_models(comfyui, tmp) if args.miniature else []
    if args.miniature:
        cfg = dataclasses.replace(cfg, checkpoint=stage[0][1].name)
    base = Path(tmp) / "comfy-base"
    prepare_base_dir(base, Path(args.models) if args.models else None, stage)
    with ComfyServer(comfyui, base) as server:
        client = ComfyClient(server.url, alive=lambda: server.process is not None and server.process.poll() is None)
        invert, generate = real_backends(client, cfg, protocol)
        try:
            results = evaluate(photos, invert, generate, scorer, protocol)
        except Exception:
            print(f"ComfyUI's log (last lines):\n{server.log_tail(40)}", file=sys.stderr)
            raise
    return _finish(results, args, smoke=args.miniature)


def _finish(results: list[PhotoResult], args, smoke: bool) -> int:
    summary = summarise(results)
    print_summary(summary, smoke=smoke)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(to_json(results, summary, smoke), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
