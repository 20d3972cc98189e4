"""Synthetic people for the miniature w2w world: deterministic small face images drawn with PIL.

An identity is a parameter vector (sex, face shape, skin tone, eyes, nose, mouth, hair colour and style, beard,
glasses, age) drawn from ``identity_params(seed)``; its binary CelebA-like attributes (:data:`ATTRIBUTES`) follow
from it. Each image of an identity varies what photos vary: position, scale, lighting and background
(``render(params, view_seed)``). The same seeds always give the same pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["ATTRIBUTES", "WORDS", "FaceParams", "identity_params", "attributes", "render", "render_batch",
           "caption_words", "scene_words", "STYLES", "STYLE_VERSIONS", "Pose", "hard_pose", "head_mask", "mask_batch",
           "mark_colours"]

ATTRIBUTES = ("Male", "Beard", "Eyeglasses", "Blond_Hair", "Chubby", "Young")
# the prompt word of each attribute (prompting baseline: "photo sks person <word>")
WORDS = {"Male": "man", "Beard": "beard", "Eyeglasses": "glasses", "Blond_Hair": "blond", "Chubby": "chubby",
         "Young": "young"}

_HAIR = {"black": (30, 25, 22), "brown": (105, 70, 40), "blond": (225, 195, 110), "red": (170, 70, 35),
         "grey": (165, 165, 165)}
_SKIN_LIGHT, _SKIN_DARK = np.array([245, 210, 185]), np.array([110, 72, 48])
_EYES = ((60, 40, 25), (50, 100, 170), (60, 120, 70), (20, 20, 20))
_CANVAS = 64  # drawn at 64 x 64, then reduced to the output size with a box filter
# "plain": position, scale, brightness and a grey backdrop vary a little (the first miniature world);
# "hard": what one photo cannot separate from identity varies widely (see _render_hard);
# "sided": hard photos whose head is always turned, showing one cheek and its mark (see _render_hard)
STYLES = ("plain", "hard", "sided")
# raised when a style's pixels change (training checkpoints record it)
STYLE_VERSIONS = {"plain": 1, "hard": 2, "sided": 1}


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
    # the mark on the cheek a head turned to the image's right shows (sided photos only); the other cheek's is its
    # complement (255 - each channel), so no one photo shows both and only people seen from both sides link them
    mark: tuple[int, int, int] = (128, 128, 128)

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
    mark = tuple(int(v) for v in np.random.default_rng([int(seed) & 0xFFFF_FFFF, 0x3A7C]).integers(25, 231, 3))
    return FaceParams(
        male=male, young=young, chubby=chubby, beard=beard, glasses=glasses, hair=hair, style=style,
        skin=float(r.uniform(0, 1)), face_w=float(face_w), face_h=float(r.uniform(0.27, 0.32)),
        eye_size=float(r.uniform(0.025, 0.045)), eye_gap=float(r.uniform(0.075, 0.11)), eye_y=float(r.uniform(-0.07, -0.02)),
        eye_colour=int(r.integers(len(_EYES))), nose=float(r.uniform(0.04, 0.10)), mouth_w=float(r.uniform(0.05, 0.11)),
        mouth_y=float(r.uniform(0.13, 0.18)), lips=float(r.uniform(0, 1)), brow=float(r.uniform(0.01, 0.025)),
        frame=int(r.integers(3)), mark=mark)


def mark_colours(p: FaceParams) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The colours of ``p``'s cheek marks: (shown when the head turns to the image's right, when it turns left)."""
    return p.mark, tuple(255 - v for v in p.mark)


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


@dataclass(frozen=True)
class Pose:
    """How the head is held in one photo: turn, expression, headwear (all neutral in plain photos)."""

    yaw: float = 0.0  # head turn, radians (+: the face turns to the image's right)
    eye_open: float = 1.0  # eye height factor (squint < 1, blink ~0.2)
    smile: float = 0.0  # 0 neutral .. 1 broad smile (wider, deeper mouth)
    mouth_open: bool = False
    brow_raise: float = 0.0  # eyebrows moved up by this fraction of the canvas
    hat: tuple[int, int, int] | None = None  # colour of a cap hiding the top of the head
    brim: bool = False  # the cap has a peak


