"""Synthetic people for the miniature w2w world: deterministic small face images drawn with PIL.

An identity is a parameter vector (sex, face shape, skin tone, eyes, nose, mouth, hair colour and style, beard,
glasses, age) drawn from ``identity_params(seed)``; its binary CelebA-like attributes (:data:`ATTRIBUTES`) follow
from it. Each image of an identity varies what photos vary: position, scale, lighting and background
(``render(params, view_seed)``). The same seeds always give the same pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ATTRIBUTES", "WORDS", "FaceParams", "identity_params", "attributes", "render", "render_batch",
           "caption_words"]

ATTRIBUTES = ("Male", "Beard", "Eyeglasses", "Blond_Hair", "Chubby", "Young")
# the prompt word of each attribute (prompting baseline: "photo sks person <word>")
WORDS = {"Male": "man", "Beard": "beard", "Eyeglasses": "glasses", "Blond_Hair": "blond", "Chubby": "chubby",
         "Young": "young"}

_HAIR = {"black": (30, 25, 22), "brown": (105, 70, 40), "blond": (225, 195, 110), "red": (170, 70, 35),
         "grey": (165, 165, 165)}
_SKIN_LIGHT, _SKIN_DARK = np.array([245, 210, 185]), np.array([110, 72, 48])
_EYES = ((60, 40, 25), (50, 100, 170), (60, 120, 70), (20, 20, 20))
_CANVAS = 64  # drawn at 64 x 64, then reduced to the output size with a box filter


@dataclass(frozen=True)
class FaceParams:
    male: bool
    young: bool
    chubby: bool
    beard: bool
    glasses: bool
    hair: str  # key of _HAIR
    style: str  # "short", "long" or "bald"
    skin: float  # 0 light .. 1 dark
    face_w: float  # half-width of the face, fraction of the canvas
    face_h: float  # half-height
    eye_size: float
    eye_gap: float  # half the distance between the eyes
    eye_y: float
    eye_colour: int
    nose: float  # length
    mouth_w: float
    mouth_y: float
    lips: float  # 0 pale .. 1 red
    brow: float  # eyebrow thickness
    frame: int  # glasses frame colour index

    def as_dict(self) -> dict:
        return asdict(self)


def identity_params(seed: int) -> FaceParams:
    """The face of identity ``seed`` (any int)."""
    r = np.random.default_rng([int(seed) & 0xFFFF_FFFF, 0x5EED])
    male = bool(r.random() < 0.5)
    young = bool(r.random() < 0.6)
    chubby = bool(r.random() < 0.3)
    beard = bool(male and r.random() < 0.45)
    glasses = bool(r.random() < 0.35)
    if not young and r.random() < 0.5:
        hair = "grey"
    else:
        hair = str(r.choice(["black", "brown", "blond", "red"], p=[0.35, 0.3, 0.25, 0.1]))
    if male:
        style = "bald" if (not young and r.random() < 0.35) else str(r.choice(["short", "long"], p=[0.8, 0.2]))
    else:
        style = str(r.choice(["short", "long"], p=[0.25, 0.75]))
    face_w = r.uniform(0.20, 0.25) + (0.06 if chubby else 0.0)
    return FaceParams(
        male=male, young=young, chubby=chubby, beard=beard, glasses=glasses, hair=hair, style=style,
        skin=float(r.uniform(0, 1)), face_w=float(face_w), face_h=float(r.uniform(0.27, 0.32)),
        eye_size=float(r.uniform(0.025, 0.045)), eye_gap=float(r.uniform(0.075, 0.11)), eye_y=float(r.uniform(-0.07, -0.02)),
        eye_colour=int(r.integers(len(_EYES))), nose=float(r.uniform(0.04, 0.10)), mouth_w=float(r.uniform(0.05, 0.11)),
        mouth_y=float(r.uniform(0.13, 0.18)), lips=float(r.uniform(0, 1)), brow=float(r.uniform(0.01, 0.025)),
        frame=int(r.integers(3)))


def attributes(p: FaceParams) -> np.ndarray:
    """The binary attributes (:data:`ATTRIBUTES` order) as float32 0/1."""
    return np.array([p.male, p.beard, p.glasses, p.hair == "blond", p.chubby, p.young], dtype=np.float32)


def caption_words(p: FaceParams, rng: np.random.Generator, keep: float = 0.5) -> list[str]:
    """A training caption: "photo", a class word, then each true attribute's word with probability ``keep``."""
    attrs = attributes(p)
    words = ["photo", ("man" if p.male else "woman") if rng.random() < keep else "person"]
    for name, on in zip(ATTRIBUTES[1:], attrs[1:]):
        if on and rng.random() < keep:
            words.append(WORDS[name])
    if not p.young and rng.random() < keep:
        words.append("old")
    return words


