"""A w2w space: PCA basis over LoRA weight vectors, with what sampling and editing need (paper §3).

Weights of a model with coefficients β (k,) are ``w = (β @ components[:k]) * std + mean`` (the basis is a PCA of
the standardised weights), then ``ΔW = alpha/rank · B @ A`` per module (see :mod:`w2w.layout`).

Two on-disk forms load the same way (:func:`load_space`): a directory of the released files (``V.pt`` ...), and
our single ``.safetensors`` file (:func:`save_space`; :func:`w2w.convert.convert_release` writes one from the
released files). See README "Space format".
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .layout import Layout, LayoutError
from .rawread import read_columns_t, read_rows, safetensors_span, torch_file_span
from .safeload import W2WFileError, load_dataframe, load_object, load_tensor
from .stfile import TensorSource, write_safetensors

__all__ = ["Space", "Direction", "load_space", "save_space", "space_fingerprint", "RELEASE_FILES", "FORMAT",
           "FORMAT_VERSION", "RELEASED_ATTRIBUTES", "labels_from_dataframe", "coefficient_covariance"]

FORMAT = "w2w-space"
FORMAT_VERSION = 1
RELEASE_FILES = ("V.pt", "mean.pt", "std.pt", "weight_dimensions.pt")
OPTIONAL_RELEASE_FILES = ("proj_1000pc.pt", "pinverse_1000pc.pt", "identity_df.pt", "adapter_config.json")
FINGERPRINT_PCS = 8  # leading PCs that enter the fingerprint
_CHUNK = 256  # rows of a half-precision basis converted to float32 at a time (~100 MB)

# The 33 CelebA attributes labelled in the released space's identity_df.pt (REFERENCE: "Attributes exposed").
RELEASED_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee",
    "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face",
    "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Straight_Hair", "Wavy_Hair",
    "Wearing_Lipstick", "Young",
)


@dataclass(frozen=True, eq=False)
class Direction:
    """A linear edit direction in coefficient space (paper §3.3), with the training spread along it."""

    name: str
    vector: torch.Tensor  # (k,) float32, as fitted (least squares: pinverse @ labels)
    spread: float  # std over training models of their coefficients projected on vector / |vector|
    method: str = "lstsq"
    debias: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.vector.dim() != 1 or not torch.isfinite(self.vector).all() or float(self.vector.norm()) == 0.0:
            raise ValueError(f"direction {self.name!r} must be a finite, non-zero 1-D vector")
        if not math.isfinite(self.spread) or self.spread <= 0:
            raise ValueError(f"direction {self.name!r}: spread must be positive, got {self.spread}")

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def raw_multiplier(self, strength: float) -> float:
        """The reference code's multiplier (β + raw · vector) equal to our ``strength`` (β + strength · spread · unit)."""
        return strength * self.spread / float(self.vector.norm())


