"""VAE-w2w (w2w++): a variational autoencoder over w2w weight vectors or their PCA coefficients.

The w2w++ report replaced the PCA of w2w with an MLP VAE over the raw 99,648-value weight vectors and got posterior
collapse (0 of 512 latent units active). This module guards against it:

- the input can be the space's PCA coefficients (``input="coefs"``, whitened per PC: small and well conditioned) or
  the standardised weights themselves (``input="weights"``, as w2w++);
- the KL weight β is 0 for a warm-up, then ramps linearly to its final value (Bowman et al. 2016, "Generating
  sentences from a continuous space");
- free bits (Kingma et al. 2016, "Improved variational inference with inverse autoregressive flow"): each latent
  unit's batch-mean KL is floored at ``free_bits`` nats, so the optimiser gains nothing by closing a unit;
- active units (Burda et al. 2016: variance over data of the posterior mean > 0.01) are reported every epoch.

Data come from a space's training coefficients (in memory) or from a weights matrix on disk read in row blocks
(``.npy``, ``.safetensors`` or a torch file, memory-mapped), never loaded whole. Decoding gives an :class:`Identity`
of the space (coefficients tied to its fingerprint) or straight weight vectors. :class:`LatentParam` is the
"latent → coefficients" parametrisation inversion optimises (point latent or a Gaussian over it, with its prior term).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .identity import Identity, IdentityMismatch
from .safeload import W2WFileError, load_tensor
from .stfile import read_format_metadata, tensors_fingerprint, write_safetensors

__all__ = ["VAEConfig", "TrainConfig", "EpochStats", "TrainResult", "StopTraining", "W2WVAE", "WeightsMatrix",
           "train_vae", "save_vae", "load_vae", "decode_identity", "decode_weights", "encode_identity",
           "sample_latents", "interpolate", "active_units", "reconstruction_error", "pca_reconstruction_error",
           "LatentParam", "VAE_FORMAT", "INPUTS", "VAELatent", "describe_vae", "informative_units",
           "train_from_space", "heldout_rows", "chosen_stats"]

VAE_FORMAT = "w2w-vae"
INPUTS = ("coefs", "weights")
ACTIVE_THRESHOLD = 0.01  # variance over data of a unit's posterior mean above which it counts as active
INFORMATIVE_NATS = 0.5  # mean KL above which a unit counts as informative (stricter than active)
_LOGVAR_RANGE = (-14.0, 8.0)
_MONITOR_ROWS = 2048  # rows held in memory to measure active units and held-out error
_SMALL_MODEL = 2_000_000  # parameters below which training runs on one thread by default


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and input of a VAE (saved with it)."""

    input: str  # "coefs": PCA coefficients of a space; "weights": flat LoRA weight vectors
    input_dim: int  # coefficients (pcs) or weights (d) per example
    latent: int = 64  # latent units
    hidden: tuple[int, ...] = (512, 256)  # encoder widths; the decoder mirrors them
    space_fingerprint: str = ""  # space the coefficients (or the standardisation) belong to; "" = none

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}")
        sizes = (self.input_dim, self.latent, *(self.hidden if isinstance(self.hidden, (tuple, list)) else (None,)))
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in sizes):
            raise ValueError(f"input_dim, latent and hidden must be whole numbers, got {self.input_dim!r}, "
                             f"{self.latent!r} and {self.hidden!r}")
        object.__setattr__(self, "input_dim", int(self.input_dim))
        object.__setattr__(self, "latent", int(self.latent))
        if self.input_dim < 1 or self.latent < 1:
            raise ValueError(f"input_dim and latent must be positive, got {self.input_dim} and {self.latent}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")
        if self.input == "coefs" and not self.space_fingerprint:
            raise ValueError("a VAE over coefficients needs the fingerprint of their space (space_fingerprint)")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. β is 0 for ``warmup_epochs``, rises linearly over ``ramp_epochs``, then stays."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta: float = 1.0  # final KL weight (loss per example: squared error summed over inputs + β·KL)
    warmup_epochs: int = 5
    ramp_epochs: int = 10
    free_bits: float = 0.1  # nats per latent unit below which its KL is not penalised (0 = off)
    holdout: float = 0.1  # fraction of rows held out (never trained on) for held-out error
    seed: int = 0
    block_rows: int = 4096  # rows read from disk at a time when streaming
    grad_clip: float = 10.0
    threads: int = 0  # CPU threads while training; 0 = one for small models (much faster on a busy CPU), else torch's
    # keep the weights of the epoch with the lowest held-out error among those at the full KL weight (early
    # stopping on the rows held out; needs holdout > 0), instead of the last epoch's
    keep_best: bool = False


    def __post_init__(self) -> None:
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "beta": self.beta >= 0, "warmup_epochs": self.warmup_epochs >= 0, "ramp_epochs": self.ramp_epochs >= 0,
                  "free_bits": self.free_bits >= 0, "holdout": 0 <= self.holdout < 1, "block_rows": self.block_rows >= 1,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip > 0, "threads": self.threads >= 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training setting {bad[0]}={getattr(self, bad[0])!r}")
        if self.keep_best and not self.holdout:
            raise ValueError("keep_best chooses the epoch by its held-out error: set holdout > 0")
        if self.keep_best and self.warmup_epochs + self.ramp_epochs >= self.epochs:
            raise ValueError(f"keep_best chooses among the epochs at the full KL weight, but the KL weight is still "
                             f"rising after all {self.epochs} epochs (warm-up {self.warmup_epochs} + ramp "
                             f"{self.ramp_epochs}): train longer or shorten the warm-up")

    def beta_at(self, progress: float) -> float:
        """KL weight after ``progress`` epochs (fractional)."""
        if progress < self.warmup_epochs:
            return 0.0
        if self.ramp_epochs == 0:
            return self.beta
        return self.beta * min(1.0, (progress - self.warmup_epochs) / self.ramp_epochs)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did (passed to the callback as ``info`` and kept in :attr:`TrainResult.history`)."""

    epoch: int
    beta: float
    loss: float  # training loss per example (recon + β·KL with free bits)
    recon: float  # training squared error per example, normalised inputs
    kl: float  # training KL per example (nats, without free bits)
    active: int  # active latent units on the monitor rows
    heldout_error: float  # relative squared error of held-out rows (posterior mean decoded), input units; nan if none
    seconds: float
    informative: int = -1  # units carrying > INFORMATIVE_NATS nats (mean KL) on the monitor rows (-1: not measured)


@dataclass(frozen=True)
class TrainResult:
    vae: "W2WVAE"
    history: tuple[EpochStats, ...]
    stopped: bool  # True when the callback raised StopTraining
    chosen_epoch: int = 0  # the epoch whose weights :attr:`vae` holds (the last, or the best with keep_best)

    @property
    def final(self) -> EpochStats:
        return self.history[-1]

    @property
    def chosen(self) -> EpochStats:
        """The statistics of the epoch whose weights the VAE holds."""
        return self.history[self.chosen_epoch - 1] if self.chosen_epoch else self.history[-1]


@dataclass(frozen=True, eq=False)
class VAELatent:
    """A point of a VAE's latent space, tied to that VAE by fingerprint."""

    values: torch.Tensor  # (latent,) float32
    vae_fingerprint: str
    history: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        v = self.values
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() < 1 or not torch.isfinite(v).all():
            raise ValueError("a VAE latent must be a finite, non-empty 1-D tensor")
        object.__setattr__(self, "values", v.detach().to("cpu", torch.float32))
        if not self.vae_fingerprint:
            raise ValueError("a VAE latent needs the fingerprint of its VAE")

    def check_vae(self, vae: "W2WVAE") -> None:
        if vae.fingerprint != self.vae_fingerprint or vae.latent != self.values.shape[0]:
            raise ValueError(f"this latent belongs to VAE {self.vae_fingerprint}, not to the loaded VAE "
                             f"{vae.fingerprint}: encode or sample it with the same VAE")