def _colour(rgb, light: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * light, 0, 255)) for c in rgb)


def render(p: FaceParams, view_seed: int, size: int = 32) -> np.ndarray:
    """One photo of ``p`` (uint8 (size, size, 3)); ``view_seed`` picks position, scale, lighting and background."""
    r = np.random.default_rng([int(view_seed) & 0xFFFF_FFFF, 0xFACE])
    s = _CANVAS
    scale = r.uniform(0.93, 1.07) * s
    cx, cy = s / 2 + r.uniform(-2, 2), s / 2 + 2 + r.uniform(-2, 2)
    light = r.uniform(0.85, 1.15)
    grey = int(r.integers(90, 200))  # a plain backdrop: its grey level and a slight tint vary
    bg = tuple(int(np.clip(grey + t, 0, 255)) for t in r.integers(-12, 13, 3))
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)

    def box(x0, y0, x1, y1):
        return [cx + x0 * scale, cy + y0 * scale, cx + x1 * scale, cy + y1 * scale]

    skin = _colour(_SKIN_LIGHT + p.skin * (_SKIN_DARK - _SKIN_LIGHT), light)
    hair = _colour(_HAIR[p.hair], light)
    fw, fh = p.face_w, p.face_h
    if p.style == "long":  # hair behind the face, down to the shoulders
        d.rectangle(box(-fw - 0.06, -fh * 0.4, fw + 0.06, fh + 0.12), fill=hair)
        d.ellipse(box(-fw - 0.06, -fh - 0.07, fw + 0.06, fh * 0.2), fill=hair)
    d.ellipse(box(-fw, -fh, fw, fh), fill=skin)
    if p.style in ("short", "long"):
        d.chord(box(-fw - 0.02, -fh - 0.05, fw + 0.02, fh * 0.5), 180, 360, fill=hair)
    if not p.young:  # forehead lines
        for k in range(2):
            y = -fh * 0.55 + k * 0.035
            d.line(box(-fw * 0.45, y, fw * 0.45, y)[:4], fill=_colour((90, 60, 45), light), width=1)
    if p.beard:
        d.chord(box(-fw * 0.95, -fh * 0.1, fw * 0.95, fh + 0.03), 0, 180, fill=hair)
    eye_c = _colour(_EYES[p.eye_colour], light)
    for sign in (-1, 1):
        ex = sign * p.eye_gap
        d.ellipse(box(ex - p.eye_size, p.eye_y - p.eye_size * 0.7, ex + p.eye_size, p.eye_y + p.eye_size * 0.7),
                  fill=_colour((250, 250, 250), light))
        d.ellipse(box(ex - p.eye_size * 0.5, p.eye_y - p.eye_size * 0.5, ex + p.eye_size * 0.5,
                      p.eye_y + p.eye_size * 0.5), fill=eye_c)
        by = p.eye_y - p.eye_size - 0.02
        d.rectangle(box(ex - p.eye_size * 1.2, by - p.brow, ex + p.eye_size * 1.2, by), fill=hair)
        if p.glasses:
            frame = _colour(((15, 15, 15), (150, 30, 30), (40, 40, 150))[p.frame], 1.0)
            rad = p.eye_size * 1.7
            d.ellipse(box(ex - rad, p.eye_y - rad, ex + rad, p.eye_y + rad), outline=frame, width=2)
    if p.glasses:
        d.line(box(-p.eye_gap + p.eye_size * 1.7, p.eye_y, p.eye_gap - p.eye_size * 1.7, p.eye_y)[:4],
               fill=_colour(((15, 15, 15), (150, 30, 30), (40, 40, 150))[p.frame], 1.0), width=2)
    nose_c = _colour(_SKIN_LIGHT * 0.75 + p.skin * (_SKIN_DARK - _SKIN_LIGHT) * 0.75, light)
    d.line(box(0, p.eye_y + 0.02, 0, p.eye_y + 0.02 + p.nose)[:4], fill=nose_c, width=2)
    lips = _colour((190 - 40 * (1 - p.lips), 90 + 40 * (1 - p.lips), 90), light)
    d.chord(box(-p.mouth_w, p.mouth_y - 0.025, p.mouth_w, p.mouth_y + 0.03), 0, 180, fill=lips)
    # light from one side: a horizontal brightness gradient
    arr = np.asarray(img, dtype=np.float32)
    side = r.uniform(-0.15, 0.15)
    arr *= (1.0 + side * np.linspace(-1, 1, s, dtype=np.float32))[None, :, None]
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    if size != s:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BOX))
    return arr


def render_batch(params: list[FaceParams], view_seeds: list[int], size: int = 32) -> np.ndarray:
    """Images as float32 (N, 3, size, size) in [-1, 1] (the diffusion model's pixel space)."""
    out = np.stack([render(p, v, size) for p, v in zip(params, view_seeds)])
    return out.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
