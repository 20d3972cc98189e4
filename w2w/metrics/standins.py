"""Stand-ins for tests, smoke runs and demos: a drawn face MTCNN detects, and random FaceNet weights.

Neither says anything about real identities: the random FaceNet only exercises the loading and scoring path.
"""
from __future__ import annotations

import os

import torch

__all__ = ["draw_face", "save_random_facenet"]


def draw_face(size: int = 256, *, skin=(225, 180, 150), hair=(60, 40, 30), background=(70, 90, 120),
              offset: tuple[int, int] = (0, 0), features: bool = True, blur: float = 1.0):
    """A flat cartoon head and shoulders (PIL RGB image, ``size`` square) that MTCNN detects as a face.

    ``offset`` moves the head in pixels of a 256 canvas; ``features=False`` leaves out eyes, brows, nose and
    mouth (a blank oval MTCNN does not take for a face).
    """
    from PIL import Image, ImageDraw, ImageFilter
    img = Image.new("RGB", (size, size), tuple(background))
    draw = ImageDraw.Draw(img)
    s, (dx, dy) = size / 256.0, offset

    def xy(*coords):  # canvas-256 coordinates -> pixels, moved by offset
        return [(c + (dx if i % 2 == 0 else dy)) * s for i, c in enumerate(coords)]

    draw.ellipse(xy(68, 40, 188, 200), fill=tuple(hair))
    draw.rectangle(xy(70, 150, 186, 256 + 64), fill=(60, 60, 90))  # shoulders
    draw.ellipse(xy(78, 60, 178, 210), fill=tuple(skin))
    if features:
        for x in (100, 134):
            draw.ellipse(xy(x, 112, x + 22, 124), fill=(255, 255, 255))
            draw.ellipse(xy(x + 6, 113, x + 16, 123), fill=(40, 30, 25))
        draw.line(xy(98, 104, 124, 100), fill=(70, 50, 40), width=max(1, round(4 * s)))
        draw.line(xy(132, 100, 158, 104), fill=(70, 50, 40), width=max(1, round(4 * s)))
        nose = xy(128, 125, 120, 155, 136, 155)
        draw.polygon(list(zip(nose[0::2], nose[1::2])), fill=tuple(int(c * 0.88) for c in skin))
        draw.ellipse(xy(110, 168, 146, 180), fill=(170, 80, 80))
    return img.filter(ImageFilter.GaussianBlur(blur * s)) if blur > 0 else img


def save_random_facenet(path: str, seed: int = 0, *, logits_classes: int = 16) -> str:
    """Write a random-initialised FaceNet state dict in the layout of the released file (with a ``logits`` head).

    BatchNorm statistics are set from a few random batches so that embeddings of different inputs differ
    (with the default statistics every input maps to nearly the same vector). Written atomically.
    """
    from .faces import require_facenet
    fn = require_facenet()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fn.InceptionResnetV1(pretrained=None, classify=False)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            tint = torch.rand(8, 3, 1, 1, generator=generator)
            model(tint * torch.rand(8, 3, 160, 160, generator=generator) * 2.0 - 1.0)
    model.eval()
    state = dict(model.state_dict())
    state["logits.weight"] = torch.randn(logits_classes, 512, generator=generator) * 0.01
    state["logits.bias"] = torch.zeros(logits_classes)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