class StopTraining(Exception):
    """Raise from a training callback to stop after the current step and keep the model trained so far."""


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class W2WVAE(nn.Module):
    """MLP VAE. Inputs are normalised by ``(x - shift) / scale`` (buffers) and decoded back to input units."""

    def __init__(self, config: VAEConfig, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        d, h = config.input_dim, config.hidden
        self.encoder = _mlp((d, *h, 2 * config.latent))  # -> (μ, log σ²)
        self.decoder = _mlp((config.latent, *reversed(h), d))
        self.register_buffer("shift", torch.zeros(d) if shift is None else shift.detach().float().clone())
        self.register_buffer("scale", torch.ones(d) if scale is None else scale.detach().float().clone())
        if self.shift.shape != (d,) or self.scale.shape != (d,):
            raise ValueError(f"shift and scale must have shape ({d},)")
        if self.shift.device.type != "meta":  # a model built on the meta device (shapes only) has no values
            self.check_values()

    def check_values(self) -> None:
        """ValueError unless the normalisation is finite with a positive scale and every weight is finite."""
        if not (torch.isfinite(self.shift).all() and torch.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise ValueError("normalisation must be finite with a positive scale")
        bad = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"weights {', '.join(bad[:3])} contain NaN or Inf")

    @property
    def latent(self) -> int:
        return self.config.latent

    @property
    def fingerprint(self) -> str:
        """Stable id of this trained VAE (config and weights), computed once."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            cached = self.__dict__["_fingerprint"] = tensors_fingerprint(
                self.state_dict(), prefix=json.dumps(asdict(self.config), sort_keys=True).encode())
        return cached

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def encode_normalised(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(xn).chunk(2, dim=-1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (..., input_dim) in input units -> posterior (μ, log σ²), each (..., latent)."""
        return self.encode_normalised(self.normalise(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (..., latent) -> inputs (..., input_dim) in input units (differentiable)."""
        return self.denormalise(self.decoder(z))

    def forward(self, xn: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised inputs and N(0, I) noise -> (normalised reconstruction, μ, log σ²)."""
        mu, logvar = self.encode_normalised(xn)
        z = mu + (0.5 * logvar).exp() * noise
        return self.decoder(z), mu, logvar


# ---- data ------------------------------------------------------------------------------------------------
class WeightsMatrix:
    """A (rows, d) float matrix on disk, read in row blocks without loading it whole.

    ``.npy`` and torch files (e.g. the released ``all_weights.pt``) are memory-mapped; ``.safetensors`` rows are
    sliced from tensor ``key`` (default: the only tensor). Blocks come back as float32 copies.
    """

    def __init__(self, path: str, key: str | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise W2WFileError(f"weights matrix not found: {self.path}")
        if self.path.endswith(".npy"):
            import numpy as np

            self._array = np.load(self.path, mmap_mode="r")
            self.shape = tuple(self._array.shape)
            self._read = lambda a, b: torch.from_numpy(self._array[a:b].astype("float32"))
        elif self.path.endswith(".safetensors"):
            from safetensors import safe_open

            self._file = safe_open(self.path, framework="pt")
            keys = list(self._file.keys())
            if key is None and len(keys) != 1:
                raise W2WFileError(f"{self.path} holds {len(keys)} tensors ({', '.join(keys[:5])}): name one with key=")
            self._slice = self._file.get_slice(key or keys[0])
            self.shape = tuple(self._slice.get_shape())
            self._read = lambda a, b: self._slice[a:b].float()
        else:
            tensor = load_tensor(self.path, ndim=2, name="weights matrix")  # memory-mapped
            self.shape = tuple(tensor.shape)
            self._read = lambda a, b: tensor[a:b].float().clone()
        if len(self.shape) != 2 or self.shape[0] < 1:
            raise W2WFileError(f"{self.path}: a weights matrix must be a non-empty 2-D (rows, d) array, got {self.shape}")

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self._read(start, stop)

    def blocks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.rows, size):
            yield start, self.block(start, min(self.rows, start + size))


class _Source:
    """Rows for training: a tensor in memory or a WeightsMatrix, mapped to model inputs by ``transform``."""

    def __init__(self, data, transform: Callable[[torch.Tensor], torch.Tensor] | None, block_rows: int):
        self.data = data
        self.transform = transform or (lambda x: x)
        self.block_rows = block_rows if isinstance(data, WeightsMatrix) else max(1, data.shape[0])
        self.rows = data.rows if isinstance(data, WeightsMatrix) else data.shape[0]

    def read(self, start: int, stop: int) -> torch.Tensor:
        rows = self.data.block(start, stop) if isinstance(self.data, WeightsMatrix) else self.data[start:stop].float()
        return self.transform(rows)

    def block_starts(self) -> list[int]:
        return list(range(0, self.rows, self.block_rows))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at sorted ``index``, read block by block."""
        out = []
        for start in self.block_starts():
            stop = min(self.rows, start + self.block_rows)
            local = index[(index >= start) & (index < stop)] - start
            if local.numel():
                out.append(self.read(start, stop)[local])
        return torch.cat(out) if out else torch.empty(0)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-input mean and std over all rows in one streaming pass (float64 sums)."""
        total = sq = None
        for start in self.block_starts():
            x = self.read(start, min(self.rows, start + self.block_rows)).double()
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        mean = total / self.rows
        var = (sq / self.rows - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float()


# ---- training --------------------------------------------------------------------------------------------
def _kl_per_unit(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, 1)) per example and unit, (B, latent)."""
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar)


def active_units(vae: W2WVAE, inputs: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, torch.Tensor]:
    """Units whose posterior mean varies over ``inputs`` (input units, (N, d)) by more than ``threshold``."""
    with torch.no_grad():
        mu, _ = vae.encode(inputs.float())
    variance = mu.var(0, unbiased=False) if mu.shape[0] > 1 else torch.zeros(mu.shape[-1])
    return int((variance > threshold).sum()), variance


def reconstruction_error(vae: W2WVAE, inputs: torch.Tensor, reference_mean: torch.Tensor | None = None) -> float:
    """Relative squared error Σ|x - dec(μ(x))|² / Σ|x - mean|² over ``inputs`` (N, d), in input units."""
    inputs = inputs.float()
    with torch.no_grad():
        recon = vae.decode(vae.encode(inputs)[0])
    mean = inputs.mean(0) if reference_mean is None else reference_mean
    return float(((inputs - recon) ** 2).sum() / ((inputs - mean) ** 2).sum().clamp_min(1e-30))


def pca_reconstruction_error(train: torch.Tensor, test: torch.Tensor, k: int) -> float:
    """The same relative error for PCA with ``k`` components fitted on ``train`` (baseline for the VAE)."""
    train, test = train.double(), test.double()
    mean = train.mean(0)
    _, _, vh = torch.linalg.svd(train - mean, full_matrices=False)
    basis = vh[:k]  # (k, d)
    centred = test - mean
    recon = (centred @ basis.T) @ basis
    return float(((centred - recon) ** 2).sum() / (centred ** 2).sum().clamp_min(1e-30))


def _split(rows: int, holdout: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask of held-out rows, and the sorted indices of up to _MONITOR_ROWS monitor rows."""
    order = torch.randperm(rows, generator=gen)
    n_out = int(round(rows * holdout))
    held = torch.zeros(rows, dtype=torch.bool)
    held[order[:n_out]] = True
    monitor = order[:n_out][:_MONITOR_ROWS] if n_out else order[:_MONITOR_ROWS]
    return held, monitor.sort().values


def heldout_rows(rows: int, train: TrainConfig) -> torch.Tensor:
    """Boolean mask of the rows :func:`train_vae` holds out (never trains on) of ``rows`` rows under ``train``."""
    return _split(rows, train.holdout, torch.Generator().manual_seed(train.seed))[0]


def train_vae(data, *, config: VAEConfig, train: TrainConfig = TrainConfig(),
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
              shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, whiten: bool = True,
              callback: Callable[[int, int, EpochStats | None], None] | None = None) -> TrainResult:
    """Train a VAE on rows of ``data`` ((N, d) tensor or :class:`WeightsMatrix`), mapped to inputs by ``transform``.

    ``shift``/``scale`` normalise the inputs (default: their mean and, with ``whiten``, per-input std over the data,
    one streaming pass; ``whiten=False`` uses one common std, so the loss weighs inputs as the data do: on PCA
    coefficients with a decaying spectrum the leading PCs then count most).
    ``callback(step, total, info)`` is called after every optimiser step (info None) and every epoch (info an
    :class:`EpochStats`); raising :class:`StopTraining` ends training early with the model so far, any other
    exception aborts. The same data, configs and seed give the same weights (same machine, same thread count).
    """
    source = _Source(data, transform, train.block_rows)
    gen = torch.Generator().manual_seed(train.seed)
    held, monitor_index = _split(source.rows, train.holdout, gen)
    if source.rows - int(held.sum()) < 2:
        raise ValueError(f"only {source.rows - int(held.sum())} training rows after holding out {train.holdout:.0%}: "
                         "give more rows or lower holdout")
    if shift is None or scale is None:
        mean, std = source.moments()
        shift = mean if shift is None else shift
        if not whiten:
            std = torch.full_like(std, float(std.square().mean().sqrt()))
        scale = torch.where(std > 1e-8 * std.max().clamp_min(1e-30), std, torch.ones_like(std)) if scale is None else scale
    monitor = source.gather(monitor_index)
    if monitor.shape[-1] != config.input_dim:
        raise ValueError(f"the data give {monitor.shape[-1]:,} inputs per row but the VAE expects {config.input_dim:,}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        vae = W2WVAE(config, shift, scale)
    threads = train.threads or (1 if sum(p.numel() for p in vae.parameters()) < _SMALL_MODEL else torch.get_num_threads())
    with _num_threads(threads):
        return _fit(vae, source, train, gen, held, monitor, callback)


@contextlib.contextmanager
def _num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(vae: W2WVAE, source: _Source, train: TrainConfig, gen: torch.Generator, held: torch.Tensor,
         monitor: torch.Tensor, callback) -> TrainResult:
    config = vae.config
    opt = torch.optim.Adam(vae.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    train_rows = source.rows - int(held.sum())
    steps_per_epoch = sum(math.ceil(int((~held[s:s + source.block_rows]).sum()) / train.batch_size)
                          for s in source.block_starts())
    total, step, history, stopped = train.epochs * steps_per_epoch, 0, [], False
    best: tuple[float, int, dict] | None = None  # (held-out error, epoch, weights) with keep_best
    for epoch in range(train.epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)
        vae.train()
        try:
            for start in torch.tensor(source.block_starts())[torch.randperm(len(source.block_starts()), generator=gen)]:
                start = int(start)
                stop = min(source.rows, start + source.block_rows)
                block = vae.normalise(source.read(start, stop)[~held[start:stop]])
                block = block[torch.randperm(block.shape[0], generator=gen)]
                for b in range(0, block.shape[0], train.batch_size):
                    xn = block[b:b + train.batch_size]
                    beta = train.beta_at(epoch + (step - epoch * steps_per_epoch) / max(1, steps_per_epoch))
                    noise = torch.randn(xn.shape[0], config.latent, generator=gen)
                    recon_n, mu, logvar = vae(xn, noise)
                    recon = ((recon_n - xn) ** 2).sum(-1).mean()
                    kl_unit = _kl_per_unit(mu, logvar).mean(0)  # (latent,) batch mean
                    loss = recon + beta * kl_unit.clamp_min(train.free_bits).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(vae.parameters(), train.grad_clip)
                    opt.step()
                    n = xn.shape[0]
                    sums += torch.tensor([loss.item() * n, recon.item() * n, kl_unit.sum().item() * n], dtype=torch.float64)
                    step += 1
                    if callback is not None:
                        callback(step, total, None)
        except StopTraining:
            stopped = True
        vae.eval()
        stats = _epoch_stats(vae, epoch, train.beta_at(epoch + 1), sums / train_rows, monitor,
                             bool(train.holdout), time.perf_counter() - t0)
        history.append(stats)
        full_beta = epoch + 1 >= train.warmup_epochs + train.ramp_epochs
        if (train.keep_best and full_beta and math.isfinite(stats.heldout_error)
                and (best is None or stats.heldout_error < best[0])):
            best = (stats.heldout_error, epoch + 1, copy.deepcopy(vae.state_dict()))
        if stopped:
            break
        if callback is not None:
            try:
                callback(step, total, stats)
            except StopTraining:
                stopped = True
                break
    chosen = len(history)
    if best is not None:
        vae.load_state_dict(best[2])
        chosen = best[1]
    vae.eval()
    vae.requires_grad_(False)
    vae.history = tuple(history)
    vae.train_config = train
    vae.chosen_epoch = chosen
    return TrainResult(vae, tuple(history), stopped, chosen)


def chosen_stats(vae: W2WVAE) -> EpochStats | None:
    """The training statistics of the epoch whose weights ``vae`` holds (the last one unless trained with
    ``keep_best``); None for a VAE without a training history."""
    history = getattr(vae, "history", ())
    if not history:
        return None
    return history[getattr(vae, "chosen_epoch", len(history)) - 1]


def _epoch_stats(vae: W2WVAE, epoch: int, beta: float, means: torch.Tensor, monitor: torch.Tensor, heldout: bool,
                 seconds: float) -> EpochStats:
    active, _ = active_units(vae, monitor)
    error = reconstruction_error(vae, monitor, vae.shift) if heldout else float("nan")
    loss, recon, kl = (float(v) for v in means)
    return EpochStats(epoch + 1, beta, loss, recon, kl, active, error, seconds, informative_units(vae, monitor))


def informative_units(vae: W2WVAE, inputs: torch.Tensor, nats: float = INFORMATIVE_NATS) -> int:
    """Units whose mean KL over ``inputs`` (the information they carry) exceeds ``nats``: a stricter reading than
    :func:`active_units`, whose variance threshold a unit passes while carrying a small fraction of a nat."""
    with torch.no_grad():
        mu, logvar = vae.encode(inputs.float())
    return int((_kl_per_unit(mu, logvar).mean(0) > nats).sum())


def train_from_space(space, *, input: str = "coefs", pcs: int | None = None, latent: int = 64,
                     hidden: tuple[int, ...] = (512, 256), weights: WeightsMatrix | torch.Tensor | None = None,
                     train: TrainConfig = TrainConfig(), whiten: bool = True, callback=None) -> TrainResult:
    """Train on a space's data: its training coefficients, or (``weights``) a weights matrix projected or standardised.

    ``input="coefs"``: inputs are the first ``pcs`` coefficients, whitened with the training models' per-PC mean and
    std (``whiten=False``: one common std) from ``space.train_coefs``, or projected from ``weights`` block by block.
    ``input="weights"``: inputs are
    weight vectors from ``weights`` (required), standardised with the space's mean and std (as w2w++).
    """
    if input == "coefs":
        k = pcs or (space.train_coefs.shape[1] if space.train_coefs is not None and weights is None else space.pcs)
        if weights is None:
            if space.train_coefs is None:
                raise ValueError("this space has no training coefficients (proj_1000pc.pt): pass a weights matrix")
            if k > space.train_coefs.shape[1]:
                raise ValueError(f"pcs={k:,} but the space has training coefficients for {space.train_coefs.shape[1]:,}")
            data, transform = space.train_coefs[:, :k], None
        else:
            data, transform = weights, (lambda w: space.project(w, k))
        config = VAEConfig("coefs", k, latent, hidden, space.fingerprint)
        return train_vae(data, config=config, train=train, transform=transform, whiten=whiten, callback=callback)
    if input == "weights":
        if weights is None:
            raise ValueError("input='weights' trains on weight vectors: pass a weights matrix (rows of d weights)")
        std = torch.where(space.std.abs() > 0, space.std.abs(), torch.ones_like(space.std))
        config = VAEConfig("weights", space.dim, latent, hidden, space.fingerprint)
        return train_vae(weights, config=config, train=train, shift=space.mean, scale=std, callback=callback)
    raise ValueError(f"input must be one of {INPUTS}, got {input!r}")


# ---- save / load -----------------------------------------------------------------------------------------
def save_vae(vae: W2WVAE, path: str, *, dtype: torch.dtype = torch.float32) -> None:
    """Write the VAE to one ``.safetensors`` file (atomically); config and training summary in its metadata.
    ``dtype`` float16 halves the file: the network's weights are stored in it (read back as float32); the whitening
    buffers stay float32."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"VAE weights are stored as float32 or float16, got {dtype}")
    params = {k for k, _ in vae.named_parameters()}
    tensors = {k: v.detach().to(dtype if k in params else torch.float32).contiguous()
               for k, v in vae.state_dict().items()}
    history = [asdict(h) for h in getattr(vae, "history", ())]
    train = getattr(vae, "train_config", None)
    meta = {"format": VAE_FORMAT, "format_version": "1", "config": json.dumps(asdict(vae.config)),
            "train_config": json.dumps(asdict(train) if train is not None else None),
            "history": json.dumps(history, allow_nan=True),
            "chosen_epoch": str(getattr(vae, "chosen_epoch", len(history)))}
    write_safetensors(path, tensors, meta)


def load_vae(path: str) -> W2WVAE:
    from safetensors import SafetensorError, safe_open

    meta = read_format_metadata(path, VAE_FORMAT, "VAE", "train one with `python -m w2w vae-train`")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        cfg = json.loads(meta["config"])
        config = VAEConfig(**{**cfg, "hidden": tuple(cfg["hidden"])})
        history = tuple(EpochStats(**h) for h in json.loads(meta.get("history", "[]")))
        train = json.loads(meta.get("train_config", "null"))
        train = TrainConfig(**train) if train else None
        chosen = int(meta.get("chosen_epoch", len(history)))
        if history and not 1 <= chosen <= len(history):
            raise ValueError(f"chosen epoch {chosen} of {len(history)}")
    except SafetensorError as exc:
        raise W2WFileError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # json.JSONDecodeError is a ValueError
        raise W2WFileError(f"{path}: malformed VAE metadata ({exc}); train the VAE again with "
                           "`python -m w2w vae-train`") from None
    with torch.device("meta"):  # the shapes the config implies, before allocating anything it asks for
        expected = {k: tuple(v.shape) for k, v in W2WVAE(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise W2WFileError(f"{path}: tensors do not match the stored config ({', '.join(diff[:3])}: expected "
                           f"{[expected.get(k) for k in diff[:3]]}, found {[found.get(k) for k in diff[:3]]}); the "
                           "file is damaged or edited: train the VAE again with `python -m w2w vae-train`")
    vae = W2WVAE(config)
    try:
        vae.load_state_dict(tensors)
        vae.check_values()
    except (RuntimeError, ValueError) as exc:
        raise W2WFileError(f"{path}: {str(exc).splitlines()[0]}; the file is damaged or edited: train the VAE "
                           "again with `python -m w2w vae-train`") from None
    vae.eval()
    vae.requires_grad_(False)
    vae.history = history
    vae.train_config = train
    vae.chosen_epoch = chosen
    return vae


def describe_vae(vae: W2WVAE) -> dict:
    """A JSON-friendly summary (``vae-info``)."""
    c = vae.config
    last = chosen_stats(vae)
    return {"input": c.input, "input_dim": c.input_dim, "latent": c.latent, "hidden": list(c.hidden),
            "space_fingerprint": c.space_fingerprint, "parameters": sum(p.numel() for p in vae.parameters()),
            "epochs_trained": len(getattr(vae, "history", ())),
            "chosen_epoch": getattr(vae, "chosen_epoch", None) if last is not None else None,
            "active_units": None if last is None else last.active,
            "heldout_error": None if last is None or math.isnan(last.heldout_error) else last.heldout_error,
            "train_config": None if getattr(vae, "train_config", None) is None else asdict(vae.train_config)}


# ---- use -------------------------------------------------------------------------------------------------
def _check_latent(vae: W2WVAE, z: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(z, dtype=torch.float32)
    if z.shape[-1] != vae.latent:
        raise ValueError(f"latent has {z.shape[-1]} values but the VAE has {vae.latent} latent units")
    if not torch.isfinite(z).all():
        raise ValueError("latent contains NaN or Inf")
    return z


def _check_space(vae: W2WVAE, space) -> None:
    fp = vae.config.space_fingerprint
    if vae.config.input == "coefs" and fp != space.fingerprint:
        raise IdentityMismatch(f"the VAE was trained on coefficients of space {fp}, not of the loaded space "
                               f"{space.fingerprint}: load the space it was trained with")
    if vae.config.input == "coefs" and vae.config.input_dim > space.pcs:
        raise IdentityMismatch(f"the VAE decodes {vae.config.input_dim:,} coefficients but the space is loaded with "
                               f"{space.pcs:,} PCs: load the space with pcs >= {vae.config.input_dim:,}")
    if vae.config.input == "weights" and vae.config.input_dim != space.dim:
        raise IdentityMismatch(f"the VAE decodes {vae.config.input_dim:,} weights but the space has {space.dim:,}")


def decode_weights(vae: W2WVAE, z: torch.Tensor, space=None) -> torch.Tensor:
    """Latents (..., latent) -> flat weight vectors (..., d). Coefficient VAEs need their ``space``."""
    z = _check_latent(vae, z)
    with torch.no_grad():
        out = vae.decode(z)
    if vae.config.input == "weights":
        return out
    if space is None:
        raise ValueError("this VAE decodes PCA coefficients: give its space to turn them into weights")
    _check_space(vae, space)
    return space.weights(out)


def decode_identity(vae: W2WVAE, space, z: torch.Tensor, name: str = "", step: str = "vae decode") -> Identity:
    """A latent (latent,) -> an identity of ``space``. Weight VAEs are projected on the space's PCs (lossy:
    what lies outside the loaded PCs is dropped; use :func:`decode_weights` to keep it)."""
    _check_space(vae, space)
    z = _check_latent(vae, z)
    if z.dim() != 1:
        raise ValueError(f"decode one latent at a time, got shape {tuple(z.shape)}")
    with torch.no_grad():
        out = vae.decode(z)
    if vae.config.input == "weights":
        out, step = space.project(out), step + f" (projected on {space.pcs} PCs)"
    return Identity(out, space.fingerprint, name, (step,))


def encode_identity(vae: W2WVAE, identity: Identity, space=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An identity -> posterior (μ, log σ²) of its latent. Missing PCs count as 0 (the mean model)."""
    if vae.config.input == "coefs":
        if identity.space_fingerprint != vae.config.space_fingerprint:
            raise IdentityMismatch(f"identity {identity.name or '(unnamed)'} belongs to space "
                                   f"{identity.space_fingerprint}, the VAE to {vae.config.space_fingerprint}")
        c, k = identity.coefficients, vae.config.input_dim
        if c.shape[0] > k and bool(c[k:].abs().max() > 0):
            raise ValueError(f"identity has {c.shape[0]:,} coefficients but the VAE encodes {k:,}: its PCs beyond "
                             f"{k:,} would be dropped; truncate it explicitly if that is intended")
        x = torch.cat([c[:k], c.new_zeros(max(0, k - c.shape[0]))])
    else:
        if space is None:
            raise ValueError("this VAE encodes weights: give the identity's space")
        identity.check_space(space)
        _check_space(vae, space)
        x = space.weights(identity.coefficients)
    with torch.no_grad():
        return vae.encode(x)


def sample_latents(latent: int, n: int = 1, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """``n`` latents from N(0, I)·temperature, (n, latent); the same seed gives the same bytes."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(n, latent, generator=gen) * temperature


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: float, mode: str = "slerp") -> torch.Tensor:
    """Between two latents: ``linear`` (1-t)·z0 + t·z1, or ``slerp`` (Shoemake 1985) along the great circle,
    which keeps the norm typical of N(0, I) samples; falls back to linear for (anti)parallel latents."""
    z0, z1 = torch.as_tensor(z0, dtype=torch.float32), torch.as_tensor(z1, dtype=torch.float32)
    if z0.shape != z1.shape:
        raise ValueError(f"latents have different shapes {tuple(z0.shape)} and {tuple(z1.shape)}")
    if mode == "linear":
        return (1.0 - t) * z0 + t * z1
    if mode != "slerp":
        raise ValueError(f"mode must be 'linear' or 'slerp', got {mode!r}")
    n0, n1 = z0.norm(dim=-1, keepdim=True), z1.norm(dim=-1, keepdim=True)
    cos = ((z0 * z1).sum(-1, keepdim=True) / (n0 * n1).clamp_min(1e-12)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    linear = (1.0 - t) * z0 + t * z1
    slerp = (torch.sin((1.0 - t) * omega) * z0 + torch.sin(t * omega) * z1) / so.clamp_min(1e-12)
    return torch.where(so > 1e-6, slerp, linear)


# ---- inversion parametrisation -----------------------------------------------------------------------------
class LatentParam(nn.Module):
    """What inversion through the decoder optimises (:func:`w2w.invert.invert` ``param=``): a latent z
    (``gaussian=False``) or a Gaussian N(μ, σ²) over it, decoded to the space's coefficients β.

    ``coefficients()`` is β (pcs,), differentiable in the latent parameters: the decoder output for a coefficient VAE;
    for a weight VAE, the decoded weights projected on the space's first ``pcs`` PCs (so the model optimised is
    exactly the identity returned). ``prior_loss()`` is ``prior_weight`` times ½|z|² (−log N(z; 0, I) up to a
    constant) for a point latent, or KL(N(μ, σ²) || N(0, I)) for the Gaussian (w2w++ report, eq. 7), whose z is
    re-sampled at every call (reparameterised; ``generator`` makes it reproducible). The VAE stays frozen.
    ``prior_weight`` balances the prior against the diffusion loss, a per-pixel mean (about 0.1 for SD1.5).
    """

    def __init__(self, vae: W2WVAE, space, init: torch.Tensor | None = None, *, gaussian: bool = False,
                 prior_weight: float = 1e-3, init_log_sigma: float = -3.0, pcs: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        _check_space(vae, space)
        if not (math.isfinite(prior_weight) and prior_weight >= 0):
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        if any(t.is_inference() for t in (*vae.parameters(), *vae.buffers())):
            vae = _plain_copy(vae)  # made under torch.inference_mode (e.g. a ComfyUI node): autograd cannot use it
        vae.requires_grad_(False)
        self.vae = vae
        self.gaussian = gaussian
        self.prior_weight = float(prior_weight)
        self.generator = generator
        if vae.config.input == "coefs":
            if pcs not in (None, vae.config.input_dim):
                raise ValueError(f"this VAE decodes {vae.config.input_dim:,} coefficients; pcs={pcs} cannot change that")
            self.pcs = vae.config.input_dim
        else:
            self.pcs = space.pcs if pcs is None else pcs
            if not 1 <= self.pcs <= space.pcs:
                raise ValueError(f"pcs={self.pcs:,} but the space is loaded with {space.pcs:,} PCs")
            std = torch.where(space.std == 0, torch.ones_like(space.std), space.std)
            self.register_buffer("_mean", space.mean.clone())
            self.register_buffer("_std", std)
            self.register_buffer("_basis", space.components[:self.pcs].float().T.contiguous())  # (d, pcs)
        z0 = torch.zeros(vae.latent) if init is None else _check_latent(vae, init).clone()
        self.mu = nn.Parameter(z0)
        if gaussian:
            self.log_sigma = nn.Parameter(torch.full((vae.latent,), float(init_log_sigma)))

    def latent(self) -> torch.Tensor:
        """The latent of this step: μ, or a reparameterised sample of N(μ, σ²)."""
        if not self.gaussian:
            return self.mu
        noise = torch.randn(self.mu.shape, generator=self.generator)
        return self.mu + self.log_sigma.exp() * noise

    def _to_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(z)
        if self.vae.config.input == "coefs":
            return out
        return ((out - self._mean) / self._std) @ self._basis

    def coefficients(self) -> torch.Tensor:
        """β (pcs,) from a (sampled) latent, differentiable."""
        return self._to_coefficients(self.latent())

    def prior_loss(self) -> torch.Tensor:
        if not self.gaussian:
            return self.prior_weight * 0.5 * (self.mu ** 2).sum()
        return self.prior_weight * _kl_per_unit(self.mu, 2.0 * self.log_sigma).sum()

    def result(self) -> torch.Tensor:
        """β of the mean latent μ (no sampling), detached: the identity to keep."""
        with torch.no_grad():
            return self._to_coefficients(self.mu)

    def describe(self) -> str:
        kind = "gaussian" if self.gaussian else "point"
        return f"vae-latent={self.vae.latent} {kind} prior={self.prior_weight:g} input={self.vae.config.input}"


def _plain_copy(vae: W2WVAE) -> W2WVAE:
    """A copy of ``vae`` made of ordinary tensors (usable by autograd), sharing nothing with it."""
    with torch.inference_mode(False):
        copy = W2WVAE(vae.config, vae.shift.clone(), vae.scale.clone())
        copy.load_state_dict({k: v.clone() for k, v in vae.state_dict().items()})
    copy.eval()
    copy.history = getattr(vae, "history", ())
    copy.train_config = getattr(vae, "train_config", None)
    return copy
