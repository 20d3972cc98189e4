"""Face-aware framing of the photos an inversion sees: find the largest face (MTCNN, the weights that ship inside the
facenet-pytorch wheel: nothing is downloaded), cut a square portrait around it, and optionally a feathered face mask.

Framing: a square of side ``PORTRAIT_SCALE`` (2.0) × the larger side of the face box, centred on the box. MTCNN's box
runs from the brows to the chin, so this gives head, hair and a little neck and shoulder — the tight portraits the w2w
models were trained on (identity sets generated from CelebA's aligned face crops; paper §4 and App. A). The square is
moved, never shrunk, to stay inside the photo; only a photo smaller than the square gets a smaller one.

Images are ComfyUI IMAGE tensors (N, H, W, 3) in [0, 1]; boxes and squares are in pixels of each photo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .metrics.faces import DetectorConfig, FaceDetector

__all__ = ["PORTRAIT_SCALE", "FaceFrame", "NoFaceError", "square_around", "detect_frames", "crop_square",
           "face_mask", "DETECTOR_INSTALL"]

PORTRAIT_SCALE = 2.0
DETECTOR_INSTALL = "pip install --no-deps -r requirements-idscore.txt"  # facenet-pytorch with MTCNN's weights


class NoFaceError(ValueError):
    """No face was found in a photo that needs one."""


@dataclass(frozen=True)
class FaceFrame:
    """Where the face of one photo is and the square portrait cut around it."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 of the face (MTCNN)
    probability: float
    square: tuple[int, int, int]  # left, top, side


def square_around(box: tuple[float, float, float, float], height: int, width: int,
                  scale: float = PORTRAIT_SCALE) -> tuple[int, int, int]:
    """(left, top, side) of the square of side ``scale`` × the box's larger side centred on it, moved inside the
    ``height`` × ``width`` photo (shrunk only if the photo is smaller than the square)."""
    x1, y1, x2, y2 = box
    side = min(height, width, max(1, int(math.ceil(scale * max(x2 - x1, y2 - y1)))))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side


def detect_frames(images: torch.Tensor, detector: FaceDetector | None = None,
                  scale: float = PORTRAIT_SCALE) -> list[FaceFrame | None]:
    """The largest face of every photo of ``images`` (N, H, W, 3) in [0, 1] and its portrait square, or None."""
    detector = detector or FaceDetector(DetectorConfig())
    pixels = [np.ascontiguousarray((img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
              for img in images]
    frames: list[FaceFrame | None] = []
    for image, face in zip(pixels, detector.detect(pixels)):
        if face is None:
            frames.append(None)
            continue
        frames.append(FaceFrame(face.box, face.probability, square_around(face.box, *image.shape[:2], scale=scale)))
    return frames


def crop_square(image: torch.Tensor, square: tuple[int, int, int], size: int) -> torch.Tensor:
    """(H, W, C) -> the square region resized to (size, size, C) (antialiased bilinear)."""
    left, top, side = square
    region = image[top: top + side, left: left + side].permute(2, 0, 1)[None].float()
    if side != size:
        region = F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return region[0].permute(1, 2, 0).clamp(0.0, 1.0)


def face_mask(frame: FaceFrame, size: int, feather: float = 0.25) -> torch.Tensor:
    """(size, size) mask of the face inside the portrait square: 1 inside an ellipse around the face box, falling
    smoothly to 0 over ``feather`` × the ellipse's radii (a soft mask: the loss weights pixels by it)."""
    left, top, side = frame.square
    x1, y1, x2, y2 = frame.box
    to_crop = size / side
    cx, cy = ((x1 + x2) / 2 - left) * to_crop, ((y1 + y2) / 2 - top) * to_crop
    rx, ry = max(1.0, (x2 - x1) / 2 * to_crop * 1.15), max(1.0, (y2 - y1) / 2 * to_crop * 1.25)  # forehead, chin
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    r = torch.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)  # 1 on the ellipse
    return ((1.0 + feather - r) / feather).clamp(0.0, 1.0)
