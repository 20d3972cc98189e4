"""Metrics for judging identities: the paper's ID score (MTCNN + FaceNet VGGFace2, cosine similarity).

facenet-pytorch is imported only when a scorer is built (``pip install --no-deps facenet-pytorch==2.6.0``).
"""
from .faces import (
    FACENET_FILENAME, FACENET_URL, DetectorConfig, Face, FaceNetWeightsMissing, find_facenet_weights,
    require_facenet, torch_hub_checkpoints_dir,
)
from .idscore import IDScorer, IDScoreResult, PairScore, get_scorer, id_score, pair_indices, preview_crops

__all__ = [
    "FACENET_FILENAME", "FACENET_URL", "DetectorConfig", "Face", "FaceNetWeightsMissing", "find_facenet_weights",
    "require_facenet", "torch_hub_checkpoints_dir",
    "IDScorer", "IDScoreResult", "PairScore", "get_scorer", "id_score", "pair_indices", "preview_crops",
]
