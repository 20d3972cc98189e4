"""Training pairs for a face encoder of a real space: a pairs folder, and rendering one through a ComfyUI server.

A **pairs folder** is what ``python -m w2w train-encoder --pairs DIR`` reads and what rendering writes::

    DIR/pairs.jsonl      one JSON object per line: {"image": "<photo file>", "identity": "<identity file>"}
                         (paths relative to DIR; an identity file is what Save w2w Identity writes)
    DIR/render.json      (rendered folders only) the settings they were rendered with

A user's own pairs (photos of people with identities inverted or chosen for them) are a folder in that format.

**Rendering** (HyperDreamBooth-style amortisation): identities sampled from the space (paper §3.2, seeds ``seed + i``)
are drawn by the base model through a running ComfyUI with this pack installed — Load w2w Space → Sample Identity →
Apply w2w LoRA → KSampler → VAE Decode → Preview Image, one graph per image, posted over loopback HTTP (the server
is the user's own: on a GPU, ``python main.py``). Only the standard library talks to the server; nothing here imports
ComfyUI. The server's space must be the same space (its fingerprint is checked through ``/w2w/spaces/<name>``).
Rendering resumes: every finished image is appended to ``pairs.jsonl`` at once, and a restarted run skips them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .encoder import EncoderMismatch, PairSet
from .identity import load_identity, save_identity
from .safeload import W2WFileError
from .sampling import sample_identity

__all__ = ["MANIFEST", "RENDER_SETTINGS", "DEFAULT_PROMPTS", "RenderSettings", "ComfyRenderer", "RenderError",
           "render_pairs", "read_manifest", "load_pairs", "frame_photos01"]

MANIFEST = "pairs.jsonl"
RENDER_SETTINGS = "render.json"
# Varied framings of the space's prompt, "sks person" (paper); all portraits, as the space's training images.
DEFAULT_PROMPTS = ("sks person", "a photo of sks person", "a close-up portrait photo of sks person",
                   "sks person, headshot, natural light", "a photo of sks person outdoors", "sks person smiling")
NEGATIVE = "low quality, blurry, unfinished"  # the paper's negative prompt


class RenderError(ValueError):
    """The ComfyUI server refused or failed a graph, or cannot render pairs for this space."""


@dataclass(frozen=True)
class RenderSettings:
    """How a pairs folder is rendered (stored in render.json; a resumed run must use the same)."""

    checkpoint: str  # the server's models/checkpoints file (the space's base model: Realistic Vision v5.1)
    space: str  # the space's name on the server (Load w2w Space's choice)
    space_fingerprint: str
    identities: int
    renders_per_identity: int = 2
    sample_pcs: int = 1000  # PCs sampled per identity (the paper's default)
    factor: float = 1.0  # sampling spread
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    negative: str = NEGATIVE
    size: int = 512
    steps: int = 25
    cfg: float = 3.0  # the paper's sampling cfg
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.identities < 1 or self.renders_per_identity < 1 or self.sample_pcs < 1 or self.steps < 1:
            raise ValueError("identities, renders_per_identity, sample_pcs and steps must be >= 1")
        if not self.prompts or not all("sks" in p for p in self.prompts):
            raise ValueError("every prompt must name the identity token 'sks' (e.g. 'a photo of sks person')")
        if self.size < 64 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8 and >= 64, got {self.size}")

    def identity_seed(self, i: int) -> int:
        return self.seed + i

    def noise_seed(self, i: int, j: int) -> int:
        digest = hashlib.sha256(f"{self.seed}:{i}:{j}".encode()).digest()
        return int.from_bytes(digest[:6], "little")

    def prompt(self, i: int, j: int) -> str:
        return self.prompts[(i * self.renders_per_identity + j) % len(self.prompts)]


class ComfyRenderer:
    """Renders one sampled identity per graph through a ComfyUI server at ``url`` (this pack installed)."""

    def __init__(self, url: str, settings: RenderSettings, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.settings = settings
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _get(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def check(self) -> None:
        """RenderError unless the server has the w2w nodes, the checkpoint and the same space."""
        s = self.settings
        try:
            info = json.loads(self._get("/object_info/W2WSampleIdentity"))
        except (urllib.error.URLError, OSError) as exc:
            raise RenderError(f"no ComfyUI answers at {self.url} ({exc}): start one with this pack installed "
                              "(`python main.py` in ComfyUI) and pass its address with --render-server") from None
        if "W2WSampleIdentity" not in info:
            raise RenderError(f"the ComfyUI at {self.url} does not have the w2w nodes: install this pack in its "
                              "custom_nodes folder and restart it")
        try:
            summary = json.loads(self._get(f"/w2w/spaces/{urllib.parse.quote(s.space, safe='')}"))
        except urllib.error.HTTPError as exc:
            raise RenderError(f"the ComfyUI at {self.url} has no w2w space {s.space!r} ({exc.code}): put the same "
                              "space file in its models/w2w and pass its name with --server-space") from None
        if summary.get("fingerprint") != s.space_fingerprint:
            raise EncoderMismatch(f"the server's space {s.space!r} has fingerprint {summary.get('fingerprint')}, the "
                                  f"local space {s.space_fingerprint}: both must be the same space")
        if summary.get("sampling_pcs", 0) < s.sample_pcs or summary.get("pcs", 0) < s.sample_pcs:
            raise RenderError(f"the server's space {s.space!r} cannot sample {s.sample_pcs} PCs (it has "
                              f"{summary.get('sampling_pcs')} with statistics): lower --sample-pcs")

    def graph(self, i: int, j: int) -> dict:
        s = self.settings
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": s.checkpoint}},
            "2": {"class_type": "W2WLoadSpace", "inputs": {"space": s.space, "pcs": s.sample_pcs}},
            "3": {"class_type": "W2WSampleIdentity", "inputs": {"space": ["2", 0], "seed": s.identity_seed(i),
                                                               "pcs": s.sample_pcs, "factor": s.factor}},
            "4": {"class_type": "W2WApplyLoRA", "inputs": {"model": ["1", 0], "space": ["2", 0],
                                                          "identity": ["3", 0], "strength": 1.0}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"text": s.prompt(i, j), "clip": ["1", 1]}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": s.negative, "clip": ["1", 1]}},
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": s.size, "height": s.size, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"seed": s.noise_seed(i, j), "steps": s.steps, "cfg": s.cfg,
                                                      "sampler_name": s.sampler, "scheduler": s.scheduler,
                                                      "denoise": 1.0, "model": ["4", 0], "positive": ["5", 0],
                                                      "negative": ["6", 0], "latent_image": ["7", 0]}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
            "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        }

    def render(self, i: int, j: int) -> bytes:
        """PNG bytes of render ``j`` of identity ``i``."""
        body = json.dumps({"prompt": self.graph(i, j), "client_id": self.client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                prompt_id = json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise RenderError(f"the server refused the render graph: {exc.read().decode(errors='replace')[:2000]}") \
                from None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            entry = json.loads(self._get(f"/history/{prompt_id}")).get(prompt_id)
            status = (entry or {}).get("status", {})
            if status.get("status_str") == "error":
                raise RenderError(f"the render graph failed on the server: {json.dumps(status)[:2000]}")
            if entry and status.get("completed"):
                image = entry["outputs"]["10"]["images"][0]
                query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                                "type": image.get("type", "temp")})
                return self._get(f"/view?{query}")
            time.sleep(0.2)
        raise RenderError(f"the server did not finish a render within {self.timeout:.0f} s")


def read_manifest(folder: str) -> list[dict]:
    """The lines of ``folder/pairs.jsonl`` (a torn last line of an interrupted write is ignored)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise W2WFileError(f"{folder} is not a pairs folder: it lacks {MANIFEST} (one line per pair: "
                           '{"image": "photo.png", "identity": "person.safetensors"})')
    entries = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a torn last line: the write was interrupted
                break
            raise W2WFileError(f"{path}, line {number}: not JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or \
                not (isinstance(entry.get("identity"), str) or entry.get("row") is not None and "identity" not in entry):
            raise W2WFileError(f"{path}, line {number}: expected {{\"image\": ..., \"identity\": ...}} (or "
                               "{\"image\": ..., \"row\": N} for a photo of the space's training model N)")
        row = entry.get("row")
        if row is not None and (isinstance(row, bool) or not isinstance(row, int) or row < 0):
            raise W2WFileError(f"{path}, line {number}: \"row\" (the space's training model the photo shows) must be "
                               f"a non-negative integer, got {row!r}")
        entries.append(entry)
    return entries


def _append(folder: str, entry: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.partial{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def render_pairs(renderer: ComfyRenderer, space, folder: str,
                 log: Callable[[str], None] | None = None) -> int:
    """Render the pairs folder ``folder`` (resuming what it holds); returns the number of pairs in it."""
    s = renderer.settings
    if space.fingerprint != s.space_fingerprint:
        raise EncoderMismatch("the render settings name another space than the one given")
    stamp_path = os.path.join(folder, RENDER_SETTINGS)
    stamp = json.dumps(asdict(s), sort_keys=True, indent=1)
    if os.path.isfile(stamp_path):
        with open(stamp_path, encoding="utf-8") as f:
            if json.loads(f.read()) != json.loads(stamp):
                raise ValueError(f"{folder} was rendered with other settings ({stamp_path}): use another folder, or "
                                 "the same settings to resume")
    done = {e["image"] for e in read_manifest(folder)} if os.path.isfile(os.path.join(folder, MANIFEST)) else set()
    total = s.identities * s.renders_per_identity
    if len(done) >= total:
        return len(done)  # complete: no server needed
    renderer.check()  # before anything is written: a wrong server or space leaves no folder behind
    os.makedirs(os.path.join(folder, "identities"), exist_ok=True)
    os.makedirs(os.path.join(folder, "renders"), exist_ok=True)
    if not os.path.isfile(stamp_path):
        _write_bytes(stamp_path, stamp.encode())
    t0, made = time.perf_counter(), 0
    for i in range(s.identities):
        identity_file = f"identities/{i:07d}.safetensors"
        for j in range(s.renders_per_identity):
            image_file = f"renders/{i:07d}-{j}.png"
            if image_file in done:
                continue
            if not os.path.isfile(os.path.join(folder, identity_file)):
                ident = sample_identity(space, s.identity_seed(i), s.sample_pcs, s.factor)
                save_identity(ident, os.path.join(folder, identity_file))
            _write_bytes(os.path.join(folder, image_file), renderer.render(i, j))
            _append(folder, {"image": image_file, "identity": identity_file, "prompt": s.prompt(i, j),
                             "noise_seed": s.noise_seed(i, j)})
            done.add(image_file)
            made += 1
            if log and (made % 10 == 0 or len(done) == total):
                rate = (time.perf_counter() - t0) / made
                log(f"rendered {len(done)}/{total} pairs ({rate:.1f} s per image; "
                    f"{rate * (total - len(done)) / 60:.0f} min to go)")
    return len(done)


# ---- reading pairs -----------------------------------------------------------------------------------------
def frame_photos01(images: torch.Tensor, size: int, face: str = "auto") -> tuple[torch.Tensor, list[bool]]:
    """(N, H, W, 3) in [0, 1] -> ((N', 3, size, size) framed as the inversion frames photos, kept mask (N,)).

    ``face`` auto: the square of twice the largest face's box around it (:mod:`w2w.facecrop`, MTCNN); photos without
    a face are left out. off: shorter side to ``size``, centre crop."""
    from . import facecrop

    if face not in ("auto", "off"):
        raise ValueError(f"face must be auto or off, got {face!r}")
    if face == "auto":
        frames = facecrop.detect_frames(images)
        kept = [f is not None for f in frames]
        crops = [facecrop.crop_square(img, f.square, size) for img, f in zip(images, frames) if f is not None]
        if not crops:
            return torch.zeros(0, 3, size, size), kept
        return torch.stack(crops).permute(0, 3, 1, 2).contiguous(), kept
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).contiguous(), [True] * images.shape[0]


def _read_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).float() / 255.0


def load_pairs(folders: list[str], space, size: int, face: str = "auto", *, cache_dir: str | None = None,
               log: Callable[[str], None] | None = None) -> PairSet:
    """The pairs of ``folders`` as a :class:`PairSet`: photos framed (``face``) and resized to ``size``; identities
    checked to belong to ``space``. With ``cache_dir`` the framed photos are kept there (keyed by the manifests)."""
    entries = []
    for folder in folders:
        entries += [(folder, e) for e in read_manifest(folder)]
    if not entries:
        raise W2WFileError(f"no pairs in {', '.join(folders)}")
    key = hashlib.sha256(json.dumps([[os.path.abspath(f), e["image"], e.get("identity"), e.get("row")]
                                     for f, e in entries] +
                                    [size, face]).encode()).hexdigest()[:16]
    cache = None if cache_dir is None else os.path.join(cache_dir, f"pairs-{key}.pt")
    if cache is not None and os.path.isfile(cache):
        state = torch.load(cache, weights_only=True)
        if log:
            log(f"pairs: {state['images'].shape[0]} framed photos read from {cache}")
        return PairSet(state["images"], state["targets"], state["groups"], state["source"], state.get("rows"))
    identities: dict[str, torch.Tensor] = {}
    images, targets, rows, skipped = [], [], [], 0
    models = None if space.train_coefs is None else space.train_coefs.shape[0]
    for start in range(0, len(entries), 64):
        chunk = entries[start:start + 64]
        photos, owners, chunk_rows = [], [], []
        for folder, e in chunk:
            row = e.get("row")
            if row is not None and models is not None and row >= models:
                raise W2WFileError(f"{os.path.join(folder, MANIFEST)}: row {row} of {e['image']} is not a training "
                                   f"model of the space (it has {models:,})")
            chunk_rows.append(-1 if row is None else row)
            if "identity" not in e:  # a photo of training model `row`: its coefficients are the space's
                if models is None:
                    raise W2WFileError(f"{os.path.join(folder, MANIFEST)} names training models by row: load the "
                                       "space with its training coefficients (the released files' proj_1000pc.pt)")
                ipath = f"row:{row}"
                identities[ipath] = space.train_coefs[row].float()
            else:
                ipath = os.path.normpath(os.path.join(folder, e["identity"]))
            if ipath not in identities:
                ident = load_identity(ipath)
                if ident.space_fingerprint != space.fingerprint:  # its PCs beyond the space's loaded ones are cut
                    raise EncoderMismatch(f"{ipath} belongs to space {ident.space_fingerprint}, not to the space "
                                          f"{space.fingerprint} the encoder is trained for")
                identities[ipath] = ident.coefficients
            owners.append(ipath)
            photos.append(_read_image(os.path.join(folder, e["image"])))
        for photo, owner, row in zip(photos, owners, chunk_rows):  # photos differ in size: framed one by one
            framed, kept = frame_photos01(photo[None], size, face)
            if not kept[0]:
                skipped += 1
                continue
            images.append((framed[0] * 255).round().to(torch.uint8))
            targets.append(owner)
            rows.append(row)
        if log:
            log(f"pairs: framed {min(len(entries), start + 64)}/{len(entries)} photos")
    if not images:
        raise W2WFileError(f"no face found in any of the {len(entries)} photos of {', '.join(folders)}: check the "
                           "photos, or use --face off")
    if skipped and log:
        log(f"pairs: {skipped} photo(s) without a detectable face left out")
    names = sorted(set(targets))
    k = min(identities[n].shape[0] for n in names)
    owner_id = {n: i for i, n in enumerate(names)}
    pairs = PairSet(torch.stack(images), torch.stack([identities[t][:k] for t in targets]),
                    torch.tensor([owner_id[t] for t in targets]), f"{len(images)} pairs of {len(names)} identities "
                    f"from {', '.join(os.path.basename(os.path.normpath(f)) for f in folders)}",
                    torch.tensor(rows) if any(r >= 0 for r in rows) else None)
    if cache is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        torch.save({"images": pairs.images, "targets": pairs.targets, "groups": pairs.groups,
                    "source": pairs.source, "rows": pairs.rows}, tmp)
        os.replace(tmp, cache)
    return pairs
