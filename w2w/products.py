"""The two products of an inversion step with the basis slice B (k, d), in a precision that suits the device.

``project(β) = β @ B`` (d,) gives the next weights; ``pullback(g) = B @ g`` (k,) gives the gradient of the
coefficients. On a CPU they are bound by reading B (4 GB in float32 at 10,000 × 99,648), so fewer bytes per value
is what makes them fast: float16 halves the bytes. The coefficients, Adam's state and the weight vector stay float32
whatever the precision of the products.
"""
from __future__ import annotations

import functools
import math
import time

import torch

__all__ = ["PRECISIONS", "BasisProducts", "basis_dtype_for", "cpu_product_times"]

PRECISIONS = ("auto", "float32", "float16", "bfloat16")
LOW_DTYPES = (torch.float16, torch.bfloat16)
AUTO_LOW_MIN_BYTES = 256 << 20  # below this float32 basis size the products cost milliseconds: keep them exact


@functools.lru_cache(maxsize=None)
def cpu_product_times() -> dict[torch.dtype, float]:
    """Seconds for the two products of a step on this CPU and torch build, float32 and float16, on a 16M-value probe
    (wide and tall, like B and its transposed copy); best of three. Some builds have no fast half-precision CPU
    kernel (a scalar fallback ~30x slower than float32): this is how "auto" finds out. Runs once, ~0.2 s."""
    times: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.float16):
        total = 0.0
        for shape in ((256, 65536), (65536, 256)):
            matrix = torch.full(shape, 0.01, dtype=dtype)
            x = torch.full((shape[1],), 0.5, dtype=dtype)
            best = math.inf
            try:
                for _ in range(3):
                    start = time.perf_counter()
                    matrix @ x
                    best = min(best, time.perf_counter() - start)
            except RuntimeError:  # no CPU kernel for this dtype in this build
                best = math.inf
            total += best
        times[dtype] = total
    return times


def basis_dtype_for(precision: str, device: torch.device | str, dtype: torch.dtype, pcs: int, dim: int) -> torch.dtype:
    """The storage dtype of the basis products for a ``precision`` choice (one of :data:`PRECISIONS`).

    "auto" is mixed precision where the device supports it: on a GPU the model's compute dtype (float16/bfloat16)
    or float32; on a CPU float16 when the float32 basis slice is large (>= 256 MB, where the products bound the step),
    this build multiplies float16 faster than float32 (:func:`cpu_product_times`) and the RAM holds the two half
    copies (the size of one float32 copy) with 1 GB to spare; float32 otherwise.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "auto":
        return getattr(torch, precision)
    if torch.device(device).type != "cpu":
        return dtype if dtype in LOW_DTYPES else torch.float32
    if dtype == torch.float64 or pcs * dim * 4 < AUTO_LOW_MIN_BYTES:
        return torch.promote_types(dtype, torch.float32)
    free = _available_memory()
    if free is not None and free < pcs * dim * 4 + (1 << 30):
        return torch.float32
    times = cpu_product_times()
    return torch.float16 if times[torch.float16] < 0.9 * times[torch.float32] else torch.float32


def _available_memory() -> int | None:
    try:
        import psutil  # a ComfyUI dependency; optional here
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


class BasisProducts:
    """``project(β) = β @ B`` (d,) and ``pullback(g) = B @ g`` (k,) for a basis slice B (k, d) on a device; results in
    float32 (float64 for a float64 basis).

    - float32/float64: B as it is (no copy on a CPU in float32).
    - float16/bfloat16: each row of B stored divided by its largest magnitude (the factor is applied back in
      float32), every input vector divided by its norm before it is rounded, so nothing overflows or flushes to zero
      whatever the scale of the basis, the coefficients or the gradients; the products accumulate in float32 inside
      the matmul (relative error ~4e-4 in float16, ~3e-3 in bfloat16).

    On a CPU the half forms keep a second, transposed copy (d, k) for ``project``: PyTorch's fast CPU half kernels
    are a contiguous matrix times a vector (the transposed product falls back to a loop ~50x slower). The two half
    copies take the memory of one float32 copy.
    """

    def __init__(self, basis: torch.Tensor, device: torch.device | str, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype
        self.low = dtype in LOW_DTYPES
        self.out_dtype = torch.promote_types(dtype, torch.float32) if not self.low else torch.float32
        self.shape = tuple(basis.shape)
        self.rows, self.cols, self.row_scale = None, None, None
        if not self.low:
            self.rows = basis.to(self.device, dtype)  # (k, d)
            return
        with torch.no_grad():
            self._store(basis)

    def _store(self, basis: torch.Tensor) -> None:
        k, d = self.shape
        self.rows = torch.empty(k, d, dtype=self.dtype, device=self.device)
        self.row_scale = torch.empty(k, dtype=torch.float32, device=self.device)
        step = max(1, (8 << 20) // max(1, 4 * d))  # rows per float32 block: ~8 MB at a time
        for i in range(0, k, step):
            block = basis[i:i + step].to(self.device, torch.float32, copy=True)  # scaled in place below
            if not torch.isfinite(block).all():
                raise ValueError("the basis contains NaN or Inf values")
            scale = _nonzero(block.abs().amax(dim=1))
            self.row_scale[i:i + block.shape[0]] = scale
            self.rows[i:i + block.shape[0]].copy_(block.div_(scale[:, None]))
        if self.device.type == "cpu":  # GPUs: one copy serves both products
            self.cols = self.rows.T.contiguous()  # (d, k), same per-row scaling

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.cols) if t is not None)

    def _normalised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x / |x| rounded to the storage dtype, and |x| (a 0-d tensor: no host sync on a GPU). Zeros stay zeros,
        NaN/Inf propagate to the loss check."""
        norm = torch.linalg.vector_norm(x)
        norm = torch.where((norm > 0) & torch.isfinite(norm), norm, torch.ones_like(norm))
        return (x / norm).to(self.dtype), norm

    def project(self, beta: torch.Tensor) -> torch.Tensor:
        """β (k,) -> β @ B (d,)."""
        if not self.low:
            return (beta.to(self.device, self.dtype) @ self.rows).to(self.out_dtype)
        x, norm = self._normalised(beta.to(self.device, torch.float32) * self.row_scale)  # rows·row_scale = B
        u = self.cols @ x if self.cols is not None else x @ self.rows
        return u.float().mul_(norm)

    def pullback(self, g: torch.Tensor) -> torch.Tensor:
        """g (d,) -> B @ g (k,)."""
        if not self.low:
            return (self.rows @ g.to(self.device, self.dtype)).to(self.out_dtype)
        x, norm = self._normalised(g.to(self.device, torch.float32))
        return (self.rows @ x).float().mul_(self.row_scale).mul_(norm)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))
