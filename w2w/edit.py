"""Edit directions (paper §3.3): linear directions in coefficient space fitted to training-model attribute labels.

Strength is in units of the training set's spread: ``β' = β + strength · spread · unit(direction)``, where
``spread`` is the standard deviation of the training models' coefficients projected on the unit direction. So
strength 1.0 moves an identity by one standard deviation of how the training identities differ along that
attribute. The reference code instead adds ``raw · direction`` with raw multipliers such as 5e5-2e6; the two agree
when ``raw = strength · spread / |direction|`` (:meth:`Direction.raw_multiplier`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch

from .identity import Identity
from .space import Direction, Space

__all__ = ["fit_directions", "get_direction", "apply_edit", "blend", "nearest_training", "METHODS", "pad_to"]

METHODS = ("lstsq", "logistic")


def pad_to(coefs: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad (or keep) a coefficient vector to length ``k`` (missing PCs are 0 = the mean model)."""
    if coefs.shape[-1] >= k:
        return coefs.clone()
    return torch.cat([coefs, coefs.new_zeros(*coefs.shape[:-1], k - coefs.shape[-1])], dim=-1)


def _require_training(space: Space, what: str) -> None:
    """Fitting needs labels and training coefficients (or the released pseudo-inverse)."""
    if space.labels is None or (space.train_coefs is None and space.pinverse is None):
        cached = ", ".join(space.directions) or "none"
        if space.labels is None and space.train_coefs is not None:  # a space we built, without labels
            raise ValueError(f"{what} needs attribute labels of the training models, which this space lacks (cached "
                             f"directions: {cached}). Fit directions from a labels CSV with `python -m w2w "
                             "fit-directions SPACE labels.csv`, or build with --labels.")
        raise ValueError(f"{what} needs the training models' coefficients and labels, which this space lacks "
                         f"(cached directions: {cached}). Use the released files with proj_1000pc.pt and "
                         "identity_df.pt, or a space converted with training data.")


def _label_column(space: Space, name: str) -> torch.Tensor:
    if name not in space.attribute_names:
        known = ", ".join(space.attribute_names[:12])
        raise ValueError(f"attribute {name!r} is not in this space (it has: {known}{'...' if len(space.attribute_names) > 12 else ''})")
    return space.labels[:, space.attribute_names.index(name)]


def _raw_direction(space: Space, name: str, method: str) -> torch.Tensor:
    """The fitted (not debiased) direction of ``name``: a stored one, or fitted once per space."""
    stored = space.directions.get(name)
    if stored is not None and method == stored.method and not stored.debias:
        return stored.vector
    return space.cached(("raw", name, method), lambda: _fit_raw(space, name, method))


def _fit_raw(space: Space, name: str, method: str) -> torch.Tensor:
    _require_training(space, f"the direction {name!r}")
    y = _label_column(space, name)
    if bool((y == y[0]).all()):  # least squares would fit the noise of the coefficients, logistic nothing at all
        raise ValueError(f"attribute {name!r} has the same label ({float(y[0]):g}) for every training model; a "
                         "direction needs models on both sides: fix the labels or leave the column out (--only)")
    if method == "lstsq":
        return space.cached("lstsq_all", lambda: _lstsq_all(space))[:, space.attribute_names.index(name)]
    if method == "logistic":
        return _logistic(space, y, name)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def _lstsq_all(space: Space) -> torch.Tensor:
    """Least-squares directions for every attribute at once: pinverse @ labels, (k, A)."""
    if space.pinverse is not None:
        sol = space.pinverse.double() @ space.labels.double()
    else:
        x = space.train_coefs.double()
        sol = torch.linalg.lstsq(x, space.labels.double(), driver="gelsd").solution
    return sol.float()


def _logistic(space: Space, y: torch.Tensor, name: str) -> torch.Tensor:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise ImportError("logistic directions need scikit-learn: pip install scikit-learn") from exc
    if space.train_coefs is None:
        raise ValueError("logistic directions need training coefficients (proj_1000pc.pt)")
    target = (y > (y.min() + y.max()) / 2).numpy()
    if target.all() or not target.any():
        raise ValueError(f"attribute {name!r} has a single label value; no direction can be fitted")
    model = LogisticRegression(max_iter=2000).fit(space.train_coefs.double().numpy(), target)
    return torch.from_numpy(model.coef_[0]).float()