def space_fingerprint(layout: Layout, mean: torch.Tensor, std: torch.Tensor, first_components: torch.Tensor) -> str:
    """Stable id of a space: the same for its released files and any conversion of them (fp32 or fp16, any pcs)."""
    h = hashlib.sha256()
    h.update(layout.to_json().encode())
    h.update(mean.detach().float().contiguous().numpy().tobytes())
    h.update(std.detach().float().contiguous().numpy().tobytes())
    h.update(first_components[:FINGERPRINT_PCS].detach().half().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Space:
    """A loaded w2w space. Tensors are CPU; ``components`` may be float16 (math is always float32)."""

    components: torch.Tensor  # (m, d) principal components as rows (= released V[:, :m].T)
    mean: torch.Tensor  # (d,) float32
    std: torch.Tensor  # (d,) float32
    layout: Layout
    coef_mean: torch.Tensor | None = None  # (k,) mean of training coefficients, for sampling
    coef_std: torch.Tensor | None = None  # (k,)
    train_coefs: torch.Tensor | None = None  # (N, k) coefficients of the training models
    coef_cov: torch.Tensor | None = None  # (k, k) covariance of training coefficients (spread of any direction)
    labels: torch.Tensor | None = None  # (N, A) attribute labels of the training models
    attribute_names: tuple[str, ...] = ()
    train_names: tuple[str, ...] = ()
    directions: Mapping[str, Direction] = field(default_factory=dict)  # fitted/cached directions
    pinverse: torch.Tensor | None = None  # (k, N) released pseudo-inverse of train_coefs
    base_model: str = "SD1.5"
    source: str = ""
    total_pcs: int = 0  # PCs in the file it came from (>= pcs)
    fingerprint: str = ""
    # Derived values (fitted directions, least-squares solutions), computed once per Space object. Not an init
    # field: dataclasses.replace gives the copy an empty cache, since its labels or coefficients may differ.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m, d = self.components.shape if self.components.dim() == 2 else (0, 0)
        if self.components.dim() != 2 or m < 1:
            raise W2WFileError(f"space basis must be a non-empty (pcs, d) matrix, got shape {tuple(self.components.shape)}")
        if d != self.layout.dim:
            raise LayoutError(f"space basis has {d:,} weights per PC but its layout needs {self.layout.dim:,}")
        for name, t in (("mean", self.mean), ("std", self.std)):
            if tuple(t.shape) != (d,):
                raise W2WFileError(f"space {name} has shape {tuple(t.shape)}, expected ({d},)")
            if not torch.isfinite(t).all():
                raise W2WFileError(f"space {name} contains NaN or Inf")
        if not _all_finite(self.components):
            raise W2WFileError("space basis contains NaN or Inf")
        if (self.coef_mean is None) != (self.coef_std is None):
            raise W2WFileError("space has coefficient mean without std (or the reverse)")
        if self.coef_mean is not None:
            if self.coef_mean.shape != self.coef_std.shape or self.coef_mean.dim() != 1:
                raise W2WFileError("sampling statistics must be two vectors of equal length")
            if not (torch.isfinite(self.coef_mean).all() and torch.isfinite(self.coef_std).all()):
                raise W2WFileError("sampling statistics contain NaN or Inf")
        if self.train_coefs is not None:
            if self.train_coefs.dim() != 2:
                raise W2WFileError(f"training coefficients must be (N, k), got {tuple(self.train_coefs.shape)}")
            if not torch.isfinite(self.train_coefs).all():
                raise W2WFileError("training coefficients contain NaN or Inf")
            if self.labels is not None and self.labels.shape[0] != self.train_coefs.shape[0]:
                raise W2WFileError(f"{self.labels.shape[0]} label rows for {self.train_coefs.shape[0]} training models")
        if self.coef_cov is not None and (self.coef_cov.dim() != 2 or self.coef_cov.shape[0] != self.coef_cov.shape[1]
                                          or not torch.isfinite(self.coef_cov).all()):
            raise W2WFileError(f"coefficient covariance must be a finite square matrix, got {tuple(self.coef_cov.shape)}")
        if self.labels is not None and (self.labels.dim() != 2 or not torch.isfinite(self.labels).all()):
            raise W2WFileError(f"attribute labels must be a finite (N, A) matrix, got shape {tuple(self.labels.shape)}"
                               + ("" if self.labels.dim() != 2 else " with NaN or Inf"))
        if self.pinverse is not None and not torch.isfinite(self.pinverse).all():
            raise W2WFileError("the training coefficients' pseudo-inverse contains NaN or Inf")
        if self.labels is not None and self.labels.shape[1] != len(self.attribute_names):
            raise W2WFileError(f"{self.labels.shape[1]} label columns for {len(self.attribute_names)} attribute names")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", space_fingerprint(self.layout, self.mean, self.std, self.components))
        if self.total_pcs < m:
            object.__setattr__(self, "total_pcs", m)

    def cached(self, key, compute: Callable[[], object]):
        """``compute()`` once per space and ``key``; later calls return the stored value."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # ---- sizes -----------------------------------------------------------------------------------------
    @property
    def pcs(self) -> int:
        return self.components.shape[0]

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    @property
    def has_training(self) -> bool:
        return self.train_coefs is not None

    @property
    def attributes(self) -> tuple[str, ...]:
        """Names usable as edit directions: cached directions and, with training data, every label column."""
        names = list(self.directions)
        if self.labels is not None and (self.train_coefs is not None or self.pinverse is not None):
            names += [a for a in self.attribute_names if a not in self.directions]
        return tuple(names)

    # ---- reconstruction --------------------------------------------------------------------------------
    def check_coefficients(self, coefs: torch.Tensor) -> torch.Tensor:
        coefs = torch.as_tensor(coefs).detach().to("cpu", torch.float32)
        if coefs.dim() < 1 or coefs.shape[-1] < 1:
            raise ValueError("coefficients must have at least one value")
        if coefs.shape[-1] > self.pcs:
            raise ValueError(f"{coefs.shape[-1]:,} coefficients but the space is loaded with {self.pcs:,} PCs: "
                             f"load the space with pcs >= {coefs.shape[-1]:,} (the file has {self.total_pcs:,})")
        if not torch.isfinite(coefs).all():
            raise ValueError("coefficients contain NaN or Inf")
        return coefs

    def standardized(self, coefs: torch.Tensor) -> torch.Tensor:
        """β (..., k) -> standardised weights β @ components[:k], float32 (chunked when the basis is half precision)."""
        coefs = self.check_coefficients(coefs)
        k = coefs.shape[-1]
        if self.components.dtype == torch.float32:
            return coefs @ self.components[:k]
        out = torch.zeros(*coefs.shape[:-1], self.dim, dtype=torch.float32)
        for start in range(0, k, _CHUNK):
            stop = min(k, start + _CHUNK)
            out += coefs[..., start:stop] @ self.components[start:stop].float()
        return out

    def weights(self, coefs: torch.Tensor) -> torch.Tensor:
        """β (..., k) -> flat LoRA weight vectors (..., d), float32: (β @ V[:, :k].T) * std + mean."""
        return self.standardized(coefs) * self.std + self.mean

    def deltas(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        """β (..., k) -> {module: ΔW (..., out, in)} float32."""
        return self.layout.deltas(self.weights(coefs))

    def project(self, weights: torch.Tensor, pcs: int | None = None) -> torch.Tensor:
        """Flat weight vectors (..., d) -> coefficients (..., pcs): the closest point of the space (paper §3.4 'projection')."""
        weights = torch.as_tensor(weights).detach().float()
        if weights.shape[-1] != self.dim:
            raise LayoutError(f"weights have {weights.shape[-1]:,} values; this space needs {self.dim:,}")
        k = self.pcs if pcs is None else pcs
        z = (weights - self.mean) / torch.where(self.std == 0, torch.ones_like(self.std), self.std)
        if self.components.dtype == torch.float32:
            return z @ self.components[:k].T
        return torch.cat([z @ self.components[s:min(k, s + _CHUNK)].float().T for s in range(0, k, _CHUNK)], dim=-1)

    def describe(self) -> dict:
        """A JSON-friendly summary (used by `w2w info` and the UI)."""
        return {
            "fingerprint": self.fingerprint, "base_model": self.base_model, "pcs": self.pcs, "total_pcs": self.total_pcs,
            "dim": self.dim, "modules": len(self.layout.modules), "rank": self.layout.rank, "alpha": self.layout.alpha,
            "basis_dtype": str(self.components.dtype).replace("torch.", ""),
            "sampling_pcs": 0 if self.coef_mean is None else int(self.coef_mean.shape[0]),
            "training_models": 0 if self.train_coefs is None else int(self.train_coefs.shape[0]),
            "attributes": list(self.attributes), "source": self.source,
        }


def _all_finite(t: torch.Tensor, rows: int = 64) -> bool:
    """NaN/Inf check. NaN and Inf propagate through a sum, so a finite sum (one fast pass) proves every value finite;
    only if the sum is not finite (NaN/Inf, or an overflow) are the values checked in small blocks."""
    if bool(torch.isfinite(t.sum())):
        return True
    return all(bool(torch.isfinite(t[s:s + rows]).all()) for s in range(0, t.shape[0], rows))


# ---- loading ---------------------------------------------------------------------------------------------
def load_space(path: str, pcs: int | None = None, *, training: bool = True,
               progress: Callable[[int, int], None] | None = None) -> Space:
    """Load a space from a released-files directory or our ``.safetensors`` file, holding only ``pcs`` PCs.

    ``pcs=None`` keeps every PC in the file. ``training=False`` skips training coefficients and labels.
    ``progress(done, total)`` follows the read of the basis, the long part (it may raise to stop the load).
    """
    if pcs is not None and (not isinstance(pcs, int) or pcs < 1):
        raise PcsError(f"pcs must be a positive integer or None, got {pcs!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_release_dir(path, pcs, training, progress)
    if not os.path.exists(path):
        raise W2WFileError(f"space not found: {path}. Put our .safetensors space or a folder of the released files "
                           "(V.pt, mean.pt, std.pt, weight_dimensions.pt) there; `python -m w2w download` fetches them.")
    if path.endswith(".safetensors"):
        return _load_ours(path, pcs, training, progress)
    raise W2WFileError(f"{path}: a space is a .safetensors file or a folder of released files")


class PcsError(ValueError):
    """A request for more principal components than a space holds (or fewer than one): the caller's choice, not a
    fault of the file."""


def _pcs_to_keep(pcs: int | None, available: int, where: str) -> int:
    if pcs is None:
        return available
    if pcs > available:
        raise PcsError(f"asked for {pcs:,} PCs but {where} has {available:,}: lower pcs to at most {available:,}")
    return pcs


def check_release_folder(folder: str) -> None:
    """W2WFileError naming the missing files and where they come from, unless ``folder`` holds the released files."""
    missing = [f for f in RELEASE_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise W2WFileError(f"the w2w space folder {folder} lacks {', '.join(missing)}. Download the released files "
                           "(Hugging Face snap-research/weights2weights, folder files/) into it, or run "
                           "`python -m w2w download`.")


def _load_release_dir(folder: str, pcs: int | None, training: bool, progress=None) -> Space:
    check_release_folder(folder)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    alpha = _release_alpha(p("adapter_config.json"))
    dims = load_object(p("weight_dimensions.pt"), mmap=False)
    layout = Layout.from_weight_dimensions(dims, alpha=alpha[0])
    if alpha[1] is not None and alpha[1] != layout.rank:
        raise LayoutError(f"adapter_config.json says r={alpha[1]} but weight_dimensions has rank {layout.rank}")
    d = layout.dim
    mean = load_tensor(p("mean.pt"), ndim=1, name="mean").float().clone()
    std = load_tensor(p("std.pt"), ndim=1, name="std").float().clone()
    span = torch_file_span(p("V.pt"), "V")  # (d, M); read with plain sequential reads, never memory-mapped
    for name, t, expect in (("mean.pt", mean, (d,)), ("std.pt", std, (d,))):
        if tuple(t.shape) != expect:
            raise LayoutError(f"{p(name)} has shape {tuple(t.shape)}; weight_dimensions needs {expect}")
    if span.shape[0] != d:
        raise LayoutError(f"{p('V.pt')} has {span.shape[0]:,} rows; weight_dimensions adds up to {d:,}")
    m = _pcs_to_keep(pcs, span.shape[1], p("V.pt"))
    head_pcs = min(FINGERPRINT_PCS, span.shape[1])
    components = read_columns_t(span, max(m, head_pcs), torch.float32, progress)  # (m, d): one pass over the file
    fingerprint = space_fingerprint(layout, mean, std, components[:head_pcs])
    components = components[:m]
    kw: dict = {}
    if training:
        kw = release_training_data(folder, m)
    try:
        return Space(components, mean, std, layout, total_pcs=span.shape[1], source=f"released files: {folder}",
                     fingerprint=fingerprint, **kw)
    except W2WFileError as exc:
        raise W2WFileError(f"{folder}: {exc}") from None


def _release_alpha(config_path: str) -> tuple[float, int | None]:
    if not os.path.isfile(config_path):
        return 27.0, None
    try:
        with open(config_path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise TypeError(f"a JSON object is needed, it holds a {type(cfg).__name__}")
        alpha, rank = float(cfg.get("lora_alpha", 27.0)), (int(cfg["r"]) if "r" in cfg else None)
        if not math.isfinite(alpha) or alpha <= 0 or (rank is not None and rank < 1):
            raise ValueError(f"lora_alpha {alpha} and r {rank} must be positive and finite")
        return alpha, rank
    except (ValueError, TypeError, OSError, OverflowError) as exc:
        raise W2WFileError(f"{config_path} is not a valid PEFT adapter config ({exc}): use the released "
                           "adapter_config.json as downloaded, or remove it (the released values, alpha 27, apply)") from None


def release_training_data(folder: str, m: int) -> dict:
    """The Space fields a released folder's optional files give (coefficients over ``m`` PCs, statistics, labels)."""
    out: dict = {}
    proj_path = os.path.join(folder, "proj_1000pc.pt")
    if os.path.isfile(proj_path):
        proj = load_tensor(proj_path, ndim=2, name="proj_1000pc")
        k = min(m, proj.shape[1])
        train = proj[:, :k].float().clone()
        if not torch.isfinite(train).all():
            raise W2WFileError(f"{proj_path} contains NaN or Inf")
        out.update(train_coefs=train, coef_mean=train.mean(0), coef_std=train.std(0), coef_cov=coefficient_covariance(train))
        pinv_path = os.path.join(folder, "pinverse_1000pc.pt")
        if os.path.isfile(pinv_path) and k == proj.shape[1]:
            pinv = load_tensor(pinv_path, ndim=2, name="pinverse_1000pc")
            if tuple(pinv.shape) != (proj.shape[1], proj.shape[0]):
                raise W2WFileError(f"{pinv_path} has shape {tuple(pinv.shape)}; expected {(proj.shape[1], proj.shape[0])}")
            out["pinverse"] = pinv.float().clone()
    df_path = os.path.join(folder, "identity_df.pt")
    if os.path.isfile(df_path):
        names, labels, attrs = labels_from_dataframe(load_dataframe(df_path), df_path)
        if "train_coefs" in out and labels.shape[0] != out["train_coefs"].shape[0]:
            raise W2WFileError(f"{df_path} has {labels.shape[0]} rows but proj_1000pc.pt has {out['train_coefs'].shape[0]}")
        out.update(labels=labels, attribute_names=attrs, train_names=names)
    return out


def coefficient_covariance(train: torch.Tensor) -> torch.Tensor:
    """(k, k) unbiased covariance of training coefficients (N, k), accumulated in float64."""
    x = train.double()
    x = x - x.mean(0)
    return (x.T @ x / max(1, x.shape[0] - 1)).float()


def labels_from_dataframe(df, where: str) -> tuple[tuple[str, ...], torch.Tensor, tuple[str, ...]]:
    """(row names, (N, A) float32 labels of the numeric/boolean columns, column names) of a label table."""
    import numpy as np

    numeric = [c for c in df.columns if np.issubdtype(np.asarray(df[c]).dtype, np.number) or df[c].dtype == bool]
    if not numeric:
        raise W2WFileError(f"{where} has no numeric attribute columns")
    values = np.asarray(df[numeric], dtype=np.float32)
    if not np.isfinite(values).all():
        raise W2WFileError(f"{where}: attribute labels contain NaN or Inf")
    names = df["file"] if "file" in df.columns else df.index
    return tuple(str(n) for n in names), torch.from_numpy(values.copy()), tuple(str(c) for c in numeric)


def _meta_json(meta: dict, key: str, path: str, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise W2WFileError(f"{path}: metadata lacks {key!r}; was it written by `python -m w2w convert`?")
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise W2WFileError(f"{path}: metadata {key!r} is not valid JSON: {exc}") from None


def _load_ours(path: str, pcs: int | None, training: bool, progress=None) -> Space:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise W2WFileError(f"{path} is a .safetensors file but not a w2w space (format={meta.get('format')!r}); "
                                   "a LoRA is loaded with LoraLoader, an identity with Load Identity")
            version = int(meta.get("format_version", "0"))
            if version > FORMAT_VERSION:
                raise W2WFileError(f"{path} uses space format {version}; this version of w2w reads up to "
                                   f"{FORMAT_VERSION}: update the node pack")
            layout = Layout.from_json(meta.get("layout", ""))
            keys = set(f.keys())
            for required in ("components", "mean", "std"):
                if required not in keys:
                    raise W2WFileError(f"{path} lacks the tensor {required!r}")
            span = safetensors_span(path, "components")  # plain reads of the first rows, no memory map
            total = span.shape[0]
            m = _pcs_to_keep(pcs, total, path)
            components = read_rows(span, max(m, min(total, FINGERPRINT_PCS)), progress)
            head = components[:min(total, FINGERPRINT_PCS)]
            components = components[:m]
            kw: dict = {"mean": f.get_tensor("mean").float(), "std": f.get_tensor("std").float()}
            if "coef_mean" in keys:
                kw["coef_mean"] = f.get_tensor("coef_mean").float()
                kw["coef_std"] = f.get_tensor("coef_std").float()
            if "coef_cov" in keys:
                kw["coef_cov"] = f.get_tensor("coef_cov").float()
            attrs = tuple(_meta_json(meta, "attributes", path, []))
            if training and "train_coefs" in keys:
                kw["train_coefs"] = f.get_tensor("train_coefs").float()
                kw["train_names"] = tuple(_meta_json(meta, "train_names", path, []))
            if training and "labels" in keys:
                kw["labels"] = f.get_tensor("labels").float()
                kw["attribute_names"] = attrs
            dirs = {}
            for name, info in _meta_json(meta, "directions", path, {}).items():
                try:
                    dirs[name] = Direction(name, f.get_tensor(f"direction.{name}").float(), float(info["spread"]),
                                           str(info.get("method", "lstsq")), tuple(info.get("debias", ())))
                except ValueError as exc:
                    raise W2WFileError(f"{path}: {exc}") from None
    except SafetensorError as exc:
        raise W2WFileError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {exc}") from None
    except OSError as exc:
        raise W2WFileError(f"{path} could not be read: {exc}") from None
    except (W2WFileError, PcsError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # metadata or tensors of a wrong kind
        raise W2WFileError(f"{path}: malformed w2w space file ({type(exc).__name__}: {exc}); it was not written by "
                           "this pack or was edited: convert the space again with `python -m w2w convert`") from None
    fingerprint = space_fingerprint(layout, kw["mean"], kw["std"], head)
    stored = meta.get("fingerprint")
    if stored and total < FINGERPRINT_PCS:
        fingerprint = stored  # fewer PCs than the fingerprint covers: the source's fingerprint was recorded
    elif stored and stored != fingerprint:
        raise W2WFileError(f"{path}: content does not match its recorded fingerprint {stored} (file damaged or edited)")
    try:
        return Space(components, layout=layout, directions=dirs, base_model=meta.get("base_model", "SD1.5"),
                     source=f"w2w space file: {path}", total_pcs=total, fingerprint=fingerprint, **kw)
    except (ValueError, IndexError, TypeError) as exc:  # W2WFileError and LayoutError are ValueErrors
        raise W2WFileError(f"{path}: {exc}; convert the space again with `python -m w2w convert`") from None


# ---- writing ---------------------------------------------------------------------------------------------
def _metadata(space_like: dict) -> dict[str, str]:
    return {k: (v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))) for k, v in space_like.items()}


_PATH_SOURCES = ("w2w space file: ", "released files: ")


def portable_source(source: str) -> str:
    """What a written file records as its source: a space loaded from a file or a released folder names it by its
    base name only, so a file's provenance never carries the folder it happened to be read from."""
    for prefix in _PATH_SOURCES:
        if source.startswith(prefix):
            return prefix + os.path.basename(os.path.normpath(source[len(prefix):]))
    return source


def save_space(space: Space, path: str, *, dtype: torch.dtype = torch.float32, training: bool = True,
               components: TensorSource | None = None, extra_metadata: dict | None = None) -> None:
    """Write ``space`` in our single-file format (atomically). ``components`` may stream a larger basis."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"basis dtype must be float32 or float16, got {dtype}")
    if components is None:
        comp = space.components
        components = TensorSource(dtype, tuple(comp.shape), lambda: (comp[s:s + _CHUNK] for s in range(0, comp.shape[0], _CHUNK)))
    tensors: dict = {"components": components, "mean": space.mean.float(), "std": space.std.float()}
    if space.coef_mean is not None:
        tensors.update(coef_mean=space.coef_mean.float(), coef_std=space.coef_std.float())
    if space.coef_cov is not None:
        tensors["coef_cov"] = space.coef_cov.float()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "base_model": space.base_model,
            "layout": space.layout.to_json(), "fingerprint": space.fingerprint, "source": portable_source(space.source),
            "attributes": list(space.attribute_names)}
    if training and space.train_coefs is not None:
        tensors["train_coefs"] = space.train_coefs.float()
        meta["train_names"] = list(space.train_names)
    if training and space.labels is not None:
        tensors["labels"] = space.labels.float()
    dirs = {}
    for name, direction in space.directions.items():
        tensors[f"direction.{name}"] = direction.vector.float()
        dirs[name] = {"spread": direction.spread, "method": direction.method, "debias": list(direction.debias)}
    meta["directions"] = dirs
    meta.update(extra_metadata or {})
    write_safetensors(path, tensors, _metadata(meta))
