"""One-shot inversion: an encoder that maps face photos to the first P coefficients of a w2w space in one pass.

Inversion (:mod:`w2w.invert`) is an optimisation of hundreds of UNet passes. The space makes an amortised fast path
possible (HyperDreamBooth, Ruiz et al. 2024, which the w2w paper cites): its coefficients are a low-dimensional target,
and (photo, coefficients) pairs come without labelled data by rendering identities of the space with the base model,
or from a user's own (photo, identity) pairs. A :class:`FaceEncoder` learns photo → β (P,) by regression (head
``regress``), or recognises which of the space's own training models the face is most like (head ``retrieve``: face
recognition over the space's training identities, answering their coefficients); its output starts an inversion
that needs fewer steps (the ``fast`` preset), or is used as it is.

Pieces:

- :class:`EncoderConfig`: backbone (``conv``: a small CNN trained from scratch; ``facenet``: the frozen FaceNet
  VGGFace2 embedding from a local weights file), P, sizes.
- :class:`FaceEncoder`: backbone → MLP head → ``β = coef_mean + coef_std · head`` (the head starts at the mean model);
  or backbone → unit embedding → cosine similarity to one learned prototype per gallery model → the similarity-weighted
  coefficients of the ``top_k`` most similar (the gallery is stored as the models' row numbers in the space).
- :class:`PairSet`: photos (uint8), target coefficients, the identity each pair shows (for the validation split) and,
  for retrieval, the space's training model it shows.
- :func:`train_encoder`: AdamW on the relative weight-space error (below), or for retrieval on a large-margin cosine
  loss (CosFace) over the gallery; resumable from a work folder: every step
  draws its batch and augmentation from a generator seeded by (seed, step), so a stopped run resumed from its
  checkpoint takes the same steps as an uninterrupted one.
- :func:`save_encoder` / :func:`load_encoder`: one ``.safetensors`` file (written atomically) whose metadata carry the
  space fingerprint, P, backbone and configuration; loading validates all of it and refuses an encoder made for
  another space.

The loss is the error in standardised weight space relative to the training spread: the PCA basis is orthonormal, so
``‖w_std(β̂) − w_std(β)‖² = Σ_k (β̂_k − β_k)²`` over the predicted PCs; it is divided by ``Σ_k coef_std_k²``, so
predicting the mean model scores about 1 and a perfect prediction 0.

Images are (N, 3, H, W) floats in [0, 1] (ComfyUI's IMAGE permuted), any size: the backbone resizes them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .identity import Identity
from .safeload import W2WFileError, load_object
from .stfile import read_format_metadata, tensors_fingerprint, write_safetensors

__all__ = ["BACKBONES", "ENCODER_FORMAT", "EncoderConfig", "EncoderTrainConfig", "FaceEncoder", "PairSet",
           "EncoderMismatch", "TrainStats", "TrainResult", "StopTraining", "build_encoder", "train_encoder",
           "save_encoder", "load_encoder", "read_encoder_metadata", "encode_photos", "relative_error",
           "facenet_fingerprint", "augment", "HEADS", "retrieval_rows", "gallery_coefficients"]

ENCODER_FORMAT = "w2w-encoder"
FORMAT_VERSION = 1
BACKBONES = ("conv", "facenet")
HEADS = ("regress", "retrieve")
FACENET_SIZE = 160  # FaceNet's input side (facenet-pytorch's MTCNN crops)
CHECKPOINT = "encoder-train.ckpt"


class EncoderMismatch(ValueError):
    """An encoder used with a space (or FaceNet weights) it was not trained for."""


class StopTraining(Exception):
    """Raise from a training callback to stop; the state of the last checkpoint is kept for a resume."""


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of an encoder (saved with it).

    pcs: coefficients predicted (the first P PCs of the space).
    backbone: ``conv`` (a CNN trained from scratch on the pairs) or ``facenet`` (FaceNet's frozen 512-d embedding).
    image_size: conv: side the photo is resized to (a power of two times 4, >= 8). facenet: ignored.
    width: conv: channels of the first stage, doubled per stage up to 8x.
    hidden: width of the head's two hidden layers.
    face_fraction: facenet: central fraction of the (face-framed) photo passed to FaceNet. The inversion's framing
        makes a square of twice the face box around it, so 0.6 gives the face box plus a margin, like MTCNN's crops.
    backbone_fingerprint: facenet: fingerprint of the FaceNet weights the head was trained on (:func:`facenet_fingerprint`).
    head: ``regress`` (an MLP predicts β) or ``retrieve`` (an MLP predicts a unit face embedding; β is the
        similarity-weighted mean of the ``top_k`` most similar identities of a gallery of the space's training
        models, each represented by a learned prototype: face recognition over the space's own identities).
    embed: retrieve: size of the face embedding.
    gallery: retrieve: how many training models of the space the gallery holds (rows of the space's training
        coefficients, stored in the file as row numbers).
    top_k, temperature: retrieve: how many gallery identities are blended, and the softmax temperature over their
        cosine similarities (top_k = 1: the single most similar identity).
    """

    pcs: int
    backbone: str = "conv"
    image_size: int = 64
    width: int = 32
    hidden: int = 512
    face_fraction: float = 0.6
    backbone_fingerprint: str = ""
    head: str = "regress"
    embed: int = 128
    gallery: int = 0
    top_k: int = 1
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.pcs < 1:
            raise ValueError(f"pcs must be >= 1, got {self.pcs}")
        if self.backbone == "conv":
            stages = math.log2(self.image_size / 4) if self.image_size >= 8 else -1
            if stages < 1 or stages != int(stages):
                raise ValueError(f"image_size must be 4 times a power of two and >= 8 (8, 16, 32, 64, 128, ...), "
                                 f"got {self.image_size}")
        if self.width < 1 or self.hidden < 1:
            raise ValueError(f"width and hidden must be positive, got {self.width} and {self.hidden}")
        if not 0.1 <= self.face_fraction <= 1.0:
            raise ValueError(f"face_fraction must be in [0.1, 1], got {self.face_fraction}")
        if self.backbone == "facenet" and not self.backbone_fingerprint:
            raise ValueError("a FaceNet encoder needs the fingerprint of its FaceNet weights (backbone_fingerprint)")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "retrieve":
            if self.gallery < 1 or self.embed < 1:
                raise ValueError(f"a retrieval encoder needs gallery >= 1 and embed >= 1, got {self.gallery} and "
                                 f"{self.embed}")
            if not 1 <= self.top_k <= self.gallery:
                raise ValueError(f"top_k must be in 1..{self.gallery} (the gallery's size), got {self.top_k}")
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"temperature must be a positive number, got {self.temperature}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EncoderConfig":
        return cls(**json.loads(text))


