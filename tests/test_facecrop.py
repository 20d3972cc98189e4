"""Face-aware framing for inversion (w2w.facecrop): a real public-domain photo pasted small and off-centre into a
large canvas is found and framed; a photo without a face is reported; the square and the mask are what they claim."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from w2w.facecrop import PORTRAIT_SCALE, FaceFrame, crop_square, detect_frames, face_mask, square_around

needs_detector = pytest.mark.skipif(importlib.util.find_spec("facenet_pytorch") is None,
                                    reason="facenet-pytorch is not installed: pip install --no-deps -r "
                                           "requirements-idscore.txt")


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data", reason="scikit-image (a test requirement) ships the public-domain "
                                                      "astronaut photo: pip install scikit-image")
    return data.astronaut()  # (512, 512, 3) uint8, Eileen Collins, NASA, public domain


def pasted(photo: np.ndarray, side: int, canvas=(768, 1152), at=(430, 820)) -> tuple[torch.Tensor, float, tuple]:
    """The photo resized to side × side and pasted at (top, left) of a grey canvas: (IMAGE (1, H, W, 3), scale, at)."""
    from PIL import Image

    small = np.asarray(Image.fromarray(photo).resize((side, side), Image.Resampling.LANCZOS))
    out = np.full((*canvas, 3), 118, np.uint8)
    out[at[0]: at[0] + side, at[1]: at[1] + side] = small
    return torch.from_numpy(out).float()[None] / 255.0, side / photo.shape[0], at


@pytest.mark.parametrize("box, expected", [
    ((100, 100, 140, 150), (70, 75, 100)),      # side 2 × 50 = 100, centred on (120, 125)
    ((0, 0, 30, 40), (0, 0, 80)),               # at a corner: moved inside, never shrunk
    ((950, 700, 1000, 760), (880, 648, 120)),   # at the far corner of a 1000 × 768 photo: moved inside
    ((10, 10, 500, 700), (0, 0, 768)),          # larger than the photo: the photo's shorter side
])
def test_square_is_twice_the_face_centred_and_inside(box, expected):
    left, top, side = square_around(box, 768, 1000)
    assert (left, top, side) == expected
    assert 0 <= left and 0 <= top and left + side <= 1000 and top + side <= 768
    assert side == min(768, int(np.ceil(PORTRAIT_SCALE * max(box[2] - box[0], box[3] - box[1]))))


def test_crop_square_takes_exactly_the_region():
    image = torch.zeros(50, 80, 3)
    image[10:30, 40:60] = 1.0
    torch.testing.assert_close(crop_square(image, (40, 10, 20), 20), torch.ones(20, 20, 3))
    assert crop_square(image, (40, 10, 20), 64).shape == (64, 64, 3)


def test_face_mask_is_one_on_the_face_and_fades_to_zero():
    frame = FaceFrame(box=(40.0, 40.0, 60.0, 64.0), probability=0.99, square=(26, 28, 48))
    m = face_mask(frame, 96)
    assert m.shape == (96, 96) and float(m.min()) == 0.0 and float(m.max()) == 1.0
    centre = (int((52 - 28) * 2), int((50 - 26) * 2))  # face centre in crop pixels (96 / 48 = 2)
    assert float(m[centre]) == 1.0 and float(m[0, 0]) == 0.0
    assert 0.0 < float(m[m > 0].min()) < 1.0  # a feathered edge, not a hard cut


@needs_detector
def test_small_off_centre_real_face_is_found_and_framed(astronaut):
    from facenet_pytorch import MTCNN
    from PIL import Image

    boxes, _ = MTCNN(select_largest=True, post_process=False, device="cpu").detect(Image.fromarray(astronaut))
    reference = np.asarray(boxes[0], dtype=np.float64)  # the face in the full-size photo, by facenet-pytorch itself
    image, scale, (top, left) = pasted(astronaut, 192)
    known = (reference[0] * scale + left, reference[1] * scale + top, reference[2] * scale + left,
             reference[3] * scale + top)
    (frame,) = detect_frames(image)
    assert frame is not None and iou(frame.box, known) >= 0.7, (frame, known)
    sq_left, sq_top, side = frame.square
    assert sq_left <= known[0] and sq_top <= known[1] and sq_left + side >= known[2] and sq_top + side >= known[3]
    assert side < 0.25 * min(image.shape[1:3])  # a portrait of the face, not of the canvas


@needs_detector
def test_photo_without_a_face_gives_none_next_to_one_with_a_face(astronaut):
    image, _, _ = pasted(astronaut, 256)
    blank = torch.full_like(image, 0.5)
    frames = detect_frames(torch.cat([blank, image]))
    assert frames[0] is None and frames[1] is not None
