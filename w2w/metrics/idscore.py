"""The paper's ID score: MTCNN face crop, FaceNet (VGGFace2) embedding, cosine similarity reference vs generated.

Every pair is reported on its own. A pair where either image has no detectable face gets no score and a status
saying which side failed; the mean is taken over the scored pairs only and says how many that was.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .faces import DetectorConfig, Face, FaceDetector, FaceEmbedder, find_facenet_weights, to_uint8_images

__all__ = ["PairScore", "IDScoreResult", "IDScorer", "get_scorer", "pair_indices", "id_score", "preview_crops"]

Callback = Callable[[int, int, str], None]

OK = "ok"
NO_FACE_REFERENCE = "no face in reference"
NO_FACE_GENERATED = "no face in generated"
NO_FACE_EITHER = "no face in either image"


@dataclass(frozen=True)
class PairScore:
    """One reference/generated pair: cosine similarity of their face embeddings, or None with the reason."""
    reference: str
    generated: str
    score: float | None
    status: str  # "ok" or which side has no face

    def __post_init__(self):
        if (self.score is None) != (self.status != OK):
            raise ValueError(f"pair {self.reference}/{self.generated}: score {self.score} and status {self.status!r} disagree")


@dataclass(frozen=True)
class IDScoreResult:
    """Per-pair scores, the faces found, and the mean over scored pairs (NaN when no pair could be scored)."""
    pairs: tuple[PairScore, ...]
    reference_faces: tuple[Face | None, ...]
    generated_faces: tuple[Face | None, ...]
    pair_index: tuple[tuple[int, int], ...]  # (reference index, generated index) of each pair

    @property
    def scores(self) -> list[float]:
        return [p.score for p in self.pairs if p.score is not None]

    @property
    def n_scored(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        scores = self.scores
        return float(np.mean(scores)) if scores else math.nan

    def report(self) -> str:
        """Human-readable table: the mean, how many pairs it covers, then one line per pair."""
        if self.n_scored:
            head = f"ID score {self.mean:.4f} (mean over {self.n_scored} of {len(self.pairs)} pairs with a face on both sides)"
        else:
            head = f"ID score: none of the {len(self.pairs)} pairs has a face on both sides; no mean"
        lines = [head, "FaceNet VGGFace2 cosine similarity of MTCNN face crops, reference vs generated"]
        for p in self.pairs:
            value = f"{p.score:7.4f}" if p.score is not None else "      -"
            lines.append(f"{value}  {p.reference} -> {p.generated}  {p.status}")
        return "\n".join(lines)


class IDScorer:
    """MTCNN detector + FaceNet embedder; build once, score many batches."""

    def __init__(self, weights_path: str, device: str | torch.device = "cpu", config: DetectorConfig = DetectorConfig()):
        self.detector = FaceDetector(config, device)
        self.embedder = FaceEmbedder(weights_path, device)

    def modules(self) -> torch.nn.Module:
        """Every network of the scorer in one module (for a host that moves models between devices: the scorer then
        runs wherever the networks are)."""
        return torch.nn.ModuleDict({"pnet": self.detector.pnet, "rnet": self.detector.rnet,
                                    "onet": self.detector.onet, "facenet": self.embedder.model})

    def faces(self, images) -> list[Face | None]:
        return self.detector.detect(to_uint8_images(images))

    def embed(self, faces: Sequence[Face | None]) -> list[torch.Tensor | None]:
        """Unit 512-d embedding per found face, None where there is no face."""
        found = [i for i, f in enumerate(faces) if f is not None]
        vectors = self.embedder.embed(torch.stack([faces[i].crop for i in found])) if found else None
        out: list[torch.Tensor | None] = [None] * len(faces)
        for row, i in enumerate(found):
            out[i] = vectors[row]
        return out


_SCORER_CACHE: dict[tuple, IDScorer] = {}


def get_scorer(weights_path: str | None = None, device: str | torch.device = "cpu",
               config: DetectorConfig = DetectorConfig(), search_dirs: tuple[str, ...] = ()) -> IDScorer:
    """An :class:`IDScorer`, reused while the weights file, device and config are unchanged (one kept at a time)."""
    path = os.path.realpath(find_facenet_weights(weights_path, search_dirs))
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, str(torch.device(device)), config)
    if key not in _SCORER_CACHE:
        _SCORER_CACHE.clear()
        _SCORER_CACHE[key] = IDScorer(path, device, config)
    return _SCORER_CACHE[key]


def drop_scorers() -> None:
    """Forget the kept scorer (its networks are freed once nothing else holds them)."""
    _SCORER_CACHE.clear()


def pair_indices(n_references: int, n_generated: int) -> list[tuple[int, int]]:
    """One reference is compared with every generated image; otherwise the counts must match (pairwise)."""
    if n_references == 0 or n_generated == 0:
        raise ValueError(f"ID score needs images on both sides: got {n_references} reference(s), {n_generated} generated")
    if n_references == 1:
        return [(0, g) for g in range(n_generated)]
    if n_references == n_generated:
        return [(i, i) for i in range(n_generated)]
    raise ValueError(
        f"{n_references} reference images and {n_generated} generated images: give one reference (compared with "
        "every generated image) or as many references as generated images (compared pairwise, in order)")


def id_score(scorer: IDScorer, references, generated, *, reference_names: Sequence[str] | None = None,
             generated_names: Sequence[str] | None = None, pairs: Sequence[tuple[int, int]] | None = None,
             callback: Callback | None = None) -> IDScoreResult:
    """Score generated images against references (see :func:`pair_indices` unless ``pairs`` is given).

    ``references``/``generated``: ComfyUI IMAGE tensors (B, H, W, C) in [0, 1], uint8 arrays or PIL images.
    ``callback(step, total, info)`` is called after each stage and may raise to stop.
    """
    refs, gens = to_uint8_images(references), to_uint8_images(generated)
    ref_names = list(reference_names) if reference_names is not None else [f"reference {i}" for i in range(len(refs))]
    gen_names = list(generated_names) if generated_names is not None else [f"generated {i}" for i in range(len(gens))]
    if len(ref_names) != len(refs) or len(gen_names) != len(gens):
        raise ValueError(f"{len(ref_names)}/{len(gen_names)} names for {len(refs)}/{len(gens)} images")
    index = list(pairs) if pairs is not None else pair_indices(len(refs), len(gens))
    for r, g in index:
        if not (0 <= r < len(refs) and 0 <= g < len(gens)):
            raise ValueError(f"pair ({r}, {g}) is out of range for {len(refs)} references and {len(gens)} generated")

    total = 4
    ref_faces = scorer.detector.detect(refs)
    _report(callback, 1, total, f"faces found in {sum(f is not None for f in ref_faces)} of {len(refs)} references")
    gen_faces = scorer.detector.detect(gens)
    _report(callback, 2, total, f"faces found in {sum(f is not None for f in gen_faces)} of {len(gens)} generated")
    ref_vecs, gen_vecs = scorer.embed(ref_faces), scorer.embed(gen_faces)
    _report(callback, 3, total, "embeddings computed")

    results = [_pair_score(ref_names[r], gen_names[g], ref_vecs[r], gen_vecs[g]) for r, g in index]
    _report(callback, 4, total, "scored")
    return IDScoreResult(tuple(results), tuple(ref_faces), tuple(gen_faces), tuple((r, g) for r, g in index))


def _pair_score(ref_name: str, gen_name: str, ref: torch.Tensor | None, gen: torch.Tensor | None) -> PairScore:
    if ref is None or gen is None:
        status = NO_FACE_EITHER if ref is None and gen is None else (NO_FACE_REFERENCE if ref is None else NO_FACE_GENERATED)
        return PairScore(ref_name, gen_name, None, status)
    cosine = torch.nn.functional.cosine_similarity(ref.double()[None], gen.double()[None]).item()
    return PairScore(ref_name, gen_name, float(cosine), OK)


def _report(callback: Callback | None, step: int, total: int, info: str) -> None:
    if callback is not None:
        callback(step, total, info)


def preview_crops(result: IDScoreResult, size: int = 160) -> torch.Tensor:
    """(P, size, 2*size, 3) float image batch: reference crop | generated crop per pair; a crossed grey tile
    where no face was found."""
    tiles = []
    for r, g in result.pair_index:
        tiles.append(torch.cat([_tile(result.reference_faces[r], size), _tile(result.generated_faces[g], size)], dim=1))
    return torch.stack(tiles) if tiles else torch.zeros(1, size, 2 * size, 3)


def _tile(face: Face | None, size: int) -> torch.Tensor:
    if face is None:
        tile = torch.full((size, size, 3), 0.25)
        diagonal = torch.arange(size)
        for offset in (-1, 0, 1):
            cols = (diagonal + offset).clamp(0, size - 1)
            tile[diagonal, cols] = torch.tensor([0.9, 0.2, 0.2])
            tile[diagonal, size - 1 - cols] = torch.tensor([0.9, 0.2, 0.2])
        return tile
    crop = face.crop.float()[None] / 255.0  # (1, 3, S, S)
    if crop.shape[-1] != size:
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
    return crop[0].permute(1, 2, 0).clamp(0.0, 1.0)