# ---- networks ----------------------------------------------------------------------------------------------
def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ConvBackbone(nn.Module):
    """Stages of two 3×3 convolutions (GroupNorm, SiLU) and a 2× average pool, from ``image_size`` down to 4×4,
    flattened: the position of each feature is kept (where the eyes are matters for who it is)."""

    def __init__(self, image_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        layers: list[nn.Module] = []
        cin, size, c = 3, image_size, width
        while size > 4:
            for i in range(2):
                layers += [nn.Conv2d(cin if i == 0 else c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            layers.append(nn.AvgPool2d(2))
            cin, size, c = c, size // 2, min(c * 2, width * 8)
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_features = cin * 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_resize(images, self.image_size) * 2.0 - 1.0)


class FaceNetBackbone(nn.Module):
    """FaceNet InceptionResnetV1 (VGGFace2), frozen: the central ``face_fraction`` of the photo at 160 px -> unit
    512-d embedding. Its weights are never stored in an encoder file (a local file the user has, fingerprinted)."""

    out_features = 512

    def __init__(self, state: dict, face_fraction: float):
        super().__init__()
        from .metrics.faces import require_facenet

        model = require_facenet().InceptionResnetV1(pretrained=None, classify=False)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")}, strict=False)
        self.model = model.float().eval().requires_grad_(False)
        self.face_fraction = face_fraction

    def train(self, mode: bool = True):  # BatchNorm stays in eval mode: the backbone is frozen
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        side = max(1, round(min(h, w) * self.face_fraction))
        top, left = (h - side) // 2, (w - side) // 2
        x = _resize(images[..., top:top + side, left:left + side], FACENET_SIZE)
        return F.normalize(self.model((x * 255.0 - 127.5) / 128.0), dim=1)


class FaceEncoder(nn.Module):
    """photo(s) (N, 3, H, W) in [0, 1] -> coefficients β (N, P) of one space.

    A ``retrieve`` encoder also holds its gallery: ``gallery_rows`` (which training models of the space, stored) and
    ``gallery_coefs`` (their first P coefficients, taken from the space when the file is loaded, never stored)."""

    def __init__(self, config: EncoderConfig, coef_mean: torch.Tensor, coef_std: torch.Tensor, space_fingerprint: str,
                 backbone: nn.Module | None = None, gallery_rows: torch.Tensor | None = None,
                 gallery_coefs: torch.Tensor | None = None):
        super().__init__()
        p = config.pcs
        if tuple(coef_mean.shape) != (p,) or tuple(coef_std.shape) != (p,):
            raise ValueError(f"coef_mean and coef_std must have shape ({p},), got {tuple(coef_mean.shape)} and "
                             f"{tuple(coef_std.shape)}")
        if not (torch.isfinite(coef_mean).all() and torch.isfinite(coef_std).all() and (coef_std > 0).all()):
            raise ValueError("coef_mean and coef_std must be finite and coef_std positive")
        if not space_fingerprint:
            raise ValueError("an encoder needs the fingerprint of its space")
        self.config = config
        self.space_fingerprint = space_fingerprint
        if backbone is None:
            if config.backbone != "conv":
                raise ValueError("a FaceNet encoder is built with its backbone (build_encoder(..., facenet_state=...))")
            backbone = ConvBackbone(config.image_size, config.width)
        self.backbone = backbone
        h = config.hidden
        out = p if config.head == "regress" else config.embed
        self.head = nn.Sequential(nn.Linear(backbone.out_features, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
                                  nn.Linear(h, out))
        if config.head == "regress":
            nn.init.zeros_(self.head[-1].weight)  # starts at the mean model
            nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("coef_mean", coef_mean.detach().float().clone())
        self.register_buffer("coef_std", coef_std.detach().float().clone())
        if config.head == "retrieve":
            n = config.gallery
            if gallery_rows is None or gallery_coefs is None:
                raise ValueError("a retrieval encoder needs its gallery (gallery_rows and gallery_coefs)")
            if tuple(gallery_rows.shape) != (n,) or tuple(gallery_coefs.shape) != (n, p):
                raise ValueError(f"the gallery must be ({n},) rows and ({n}, {p}) coefficients, got "
                                 f"{tuple(gallery_rows.shape)} and {tuple(gallery_coefs.shape)}")
            if not torch.isfinite(gallery_coefs).all():
                raise ValueError("the gallery's coefficients must be finite")
            self.prototypes = nn.Parameter(torch.randn(n, config.embed) / math.sqrt(config.embed))
            self.register_buffer("gallery_rows", gallery_rows.detach().long().clone())
            self.register_buffer("gallery_coefs", gallery_coefs.detach().float().clone(), persistent=False)

    @property
    def pcs(self) -> int:
        return self.config.pcs

    @property
    def frozen_backbone(self) -> bool:
        return self.config.backbone == "facenet"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images.float())

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        """retrieve: the unit face embedding (N, embed) of each photo's backbone features."""
        return F.normalize(self.head(features), dim=1)

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """retrieve: cosine similarity (N, gallery) of each photo's embedding to every gallery identity."""
        return self.embedding(features) @ F.normalize(self.prototypes, dim=1).T

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.head == "regress":
            return self.coef_mean + self.coef_std * self.head(features)
        sims, index = self.similarities(features).topk(self.config.top_k, dim=1)
        weights = torch.softmax(sims / self.config.temperature, dim=1)
        return (weights.unsqueeze(-1) * self.gallery_coefs[index]).sum(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        return self.from_features(self.features(images))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What an encoder file stores: everything but a frozen backbone (and a gallery's coefficients, which are
        the space's)."""
        return {k: v for k, v in self.state_dict().items() if not (self.frozen_backbone and k.startswith("backbone."))}

    def with_retrieval(self, top_k: int, temperature: float) -> "FaceEncoder":
        """The same retrieval encoder blending ``top_k`` identities at ``temperature`` (a copy; self unchanged)."""
        import copy
        from dataclasses import replace

        if self.config.head != "retrieve":
            raise ValueError("top_k and temperature belong to retrieval encoders (head='retrieve')")
        other = copy.deepcopy(self)
        other.config = replace(self.config, top_k=top_k, temperature=temperature)
        return other


def facenet_fingerprint(state: dict) -> str:
    """Stable id of a FaceNet state dict (the embedding network; the classifier head is ignored)."""
    return tensors_fingerprint(state, skip=("logits.",))


def _facenet_state(path: str) -> dict:
    state = load_object(path, mmap=False)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise W2WFileError(f"{path} should hold a FaceNet state dict (names -> tensors)")
    return state


def build_encoder(space, pcs: int, backbone: str = "conv", *, image_size: int = 64, width: int = 32,
                  hidden: int = 512, face_fraction: float = 0.6, facenet_weights: str | None = None,
                  seed: int = 0, head: str = "regress", embed: int = 128, gallery_rows: torch.Tensor | None = None,
                  top_k: int = 1, temperature: float = 0.05) -> FaceEncoder:
    """A fresh encoder for ``space`` (its sampling statistics give the output's centre and scale). A ``retrieve``
    encoder's gallery is ``gallery_rows`` of the space's training models (:func:`retrieval_rows` of the pairs)."""
    if space.coef_mean is None:
        raise ValueError("an encoder needs the space's sampling statistics (per-PC mean and std of the training "
                         "models): use the released files with proj_1000pc.pt, or a space built with training data")
    available = min(space.pcs, space.coef_mean.shape[0])
    if not 1 <= pcs <= available:
        raise ValueError(f"pcs={pcs:,}: this space has sampling statistics for {available:,} loaded PCs; use 1..{available:,}")
    net = None
    fingerprint = ""
    if backbone == "facenet":
        if facenet_weights is None:
            raise ValueError("the facenet backbone needs the FaceNet weights file (20180402-114759-vggface2.pt)")
        state = _facenet_state(facenet_weights)
        fingerprint = facenet_fingerprint(state)
        net = FaceNetBackbone(state, face_fraction)
    coefs = None
    if head == "retrieve":
        if gallery_rows is None or gallery_rows.numel() == 0:
            raise ValueError("a retrieval encoder needs gallery rows: the training models of the space its photo "
                             "pairs show (retrieval_rows(pairs, ...))")
        gallery_rows = gallery_rows.long()
        coefs = gallery_coefficients(space, gallery_rows, pcs)
    config = EncoderConfig(pcs, backbone, image_size, width, hidden, face_fraction, fingerprint, head, embed,
                           0 if gallery_rows is None or head != "retrieve" else gallery_rows.numel(), top_k,
                           temperature)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FaceEncoder(config, space.coef_mean[:pcs], space.coef_std[:pcs], space.fingerprint, net,
                           gallery_rows if head == "retrieve" else None, coefs)


def gallery_coefficients(space, rows: torch.Tensor, pcs: int, where: str = "") -> torch.Tensor:
    """The first ``pcs`` training coefficients of the space's models ``rows`` (a retrieval encoder's gallery)."""
    coefs = space.train_coefs
    if coefs is None:
        raise EncoderMismatch(f"the retrieval encoder{where} needs the space's training coefficients (its gallery "
                              "is the space's training models): load the space with its training data "
                              "(the released files' proj_1000pc.pt, or a space built by this pack)")
    if rows.dim() != 1 or rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= coefs.shape[0]:
        raise EncoderMismatch(f"the retrieval encoder{where} names training models outside 0..{coefs.shape[0] - 1} "
                              "of the loaded space")
    if coefs.shape[1] < pcs:
        raise EncoderMismatch(f"the retrieval encoder{where} blends {pcs:,} coefficients but the space has training "
                              f"coefficients for {coefs.shape[1]:,} PCs")
    return coefs[rows, :pcs].float()


# ---- data ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PairSet:
    """Training pairs: photos, the coefficients of the identity each shows, and which identity that is."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    targets: torch.Tensor  # (N, K) float32, K >= the encoder's P (extra PCs are ignored)
    groups: torch.Tensor  # (N,) int64: pairs of one identity share a group (the validation split is by group)
    source: str = ""
    rows: torch.Tensor | None = None  # (N,) int64: the space's training model each pair shows, -1 for none

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8 or n < 1:
            raise ValueError(f"pair images must be a non-empty (N, 3, H, W) uint8 tensor, got "
                             f"{tuple(self.images.shape)} {self.images.dtype}")
        if self.targets.dim() != 2 or self.targets.shape[0] != n or not torch.isfinite(self.targets).all():
            raise ValueError(f"pair targets must be a finite (N={n}, K) tensor, got {tuple(self.targets.shape)}")
        if tuple(self.groups.shape) != (n,):
            raise ValueError(f"pair groups must have shape ({n},), got {tuple(self.groups.shape)}")
        object.__setattr__(self, "targets", self.targets.float())
        object.__setattr__(self, "groups", self.groups.long())
        if self.rows is not None:
            if tuple(self.rows.shape) != (n,):
                raise ValueError(f"pair rows must have shape ({n},), got {tuple(self.rows.shape)}")
            object.__setattr__(self, "rows", self.rows.long())

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def concat(sets: list["PairSet"]) -> "PairSet":
        """One set of several; group ids are kept apart (offset per set), targets cut to the shortest K."""
        k = min(s.targets.shape[1] for s in sets)
        offsets, groups = 0, []
        for s in sets:
            groups.append(s.groups - s.groups.min() + offsets)
            offsets = int(groups[-1].max()) + 1
        size = sets[0].images.shape[-1]
        images = [s.images if s.images.shape[-1] == size else
                  (_resize(s.images.float() / 255, size) * 255).round().clamp(0, 255).to(torch.uint8) for s in sets]
        rows = None
        if any(s.rows is not None for s in sets):
            rows = torch.cat([s.rows if s.rows is not None else torch.full((len(s),), -1) for s in sets])
        return PairSet(torch.cat(images), torch.cat([s.targets[:, :k] for s in sets]), torch.cat(groups),
                       " + ".join(s.source for s in sets if s.source), rows)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.images, self.targets, self.groups) + (() if self.rows is None else (self.rows,)):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else
                     t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def relative_error(pred: torch.Tensor, target: torch.Tensor, coef_std: torch.Tensor) -> torch.Tensor:
    """Per pair: Σ_k (β̂_k − β_k)² / Σ_k std_k² over the predicted PCs (1 ≈ the mean model, 0 = exact)."""
    p = pred.shape[-1]
    return (pred - target[..., :p]).square().sum(-1) / coef_std[:p].square().sum()


def augment(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Photo-like variation of a batch in [0, 1]: a shift of up to 1/16 of the side, brightness and colour, a blur
    of random width and sensor noise (each drawn per image from ``gen``)."""
    n, _, h, w = x.shape
    if strength <= 0:
        return x
    shift = max(1, round(h / 16 * strength))
    pad = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    x = x * (1 + 0.3 * strength * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)) \
        * (1 + 0.1 * strength * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5))
    sigma = torch.rand(n, generator=gen) * 1.2 * strength * h / 32
    radius = max(1, int(math.ceil(2.5 * float(sigma.max()))))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (n, 2r+1), one separable kernel per image
    xp = F.pad(x, (radius, radius, radius, radius), mode="replicate").transpose(0, 1)  # (3, n, H+2r, W+2r)
    x = F.conv2d(xp, kern[:, None, None, :], groups=n)
    x = F.conv2d(x, kern[:, None, :, None], groups=n).transpose(0, 1)
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.04 * strength
    return (x + noise).clamp(0.0, 1.0)


# ---- training --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderTrainConfig:
    """Regression of the pairs' coefficients. Every step's batch and augmentation come from (seed, step)."""

    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3  # AdamW; cosine decay to lr/20 over the steps, after a warm-up of steps/50
    weight_decay: float = 1e-4
    augment: float = 1.0  # strength of :func:`augment` (0 = off; a frozen backbone never sees augmentation)
    holdout: float = 0.1  # fraction of identities (groups) held out to report the validation error
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200
    aux_weight: float = 0.0  # weight of the aux loss train_encoder is given (e.g. a diffusion loss), 0 = unused
    margin: float = 0.2  # retrieval encoders: the cosine margin of the face-recognition loss (CosFace)
    scale: float = 30.0  # retrieval encoders: the logits' scale
    keep_best: bool = True  # return the weights of the evaluation with the lowest held-out error (early stopping)

    def __post_init__(self) -> None:
        checks = {"steps": self.steps >= 1, "batch": self.batch >= 1, "lr": self.lr > 0,
                  "weight_decay": self.weight_decay >= 0, "augment": self.augment >= 0,
                  "holdout": 0 <= self.holdout < 1, "checkpoint_every": self.checkpoint_every >= 1,
                  "eval_every": self.eval_every >= 1, "aux_weight": self.aux_weight >= 0,
                  "margin": 0 <= self.margin < 1, "scale": self.scale > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid encoder training setting {bad[0]}={getattr(self, bad[0])!r}")

    def lr_at(self, step: int) -> float:
        warm = max(1, self.steps // 50)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainStats:
    step: int
    loss: float  # mean training loss since the previous report (relative error, plus aux_weight · aux)
    val_error: float  # relative error on the held-out identities (nan without a holdout)
    seconds: float  # training time so far (over resumes)


@dataclass(frozen=True)
class TrainResult:
    encoder: FaceEncoder
    history: tuple[TrainStats, ...]
    holdout_groups: tuple[int, ...]
    chosen_step: int = 0  # the step whose weights :attr:`encoder` holds (the last, or the best with keep_best)

    @property
    def final(self) -> TrainStats:
        return self.history[-1]

    @property
    def chosen(self) -> TrainStats:
        """The evaluation of the weights the encoder holds."""
        return next((h for h in self.history if h.step == self.chosen_step), self.final)


def split_groups(groups: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training pair indices, held-out pair indices): a fraction of the identities, never pairs of a training one."""
    unique = torch.unique(groups)
    count = int(round(len(unique) * holdout)) if holdout > 0 else 0
    count = min(count, len(unique) - 1)
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed + 99))
    held = unique[order[:count]]
    is_held = torch.isin(groups, held)
    return torch.nonzero(~is_held).flatten(), torch.nonzero(is_held).flatten()


def retrieval_rows(pairs: PairSet, holdout: float, seed: int) -> torch.Tensor:
    """A retrieval encoder's gallery for these pairs and split: the space's training models shown by the pairs
    :func:`train_encoder` trains on (held-out identities excluded), sorted."""
    if pairs.rows is None or not (pairs.rows >= 0).any():
        raise ValueError("a retrieval encoder learns from photos of the space's training models: these pairs name "
                         "none (PairSet.rows)")
    train_idx, _ = split_groups(pairs.groups, holdout, seed)
    rows = pairs.rows[train_idx]
    rows = torch.unique(rows[rows >= 0])
    if rows.numel() == 0:
        raise ValueError("no pair of a training model of the space is left for training after the hold-out split")
    return rows


def _images(pairs: PairSet, index: torch.Tensor) -> torch.Tensor:
    return pairs.images[index].float() / 255.0


@torch.no_grad()
def evaluate(encoder: FaceEncoder, pairs: PairSet, index: torch.Tensor, features: torch.Tensor | None = None,
             batch: int = 256) -> float:
    """Mean relative error of the encoder on ``pairs[index]`` (nan for an empty index)."""
    if index.numel() == 0:
        return float("nan")
    was = encoder.training
    encoder.eval()
    errs = []
    for s in range(0, index.numel(), batch):
        i = index[s:s + batch]
        pred = encoder.from_features(features[i]) if features is not None else encoder(_images(pairs, i))
        errs.append(relative_error(pred, pairs.targets[i], encoder.coef_std))
    encoder.train(was)
    return float(torch.cat(errs).mean())


def _stamp(encoder: FaceEncoder, pairs: PairSet, config: EncoderTrainConfig) -> str:
    return json.dumps({"encoder": encoder.config.to_json(), "space": encoder.space_fingerprint,
                       "pairs": pairs.fingerprint(), "train": asdict(config)}, sort_keys=True)


def train_encoder(encoder: FaceEncoder, pairs: PairSet, config: EncoderTrainConfig = EncoderTrainConfig(), *,
                  workdir: str | None = None,
                  callback: Callable[[int, int, TrainStats | None], None] | None = None,
                  aux: Callable[[FaceEncoder, int, torch.Generator], torch.Tensor] | None = None,
                  log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``encoder`` (in place) on ``pairs``; with ``workdir``, resume from / checkpoint to ``workdir/encoder-train.ckpt``.

    ``callback(step, total, stats_or_None)`` runs after every step (stats at each evaluation) and may raise
    :class:`StopTraining` to stop (the last checkpoint stays for a resume). ``aux(encoder, step, generator)`` returns
    an extra loss term, weighted by ``config.aux_weight`` (e.g. the diffusion loss of the predicted identities).
    With ``config.keep_best`` and held-out identities, the encoder ends with the weights of the evaluation whose
    held-out error was lowest (:attr:`TrainResult.chosen_step`); otherwise with the last step's.
    """
    if pairs.targets.shape[1] < encoder.pcs:
        raise ValueError(f"the pairs have {pairs.targets.shape[1]} coefficients but the encoder predicts {encoder.pcs}")
    train_idx, held_idx = split_groups(pairs.groups, config.holdout, config.seed)
    retrieve = encoder.config.head == "retrieve"
    if retrieve:  # face recognition over the gallery: each training pair's class is its model's gallery row
        if not torch.equal(retrieval_rows(pairs, config.holdout, config.seed), encoder.gallery_rows):
            raise ValueError("the encoder's gallery is not the training models these pairs show: build it with "
                             "gallery_rows=retrieval_rows(pairs, holdout, seed) of the same pairs and split")
        labels = torch.full((len(pairs),), -1)
        labels[train_idx] = torch.searchsorted(encoder.gallery_rows, pairs.rows[train_idx].clamp_min(0))
        labels[train_idx[pairs.rows[train_idx] < 0]] = -1
        train_idx = train_idx[labels[train_idx] >= 0]
    features = None
    if encoder.frozen_backbone:  # computed once: the backbone never changes and sees no augmentation
        with torch.no_grad():
            features = torch.cat([encoder.features(_images(pairs, torch.arange(s, min(len(pairs), s + 128))))
                                  for s in range(0, len(pairs), 128)])
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, history, seconds = 0, [], 0.0
    best: tuple[float, int, dict] | None = None  # (held-out error, step, weights) of the best evaluation so far
    stamp = _stamp(encoder, pairs, config)
    path = None if workdir is None else os.path.join(workdir, CHECKPOINT)
    if path is not None and os.path.isfile(path):
        state = load_object(path, mmap=False)
        if state.get("stamp") != stamp:
            raise ValueError(f"{path} holds the training of another encoder, space, pair set or configuration: use "
                             "an empty work folder (or the same settings and pairs) to resume")
        encoder.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state["seconds"])
        history = [TrainStats(**h) for h in json.loads(state["history"])]
        if state.get("best") is not None:
            best = (float(state["best_error"]), int(state["best_step"]), state["best"])
        if log:
            log(f"encoder: resuming at step {step}/{config.steps}")
    encoder.train()
    running, count = 0.0, 0
    t0 = time.perf_counter() - seconds
    while step < config.steps:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        index = train_idx[torch.randint(train_idx.numel(), (config.batch,), generator=gen)]
        if retrieve:
            feats = features[index] if features is not None else \
                encoder.features(augment(_images(pairs, index), gen, config.augment))
            loss = _margin_loss(encoder.similarities(feats), labels[index], config.margin, config.scale)
        elif features is not None:
            loss = relative_error(encoder.from_features(features[index]), pairs.targets[index], encoder.coef_std).mean()
        else:
            loss = relative_error(encoder(augment(_images(pairs, index), gen, config.augment)), pairs.targets[index],
                                  encoder.coef_std).mean()
        if aux is not None and config.aux_weight > 0:
            loss = loss + config.aux_weight * aux(encoder, step, gen)
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the encoder's training loss became {value} at step {step}: lower the lr")
        running, count = running + value, count + 1
        stats = None
        if step % config.eval_every == 0 or step == config.steps:
            stats = TrainStats(step, running / count, evaluate(encoder, pairs, held_idx, features),
                               round(time.perf_counter() - t0, 1))
            history.append(stats)
            running, count = 0.0, 0
            if config.keep_best and math.isfinite(stats.val_error) and (best is None or stats.val_error < best[0]):
                best = (stats.val_error, step, {k: v.detach().clone() for k, v in encoder.state_dict().items()})
            if log:
                log(f"encoder: step {step}/{config.steps} loss {stats.loss:.4f} held-out error {stats.val_error:.4f} "
                    f"({stats.seconds:.0f} s)")
        if path is not None and (step % config.checkpoint_every == 0 or step == config.steps):
            _atomic_torch_save({"model": encoder.state_dict(), "opt": opt.state_dict(), "step": step,
                                "seconds": time.perf_counter() - t0, "stamp": stamp,
                                "history": json.dumps([asdict(h) for h in history]),
                                "best": None if best is None else best[2],
                                "best_step": None if best is None else best[1],
                                "best_error": None if best is None else best[0]}, path)
        if callback is not None:
            callback(step, config.steps, stats)
    chosen = step
    if best is not None:
        encoder.load_state_dict(best[2])
        chosen = best[1]
        if log and chosen != step:
            log(f"encoder: keeping step {chosen}'s weights (held-out error {best[0]:.4f}, the lowest)")
    encoder.eval()
    held = tuple(int(g) for g in torch.unique(pairs.groups[held_idx]))
    return TrainResult(encoder, tuple(history), held, chosen)


def _margin_loss(sims: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """Large-margin cosine loss (CosFace): cross-entropy over ``scale · (cos − margin·[own class])``."""
    logits = scale * (sims - margin * F.one_hot(labels, sims.shape[1]).to(sims.dtype))
    return F.cross_entropy(logits, labels)


def _atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- files -----------------------------------------------------------------------------------------------
def save_encoder(encoder: FaceEncoder, path: str, *, dtype: torch.dtype = torch.float32,
                 info: dict | None = None) -> None:
    """Write the encoder to one ``.safetensors`` file, atomically: its trainable tensors (``dtype``: float32 or
    float16; the output's centre and scale always float32) and the metadata :func:`load_encoder` checks."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    tensors = {k: (v.detach().float() if k in ("coef_mean", "coef_std") else
                   v.detach() if not v.is_floating_point() else v.detach().to(dtype)).contiguous()
               for k, v in encoder.trainable_state().items()}
    meta = {"format": ENCODER_FORMAT, "format_version": str(FORMAT_VERSION), "config": encoder.config.to_json(),
            "space_fingerprint": encoder.space_fingerprint, "pcs": str(encoder.pcs),
            "backbone": encoder.config.backbone, "info": json.dumps(info or {}, sort_keys=True, allow_nan=True)}
    write_safetensors(path, tensors, meta)


def read_encoder_metadata(path: str) -> dict:
    """The metadata of an encoder file (checked to be one), without building the network."""
    meta = read_format_metadata(path, ENCODER_FORMAT, "encoder", "train one with `python -m w2w train-encoder`")
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = 0
    if not 1 <= version <= FORMAT_VERSION:
        raise W2WFileError(f"{path} uses encoder format {meta.get('format_version')!r}; this version of w2w reads "
                           f"1 to {FORMAT_VERSION}: update the node pack")
    return meta


def load_encoder(path: str, space=None, *, facenet_weights: str | None = None) -> FaceEncoder:
    """Read and check an encoder file. With ``space``, refuse an encoder made for another space (or for more PCs
    than it is loaded with). A FaceNet encoder needs the same FaceNet weights file it was trained with."""
    from safetensors import safe_open

    meta = read_encoder_metadata(path)
    try:
        config = EncoderConfig.from_json(meta["config"])
        fingerprint = meta["space_fingerprint"]
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise W2WFileError(f"{path}: malformed encoder metadata ({exc})") from None
    if meta.get("backbone") != config.backbone or meta.get("pcs") != str(config.pcs):
        raise W2WFileError(f"{path}: metadata disagree (backbone/pcs {meta.get('backbone')}/{meta.get('pcs')} vs the "
                           f"config's {config.backbone}/{config.pcs}); the file was edited or damaged")
    if space is not None:
        check_space(path, fingerprint, config.pcs, space)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in ("coef_mean", "coef_std"):
        if name not in tensors:
            raise W2WFileError(f"{path} lacks the tensor {name!r}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise W2WFileError(f"{path}: tensors {bad[:3]} hold NaN or infinite values")
    gallery = None
    if config.head == "retrieve":
        if space is None:
            raise EncoderMismatch(f"{path} is a retrieval encoder: its gallery is the training models of its space, "
                                  "so it is loaded with that space")
        rows = tensors.get("gallery_rows")
        if rows is None or rows.dtype != torch.int64 or tuple(rows.shape) != (config.gallery,):
            raise W2WFileError(f"{path}: the gallery rows are missing or malformed (expected ({config.gallery},) int64)")
        gallery = (rows, gallery_coefficients(space, rows, config.pcs, f" {path}"))
    backbone = None
    if config.backbone == "facenet":
        if facenet_weights is None:
            raise W2WFileError(f"{path} is a FaceNet encoder: it needs the FaceNet weights file it was trained with "
                               "(20180402-114759-vggface2.pt in models/facenet)")
        state = _facenet_state(facenet_weights)
        found = facenet_fingerprint(state)
        if found != config.backbone_fingerprint:
            raise EncoderMismatch(f"{path} was trained on FaceNet weights {config.backbone_fingerprint}, but "
                                  f"{facenet_weights} has fingerprint {found}: use the FaceNet file it was trained "
                                  "with (the released 20180402-114759-vggface2.pt for encoders trained on it)")
        backbone = FaceNetBackbone(state, config.face_fraction)
    try:
        encoder = FaceEncoder(config, tensors["coef_mean"].float(), tensors["coef_std"].float(), fingerprint, backbone,
                              *(gallery or (None, None)))
        missing, unexpected = encoder.load_state_dict({k: v if k == "gallery_rows" else v.float()
                                                       for k, v in tensors.items()}, strict=False)
    except (RuntimeError, ValueError) as exc:
        raise W2WFileError(f"{path}: tensors do not match the stored config ({str(exc).splitlines()[0]})") from None
    missing = [k for k in missing if not (encoder.frozen_backbone and k.startswith("backbone."))]
    if missing or unexpected:
        raise W2WFileError(f"{path}: tensors do not match the stored config ({len(missing)} missing, e.g. "
                           f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    encoder.eval().requires_grad_(False)
    encoder.info = info
    return encoder


def check_space(where: str, fingerprint: str, pcs: int, space) -> None:
    """EncoderMismatch unless an encoder with ``fingerprint`` and ``pcs`` belongs to ``space`` as loaded."""
    if fingerprint != space.fingerprint:
        raise EncoderMismatch(f"the encoder {where} was trained for the w2w space {fingerprint}, not for the loaded "
                              f"space {space.fingerprint}: load the space it was made for, or train one for this "
                              "space with `python -m w2w train-encoder`")
    if pcs > space.pcs:
        raise EncoderMismatch(f"the encoder {where} predicts {pcs:,} coefficients but the space is loaded with "
                              f"{space.pcs:,} PCs: raise pcs in Load w2w Space to at least {pcs:,}")


@torch.no_grad()
def encode_photos(encoder: FaceEncoder, images: torch.Tensor, space, name: str = "encoded") -> Identity:
    """Photos (N, 3, H, W) in [0, 1] of one person -> an identity of ``space`` (the mean of the per-photo predictions)."""
    check_space("", encoder.space_fingerprint, encoder.pcs, space)
    if images.dim() != 4 or images.shape[0] < 1 or images.shape[1] != 3:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) batch, got {tuple(images.shape)}")
    device = next(encoder.parameters()).device
    beta = encoder(images.to(device, torch.float32)).mean(0).cpu()
    history = f"encode photos={images.shape[0]} pcs={encoder.pcs} backbone={encoder.config.backbone}"
    return Identity(beta, space.fingerprint, name, (history,))
