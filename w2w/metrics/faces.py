"""Face detection (MTCNN) and face embeddings (FaceNet InceptionResnetV1, VGGFace2) from facenet-pytorch.

facenet-pytorch is imported only when a detector or an embedder is built. Its wheel pins torch<2.3, numpy<2 and
Pillow<10.3, so it is installed with ``pip install --no-deps``; the parts used here (the three MTCNN networks, the
``detect_face`` cascade and the ``InceptionResnetV1`` module) work with current torch, numpy and Pillow. Its
``MTCNN`` wrapper class is not used: batches where some images have a face and others do not break its box
selection under numpy 2, and it loads weights itself.

Weights are read only through :mod:`w2w.safeload` (``torch.load(weights_only=True)``). MTCNN's weights ship
inside the facenet-pytorch wheel; FaceNet's (``20180402-114759-vggface2.pt``) must be a local file: nothing
here downloads anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

__all__ = [
    "FACENET_FILENAME", "FACENET_URL", "FACENET_SIZE_TEXT", "FACENET_INSTALL",
    "FaceNetWeightsMissing", "DetectorConfig", "Face", "FaceDetector", "FaceEmbedder",
    "require_facenet", "torch_hub_checkpoints_dir", "find_facenet_weights", "to_uint8_images",
]

FACENET_FILENAME = "20180402-114759-vggface2.pt"
FACENET_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/" + FACENET_FILENAME
FACENET_SIZE_TEXT = "about 107 MiB"
FACENET_INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"
EMBEDDING_DIM = 512


class FaceNetWeightsMissing(FileNotFoundError):
    """The FaceNet VGGFace2 weights file is not where it was looked for."""


def require_facenet() -> SimpleNamespace:
    """Import the parts of facenet-pytorch used here, or raise an ImportError saying exactly what to install."""
    try:
        from facenet_pytorch.models import inception_resnet_v1, mtcnn
        from facenet_pytorch.models.utils import detect_face
    except ImportError as exc:
        raise ImportError(
            f"The ID score needs facenet-pytorch ({type(exc).__name__}: {exc}). Install it without its dependencies "
            f"so that torch, numpy and Pillow are left as they are: `{FACENET_INSTALL}` (its wheel pins torch<2.3, "
            "numpy<2 and Pillow<10.3; the parts used here work with current versions). It also imports tqdm: "
            "`pip install tqdm` if that is missing.") from exc
    return SimpleNamespace(
        PNet=mtcnn.PNet, RNet=mtcnn.RNet, ONet=mtcnn.ONet, detect_face=detect_face.detect_face,
        InceptionResnetV1=inception_resnet_v1.InceptionResnetV1,
        data_dir=os.path.join(os.path.dirname(os.path.abspath(mtcnn.__file__)), os.pardir, "data"),
    )


def torch_hub_checkpoints_dir() -> str:
    """``$TORCH_HOME/checkpoints`` (default ``~/.cache/torch/checkpoints``), where facenet-pytorch caches weights."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch")
    return os.path.join(os.path.expanduser(torch_home), "checkpoints")


def find_facenet_weights(path: str | None = None, search_dirs: tuple[str, ...] = ()) -> str:
    """Return the FaceNet weights file: ``path`` if given, else the first ``FACENET_FILENAME`` found in
    ``search_dirs`` then in TORCH_HOME's checkpoints. Raises :class:`FaceNetWeightsMissing` naming the file,
    its size, where to put it and where it comes from."""
    if path is not None:
        path = os.path.expanduser(str(path))
        if os.path.isfile(path):
            return path
        looked = [path]
    else:
        looked = [os.path.join(d, FACENET_FILENAME) for d in (*search_dirs, torch_hub_checkpoints_dir())]
        for candidate in looked:
            if os.path.isfile(candidate):
                return candidate
    raise FaceNetWeightsMissing(
        f"FaceNet weights not found; looked for: {', '.join(looked)}. The ID score needs {FACENET_FILENAME} "
        f"({FACENET_SIZE_TEXT}, FaceNet InceptionResnetV1 trained on VGGFace2, released by facenet-pytorch at "
        f"{FACENET_URL}). Nothing is downloaded automatically: download it yourself and put it in "
        f"ComfyUI/models/facenet/ (for the node) or in {torch_hub_checkpoints_dir()} (TORCH_HOME's cache, used by "
        "the node, the CLI and facenet-pytorch itself), or pass its path (`--weights PATH` on the command line).")