def _draw_head(d: ImageDraw.ImageDraw, box, p: FaceParams, light: float, pose: Pose = Pose(),
               marks: bool = False) -> None:
    """Draw the head of ``p`` seen in ``pose``; ``box(x0, y0, x1, y1)`` maps face coordinates to the canvas.

    The face is an ellipsoid turned by ``pose.yaw``: a feature at horizontal position x (depth z on the surface) is
    drawn at x·cos φ + z·sin φ and its width is foreshortened by cos(θ + φ)/cos θ (θ its angle on the surface), so
    the near eye grows, the far one shrinks and everything slides towards the turn. With a neutral pose this is the
    plain photo's drawing, pixel for pixel. ``marks``: a turned head also shows the mark on its near cheek
    (:func:`mark_colours`).
    """
    fw, fh = p.face_w, p.face_h
    phi = pose.yaw
    c, s = float(np.cos(phi)), float(np.sin(phi))

    def depth(x: float, bulge: float = 0.9) -> float:
        return bulge * float(np.sqrt(max(fw * fw - x * x, 0.0)))

    def at(x: float, bulge: float = 0.9) -> float:  # turned horizontal position
        return x if phi == 0 else x * c + depth(x, bulge) * s

    def fore(x: float) -> float:  # foreshortening of a width at x
        if phi == 0:
            return 1.0
        theta = float(np.arcsin(np.clip(x / fw, -0.99, 0.99)))
        return max(0.2, float(np.cos(theta + phi)) / float(np.cos(theta)))

    hair = _colour(_HAIR[p.hair], light)
    back = -0.5 * fw * s  # the back of the head moves against the turn
    if p.style == "long" and pose.hat is None or p.style == "long" and not pose.brim:
        d.rectangle(box(-fw - 0.06 + back, -fh * 0.4, fw + 0.06 + back, fh + 0.12), fill=hair)
        d.ellipse(box(-fw - 0.06 + back, -fh - 0.07, fw + 0.06 + back, fh * 0.2), fill=hair)
    elif p.style == "long":  # long hair under a peaked cap: only below it
        d.rectangle(box(-fw - 0.06 + back, -fh * 0.4, fw + 0.06 + back, fh + 0.12), fill=hair)
    skin = _colour(_SKIN_LIGHT + p.skin * (_SKIN_DARK - _SKIN_LIGHT), light)
    half = fw * (1.0 if phi == 0 else float(np.sqrt(c * c + 0.81 * s * s)))  # outline of the turned ellipsoid
    d.ellipse(box(-half, -fh, half, fh), fill=skin)
    if p.style in ("short", "long"):
        d.chord(box(-fw - 0.02 + back * 0.5, -fh - 0.05, fw + 0.02 + back * 0.5, fh * 0.5), 180, 360, fill=hair)
    if not p.young:  # forehead lines
        for k in range(2):
            y = -fh * 0.55 + k * 0.035
            d.line(box(at(-fw * 0.45), y, at(fw * 0.45), y)[:4], fill=_colour((90, 60, 45), light), width=1)
    if p.beard:
        w = fw * 0.95
        d.chord(box(at(-w, 0.3), -fh * 0.1, at(w, 0.3), fh + 0.03), 0, 180, fill=hair)
    if marks and phi != 0:  # the near cheek: image left when the face turns to the image's right
        x = -0.55 * fw if phi > 0 else 0.55 * fw
        mw = 0.075 * fore(x)
        colour = mark_colours(p)[0 if phi > 0 else 1]
        d.ellipse(box(at(x) - mw, 0.0, at(x) + mw, 0.13), fill=_colour(colour, light))
    eye_c = _colour(_EYES[p.eye_colour], light)
    frame = _colour(((15, 15, 15), (150, 30, 30), (40, 40, 150))[p.frame], 1.0)
    rims = []
    for sign in (-1, 1):
        ex, k = at(sign * p.eye_gap), fore(sign * p.eye_gap)
        ew, eh = p.eye_size * k, p.eye_size * pose.eye_open
        d.ellipse(box(ex - ew, p.eye_y - eh * 0.7, ex + ew, p.eye_y + eh * 0.7), fill=_colour((250, 250, 250), light))
        d.ellipse(box(ex - ew * 0.5, p.eye_y - min(ew, eh) * 0.5, ex + ew * 0.5, p.eye_y + min(ew, eh) * 0.5),
                  fill=eye_c)
        by = p.eye_y - p.eye_size - 0.02 - pose.brow_raise
        d.rectangle(box(ex - p.eye_size * 1.2 * k, by - p.brow, ex + p.eye_size * 1.2 * k, by), fill=hair)
        if p.glasses:
            rad = p.eye_size * 1.7
            d.ellipse(box(ex - rad * k, p.eye_y - rad, ex + rad * k, p.eye_y + rad), outline=frame, width=2)
            rims.append(ex + sign * -1 * rad * k)
    if p.glasses:
        d.line(box(rims[0], p.eye_y, rims[1], p.eye_y)[:4], fill=frame, width=2)
    nose_c = _colour(_SKIN_LIGHT * 0.75 + p.skin * (_SKIN_DARK - _SKIN_LIGHT) * 0.75, light)
    nx = at(0.0, 1.15)  # the nose stands out of the face
    d.line(box(nx, p.eye_y + 0.02, nx, p.eye_y + 0.02 + p.nose)[:4], fill=nose_c, width=2)
    lips = _colour((190 - 40 * (1 - p.lips), 90 + 40 * (1 - p.lips), 90), light)
    mx, mw = at(0.0), p.mouth_w * fore(0.0) * (1 + 0.35 * pose.smile)
    d.chord(box(mx - mw, p.mouth_y - 0.025, mx + mw, p.mouth_y + 0.03 + 0.025 * pose.smile), 0, 180, fill=lips)
    if pose.mouth_open:
        d.ellipse(box(mx - mw * 0.6, p.mouth_y - 0.005, mx + mw * 0.6, p.mouth_y + 0.03), fill=_colour((70, 20, 25), light))
    if pose.hat is not None:  # a cap over the hair line, down to just above the brows
        top = -fh - 0.09
        low = p.eye_y - p.eye_size - 0.045
        d.chord(box(-fw - 0.04 + back * 0.5, top, fw + 0.04 + back * 0.5, 2 * low - top), 180, 360, fill=pose.hat)
        if pose.brim:
            d.rectangle(box(at(-fw * 0.9) + 0.1 * s, low - 0.02, at(fw * 0.9) + 0.1 * s, low + 0.01),
                        fill=tuple(int(v * 0.7) for v in pose.hat))