def _spread(space: Space, unit: torch.Tensor) -> float:
    """Std of the training coefficients projected on ``unit``: sqrt(uᵀ Σ u), or directly from the coefficients."""
    if space.coef_cov is not None:
        k = min(unit.shape[0], space.coef_cov.shape[0])
        u = unit[:k].double()
        return float((u @ space.coef_cov[:k, :k].double() @ u).clamp_min(0).sqrt())
    if space.train_coefs is None:
        raise ValueError("the spread of a direction needs training coefficients or their covariance")
    k = min(unit.shape[0], space.train_coefs.shape[1])
    return float((space.train_coefs[:, :k] @ unit[:k]).std())


def get_direction(space: Space, name: str, debias: Sequence[str] = (), method: str = "lstsq") -> Direction:
    """The direction for attribute ``name``, minus (one after another) its projection on each ``debias`` attribute."""
    debias = tuple(d for d in debias if d and d != name)
    cached = space.directions.get(name)
    if cached is not None and cached.debias == debias and cached.method == method:
        return cached
    return space.cached(("dir", name, debias, method), lambda: _debiased(space, name, debias, method))


def _debiased(space: Space, name: str, debias: tuple[str, ...], method: str) -> Direction:
    vec = _raw_direction(space, name, method).clone()
    for other in debias:
        e = _raw_direction(space, other, method)
        k = min(vec.shape[0], e.shape[0])
        vec[:k] -= (vec[:k] @ e[:k]) / (e[:k] @ e[:k]) * e[:k]
    return Direction(name, vec, _spread(space, vec / vec.norm()), method, debias)


def fit_directions(space: Space, names: Iterable[str] | None = None, *, method: str = "lstsq",
                   debias: dict[str, Sequence[str]] | None = None) -> Space:
    """A copy of ``space`` with directions for ``names`` (default: every label column) cached in it."""
    _require_training(space, "fitting directions")
    debias = debias or {}
    names = list(space.attribute_names if names is None else names)
    dirs = dict(space.directions)
    for name in names:
        dirs[name] = get_direction(space, name, debias.get(name, ()), method)
    return dataclasses.replace(space, directions=dirs)


def apply_edit(space: Space, identity: Identity, name: str, strength: float, debias: Sequence[str] = (),
               method: str = "lstsq") -> Identity:
    """β' = β + strength · spread · unit direction (strength in training-spread units; see module docstring)."""
    identity.check_space(space)
    direction = get_direction(space, name, debias, method)
    k = max(identity.pcs, direction.vector.shape[0])
    if k > space.pcs:
        raise ValueError(f"the direction {name!r} spans {direction.vector.shape[0]:,} PCs but the space is loaded "
                         f"with {space.pcs:,}: raise pcs in Load w2w Space")
    coefs = pad_to(identity.coefficients, k) + strength * direction.spread * pad_to(direction.unit, k)
    label = f"edit {name} {strength:+g}" + (f" debias={','.join(direction.debias)}" if direction.debias else "")
    return identity.derive(coefs, label)


def blend(space: Space, a: Identity, b: Identity, t: float) -> Identity:
    """Linear interpolation (1 - t)·a + t·b of two identities of the same space (t outside [0, 1] extrapolates)."""
    a.check_space(space)
    b.check_space(space)
    k = max(a.pcs, b.pcs)
    coefs = (1.0 - t) * pad_to(a.coefficients, k) + t * pad_to(b.coefficients, k)
    name = f"{a.name or 'A'}~{b.name or 'B'}"
    return Identity(coefs, space.fingerprint, name, a.history + (f"blend t={t:g} with {b.name or 'B'}",))


def nearest_training(space: Space, identity: Identity, top: int = 1) -> list[tuple[int, str, float]]:
    """The training models closest to ``identity`` by cosine similarity of coefficients: (row, name, cosine)."""
    identity.check_space(space)
    if space.train_coefs is None:
        raise ValueError("nearest training identity needs training coefficients (proj_1000pc.pt)")
    k = min(identity.pcs, space.train_coefs.shape[1])
    sims = torch.nn.functional.cosine_similarity(space.train_coefs[:, :k], identity.coefficients[:k].unsqueeze(0), dim=1)
    values, rows = sims.topk(min(top, sims.shape[0]))
    names = space.train_names
    return [(int(r), names[int(r)] if int(r) < len(names) else str(int(r)), float(v)) for v, r in zip(values, rows)]