def to_uint8_images(images) -> list[np.ndarray]:
    """Images as a list of (H, W, 3) uint8 arrays.

    Accepts a ComfyUI IMAGE tensor (B, H, W, C) or one (H, W, C) with floats in [0, 1], uint8 arrays of the same
    shapes, PIL images, or a list of any of these. One channel is repeated, a fourth (alpha) is dropped.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    return [_one_uint8(item, index) for index, item in enumerate(items)]


def _one_uint8(image, index: int) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = (image.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        array = image.numpy()
    elif isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"image {index}: dtype {array.dtype} is not supported; give uint8 or floats in [0, 1]")
            array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:  # PIL image
        array = np.asarray(image.convert("RGB"))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {index}: shape {tuple(array.shape)} is not (H, W, C) with C in 1, 3 or 4")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


@dataclass(frozen=True)
class DetectorConfig:
    """MTCNN settings; the defaults are facenet-pytorch's ``MTCNN()`` defaults, as used for the paper's ID score.

    crop_size: side of the square face crop fed to FaceNet (pixels).
    margin: extra border around the detected box, in pixels of the crop.
    min_face_size: smallest face searched for (pixels of the input image).
    thresholds: score thresholds of the P-, R- and O-networks.
    factor: scale step of the image pyramid.
    """
    crop_size: int = 160
    margin: int = 0
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))  # hashable, as documented
        if not 80 <= self.crop_size <= 1024:
            raise ValueError(f"crop_size={self.crop_size}: FaceNet needs crops of 80 to 1024 pixels (default 160)")
        if not 0 <= self.margin < self.crop_size:
            raise ValueError(f"margin={self.margin} must be in [0, crop_size={self.crop_size}) (default 0)")
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size={self.min_face_size}: MTCNN cannot look for faces under 12 pixels")
        if len(self.thresholds) != 3 or not all(0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds={self.thresholds} must be three probabilities in (0, 1)")
        if not 0.1 <= self.factor < 1.0:
            raise ValueError(f"factor={self.factor} must be in [0.1, 1) (default 0.709)")


@dataclass(frozen=True)
class Face:
    """The face kept in one image: the largest one MTCNN found."""
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the input image
    probability: float
    crop: torch.Tensor  # (3, S, S) uint8, the square crop FaceNet sees


class FaceDetector:
    """MTCNN cascade with the weights shipped in the facenet-pytorch wheel."""

    def __init__(self, config: DetectorConfig = DetectorConfig(), device: str | torch.device = "cpu"):
        from ..safeload import load_object
        fn = require_facenet()
        self.config = config
        self._detect_face = fn.detect_face
        nets = []
        for cls, name in ((fn.PNet, "pnet.pt"), (fn.RNet, "rnet.pt"), (fn.ONet, "onet.pt")):
            net = cls(pretrained=False)
            net.load_state_dict(load_object(os.path.normpath(os.path.join(fn.data_dir, name)), mmap=False))
            nets.append(net.to(torch.device(device)).eval())
        self.pnet, self.rnet, self.onet = nets

    @property
    def device(self) -> torch.device:
        """Where the networks are now (a host's model management may have moved them)."""
        return next(self.pnet.parameters()).device

    def detect(self, images: list[np.ndarray], batch_size: int = 8) -> list[Face | None]:
        """The largest face in each (H, W, 3) uint8 image, or None where MTCNN finds none."""
        results: list[Face | None] = [None] * len(images)
        for chunk in _same_size_chunks(images, batch_size):
            usable = [i for i in chunk if min(images[i].shape[:2]) >= self.config.min_face_size]
            if not usable:
                continue  # smaller than the smallest face searched for: no face
            batch = torch.from_numpy(np.stack([images[i] for i in usable])).to(self.device)
            with torch.inference_mode():
                boxes, _points = self._detect_face(
                    batch, self.config.min_face_size, self.pnet, self.rnet, self.onet,
                    list(self.config.thresholds), self.config.factor, self.device)
            for i, found in zip(usable, boxes):
                results[i] = self._largest_face(images[i], np.asarray(found, dtype=np.float64).reshape(-1, 5))
        return results

    def _largest_face(self, image: np.ndarray, found: np.ndarray) -> Face | None:
        if len(found) == 0:
            return None
        areas = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])
        x1, y1, x2, y2, prob = (float(v) for v in found[int(np.argmax(areas))])
        return Face(box=(x1, y1, x2, y2), probability=prob, crop=crop_face(image, (x1, y1, x2, y2), self.config))