def render(p: FaceParams, view_seed: int, size: int = 32, style: str = "plain") -> np.ndarray:
    """One photo of ``p`` (uint8 (size, size, 3)); ``view_seed`` picks what the photo varies (see :data:`STYLES`)."""
    return _render(p, view_seed, size, style)[0]


def head_mask(p: FaceParams, view_seed: int, size: int = 32, style: str = "plain") -> np.ndarray:
    """Where the head is in photo ``view_seed`` of ``p`` (float32 (size, size), 1 on the head, 0 elsewhere): what a
    face-parsing segmenter gives — face, hair, beard and headwear; not the neck, clothes, backdrop or an object in
    front of the face. Drawn with the photo's own geometry (head turn, roll, scale, place), at the canvas's
    resolution, reduced as the photo is and set to 1 where at least half of a pixel is head."""
    return _render(p, view_seed, size, style, mask=True)[1]


def _head_alpha(box, p: FaceParams, pose: Pose | None = None, marks: bool = False) -> Image.Image:
    """The head drawn alone on a transparent canvas: its alpha channel is the head's silhouette (mode "L")."""
    layer = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    _draw_head(ImageDraw.Draw(layer), box, p, 1.0, Pose() if pose is None else pose, marks)
    return layer.getchannel("A")


def _reduce_mask(alpha: Image.Image, size: int) -> np.ndarray:
    if size != _CANVAS:
        alpha = alpha.resize((size, size), Image.BOX)
    return (np.asarray(alpha, dtype=np.float32) >= 127.5).astype(np.float32)


def _render(p: FaceParams, view_seed: int, size: int, style: str, mask: bool = False):
    """(photo, head mask or None). The mask is drawn without touching the photo's random draws, so a photo is the
    same pixels whether its mask is asked for or not."""
    if style in ("hard", "sided"):
        return _render_hard(p, view_seed, size, mask, sided=style == "sided")
    if style != "plain":
        raise ValueError(f"unknown photo style {style!r}; choose one of {STYLES}")
    r = np.random.default_rng([int(view_seed) & 0xFFFF_FFFF, 0xFACE])
    s = _CANVAS
    scale = r.uniform(0.93, 1.07) * s
    cx, cy = s / 2 + r.uniform(-2, 2), s / 2 + 2 + r.uniform(-2, 2)
    light = r.uniform(0.85, 1.15)
    grey = int(r.integers(90, 200))  # a plain backdrop: its grey level and a slight tint vary
    bg = tuple(int(np.clip(grey + t, 0, 255)) for t in r.integers(-12, 13, 3))
    img = Image.new("RGB", (s, s), bg)

    def box(x0, y0, x1, y1):
        return [cx + x0 * scale, cy + y0 * scale, cx + x1 * scale, cy + y1 * scale]

    _draw_head(ImageDraw.Draw(img), box, p, light)
    # light from one side: a horizontal brightness gradient
    arr = np.asarray(img, dtype=np.float32)
    side = r.uniform(-0.15, 0.15)
    arr *= (1.0 + side * np.linspace(-1, 1, s, dtype=np.float32))[None, :, None]
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    if size != s:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BOX))
    return arr, (_reduce_mask(_head_alpha(box, p), size) if mask else None)