def crop_face(image: np.ndarray, box: tuple[float, float, float, float], config: DetectorConfig) -> torch.Tensor:
    """Square crop of ``box`` (plus margin) resized bilinearly to crop_size, as facenet-pytorch's extract_face."""
    from PIL import Image
    size = config.crop_size
    mx = config.margin * (box[2] - box[0]) / (size - config.margin)
    my = config.margin * (box[3] - box[1]) / (size - config.margin)
    h, w = image.shape[:2]
    left, top = int(max(box[0] - mx / 2, 0)), int(max(box[1] - my / 2, 0))
    right, bottom = int(min(box[2] + mx / 2, w)), int(min(box[3] + my / 2, h))
    face = Image.fromarray(image).crop((left, top, right, bottom)).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(face, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def _same_size_chunks(images: list[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices grouped into runs of equal-sized images, at most batch_size each (MTCNN batches need one size)."""
    chunks: list[list[int]] = []
    for i, image in enumerate(images):
        if chunks and len(chunks[-1]) < batch_size and images[chunks[-1][0]].shape == image.shape:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


class FaceEmbedder:
    """FaceNet InceptionResnetV1 loaded from a local state-dict file; unit-length 512-d embeddings."""

    def __init__(self, weights_path: str, device: str | torch.device = "cpu"):
        fn = require_facenet()
        self.weights_path = weights_path
        model = fn.InceptionResnetV1(pretrained=None, classify=False)
        model.load_state_dict(_facenet_state_dict(weights_path, model), strict=False)
        self.model = model.float().to(torch.device(device)).eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed(self, crops: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(N, 3, S, S) uint8 crops -> (N, 512) float32 unit vectors, on the CPU."""
        out = []
        with torch.inference_mode():
            for start in range(0, crops.shape[0], batch_size):
                x = crops[start:start + batch_size].to(self.device, torch.float32)
                x = (x - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
                out.append(torch.nn.functional.normalize(self.model(x).float(), dim=1).cpu())
        if not out:
            return torch.zeros(0, EMBEDDING_DIM)
        return torch.cat(out)


def _facenet_state_dict(path: str, model: torch.nn.Module) -> dict:
    """Read and check a FaceNet state dict; the classifier head (``logits.*``) of the released file is dropped."""
    from ..safeload import W2WFileError, load_object
    state = load_object(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise W2WFileError(f"{path} should hold a FaceNet state dict (names -> tensors), holds a {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise W2WFileError(
            f"{path} is not a FaceNet InceptionResnetV1 state dict ({FACENET_FILENAME} from {FACENET_URL}): "
            f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} of the wrong shape {wrong[:3]}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise W2WFileError(f"{path}: tensors {bad[:3]} hold NaN or infinite values; download the file again")
    return state