def _random_rgb(r: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in r.integers(low, high, 3))


def _background(r: np.random.Generator, s: int) -> Image.Image:
    """A backdrop: a plain colour, a gradient, stripes or clutter (shapes of random colours), out of focus."""
    kind = r.choice(["plain", "gradient", "stripes", "clutter"], p=[0.2, 0.25, 0.15, 0.4])
    img = Image.new("RGB", (s, s), _random_rgb(r, 20, 236))
    d = ImageDraw.Draw(img)
    if kind == "gradient":
        a, b = np.array(_random_rgb(r, 20, 236)), np.array(_random_rgb(r, 20, 236))
        angle = r.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
        t = np.clip(0.5 + xx * np.cos(angle) + yy * np.sin(angle), 0, 1)[..., None]
        img = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    elif kind == "stripes":
        other, width = _random_rgb(r, 20, 236), int(r.integers(3, 10))
        vertical = bool(r.random() < 0.5)
        for k in range(0, s, 2 * width):
            d.rectangle([k, 0, k + width - 1, s] if vertical else [0, k, s, k + width - 1], fill=other)
    elif kind == "clutter":
        for _ in range(int(r.integers(4, 11))):
            x0, y0 = r.uniform(-10, s), r.uniform(-10, s)
            w, h = r.uniform(6, 30), r.uniform(6, 30)
            shape = [x0, y0, x0 + w, y0 + h]
            (d.rectangle if r.random() < 0.5 else d.ellipse)(shape, fill=_random_rgb(r))
    # the backdrop is behind the focal plane, as in a portrait
    return img.filter(ImageFilter.GaussianBlur(float(r.uniform(1.5, 3.5))))


def hard_pose(r: np.random.Generator) -> Pose:
    """The head pose, expression and headwear of one hard photo."""
    hat = _random_rgb(r, 10, 246) if r.random() < 0.25 else None
    blink = r.random() < 0.08
    return Pose(yaw=float(r.uniform(-0.6, 0.6)), eye_open=0.2 if blink else float(r.uniform(0.45, 1.15)),
                smile=float(r.uniform(0, 1)) if r.random() < 0.6 else 0.0, mouth_open=bool(r.random() < 0.25),
                brow_raise=float(r.uniform(-0.01, 0.02)), hat=hat, brim=bool(hat is not None and r.random() < 0.5))


def _hard_rng(view_seed: int) -> np.random.Generator:
    return np.random.default_rng([int(view_seed) & 0xFFFF_FFFF, 0x4A4D])


def _photo_pose(r: np.random.Generator, view_seed: int, sided: bool) -> Pose:
    """The pose of a hard photo; a sided photo's head is always turned (0.35-0.7 rad either way, drawn apart from
    the hard photo's numbers, so everything else in the photo is the hard photo's)."""
    pose = hard_pose(r)
    if not sided:
        return pose
    s = np.random.default_rng([int(view_seed) & 0xFFFF_FFFF, 0x51DE])
    return replace(pose, yaw=float(s.choice([-1.0, 1.0]) * s.uniform(0.35, 0.7)))


def scene_words(view_seed: int, style: str = "hard") -> list[str]:
    """Words for what photo ``view_seed`` shows besides the person (model.SCENE_WORDS): "left"/"right" when the head
    is turned by more than 0.3 rad, "smiling" for a broad smile, "cap" when a cap is worn. Plain photos: none."""
    if style not in STYLES:
        raise ValueError(f"unknown photo style {style!r}; choose one of {STYLES}")
    if style == "plain":
        return []
    pose = _photo_pose(_hard_rng(view_seed), view_seed, style == "sided")  # the pose _render_hard draws first
    words = ["left"] if pose.yaw < -0.3 else ["right"] if pose.yaw > 0.3 else []
    if pose.smile > 0.5:
        words.append("smiling")
    if pose.hat is not None:
        words.append("cap")
    return words


def _render_hard(p: FaceParams, view_seed: int, size: int, mask: bool = False, sided: bool = False):
    """A hard photo: the head turned, tilted, with an expression, sometimes a cap, at any scale and place, on a
    cluttered backdrop, in a coloured light from one direction, sometimes blurred; plus clothes and sensor noise.
    ``sided``: the head always turned, its near cheek's mark showing. -> (photo, head mask if ``mask`` else None)."""
    r = _hard_rng(view_seed)
    s = _CANVAS
    pose = _photo_pose(r, view_seed, sided)
    scale = float(np.exp(r.uniform(np.log(0.8), np.log(1.2)))) * s
    cx, cy = s / 2 + r.uniform(-5, 5), s / 2 + 2 + r.uniform(-4, 4)
    roll = r.uniform(-14, 14)
    img = _background(r, s)
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)

    def box(x0, y0, x1, y1):
        return [cx + x0 * scale, cy + y0 * scale, cx + x1 * scale, cy + y1 * scale]

    skin = _colour(_SKIN_LIGHT + p.skin * (_SKIN_DARK - _SKIN_LIGHT), 1.0)
    d.ellipse(box(-0.45, p.face_h + 0.08, 0.45, p.face_h + 0.75), fill=_random_rgb(r))  # shoulders and clothes
    d.rectangle(box(-0.07, p.face_h - 0.1, 0.07, p.face_h + 0.12), fill=skin)  # neck
    _draw_head(d, box, p, 1.0, pose, marks=sided)
    layer = layer.rotate(roll, resample=Image.BILINEAR, center=(cx, cy))
    img.paste(layer, (0, 0), layer)
    head = _head_alpha(box, p, pose, sided).rotate(roll, resample=Image.BILINEAR, center=(cx, cy)) if mask else None
    if r.random() < 0.12:  # something in front of the lower face
        d = ImageDraw.Draw(img)
        x0 = cx + r.choice([-1, 1]) * r.uniform(0.1, 0.3) * scale
        y0 = cy + r.uniform(0.12, 0.3) * scale
        d.rectangle([x0 - 0.08 * scale, y0, x0 + 0.08 * scale, s], fill=_random_rgb(r))
        if head is not None:  # the object hides that part of the head
            ImageDraw.Draw(head).rectangle([x0 - 0.08 * scale, y0, x0 + 0.08 * scale, s], fill=0)
    if r.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(float(r.uniform(0.6, 1.3))))
    arr = np.asarray(img, dtype=np.float32)
    # light: a colour cast (warm .. cool, a green or magenta tint), an overall level, and a direction
    warm, tint = r.uniform(-1, 1), r.uniform(-1, 1)
    cast = np.array([1 + 0.22 * warm, 1 + 0.1 * tint, 1 - 0.22 * warm], dtype=np.float32) * r.uniform(0.65, 1.25)
    angle, strength = r.uniform(0, 2 * np.pi), r.uniform(0, 0.45)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) * 2 - 1
    field = 1 + strength * (xx * np.cos(angle) + yy * np.sin(angle))
    arr = arr * cast[None, None, :] * field[..., None]
    arr += r.normal(0, r.uniform(0, 6), arr.shape).astype(np.float32)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    if size != s:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BOX))
    return arr, (None if head is None else _reduce_mask(head, size))


def render_batch(params: list[FaceParams], view_seeds: list[int], size: int = 32, style: str = "plain",
                 with_masks: bool = False):
    """Images as float32 (N, 3, size, size) in [-1, 1] (the diffusion model's pixel space); ``with_masks``: (images,
    their head masks float32 (N, 1, size, size), :func:`head_mask`), each photo drawn once for both."""
    drawn = [_render(p, v, size, style, mask=with_masks) for p, v in zip(params, view_seeds)]
    images = np.stack([d[0] for d in drawn]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    return (images, np.stack([d[1] for d in drawn])[:, None]) if with_masks else images


def mask_batch(params: list[FaceParams], view_seeds: list[int], size: int = 32, style: str = "plain") -> np.ndarray:
    """The head masks (:func:`head_mask`) of the photos :func:`render_batch` draws, float32 (N, 1, size, size)."""
    return np.stack([head_mask(p, v, size, style) for p, v in zip(params, view_seeds)])[:, None]
