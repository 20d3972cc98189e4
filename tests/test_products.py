"""The basis products of an inversion step (w2w.products) in full and half precision."""
from __future__ import annotations

import math

import pytest
import torch

import w2w.products as products_mod
from w2w.products import BasisProducts, basis_dtype_for, cpu_product_times

# Relative error (norm) of a product against float64. Both factors are rounded to the half type (unit roundoff u:
# 2^-11 for float16, 2^-8 for bfloat16) and accumulated in float32, so to first order each term is off by at most
# 2u of its size: the bound is 2u (measured on these cases: 4.2e-4 = 0.87u for float16, 3.4e-3 = 0.87u for bfloat16).
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TOLERANCE = {dtype: 2 * u for dtype, u in UNIT_ROUNDOFF.items()}
LOW = list(TOLERANCE)


def wide_basis(k: int = 48, d: int = 700, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Orthonormal rows (like PCA components) of very different sizes, one heavier block of columns."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64)).Q.T
    q = q * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    q[:, : d // 7] *= 4.0  # a module with larger weights
    return (q * scale).float()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e4])  # basis entries far below, around and above fp16's range
@pytest.mark.parametrize("transposed_copy", [True, False])  # the CPU layout, and the single copy GPUs keep
def test_low_precision_products_match_float64(dtype, scale, transposed_copy):
    basis = wide_basis(scale=scale)
    before = basis.clone()
    products = BasisProducts(basis, "cpu", dtype)
    assert torch.equal(basis, before)  # the space's basis is not touched
    assert products.rows.dtype == dtype and products.low
    assert products.cols is not None and products.cols.shape == (basis.shape[1], basis.shape[0])
    if not transposed_copy:
        products.cols = None
    gen = torch.Generator().manual_seed(1)
    ref = basis.double()
    for magnitude in (1e-12, 1.0, 1e8):  # gradients and coefficients far outside fp16's range
        beta = torch.randn(basis.shape[0], generator=gen) * magnitude
        g = torch.randn(basis.shape[1], generator=gen) * magnitude
        u, back = products.project(beta), products.pullback(g)
        assert u.dtype == torch.float32 and back.dtype == torch.float32
        assert u.shape == (basis.shape[1],) and back.shape == (basis.shape[0],)
        for got, want in ((u, beta.double() @ ref), (back, ref @ g.double())):
            assert torch.isfinite(got).all()
            err = float((got.double() - want).norm() / want.norm())
            assert err < TOLERANCE[dtype], (magnitude, err)
    assert torch.equal(products.project(torch.zeros(basis.shape[0])), torch.zeros(basis.shape[1]))
    assert torch.equal(products.pullback(torch.zeros(basis.shape[1])), torch.zeros(basis.shape[0]))


def test_memory_of_the_copies():
    basis = wide_basis()
    n = basis.numel()
    assert BasisProducts(basis, "cpu", torch.float16).nbytes == n * 4  # two half copies = one float32 copy
    full = BasisProducts(basis, "cpu", torch.float32)
    assert full.rows.data_ptr() == basis.data_ptr() and full.nbytes == n * 4  # shared with the space, no copy


@pytest.mark.parametrize("dtype", LOW)
def test_nan_in_the_basis_is_refused(dtype):
    basis = wide_basis()
    basis[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        BasisProducts(basis, "cpu", dtype)
    assert torch.isnan(BasisProducts(basis, "cpu", torch.float32).rows).any()  # full precision keeps it as it is


def test_zero_rows_and_columns_are_fine():
    basis = wide_basis()
    basis[4] = 0.0
    basis[:, 9] = 0.0
    for dtype in LOW:
        p = BasisProducts(basis, "cpu", dtype)
        beta = torch.ones(basis.shape[0])
        assert torch.isfinite(p.project(beta)).all() and float(p.project(beta)[9]) == 0.0
        assert float(p.pullback(torch.ones(basis.shape[1]))[4]) == 0.0


def test_precision_choice(monkeypatch):
    big, small = (10_000, 99_648), (12, 56)
    assert basis_dtype_for("float32", "cpu", torch.float32, *big) == torch.float32
    assert basis_dtype_for("bfloat16", "cpu", torch.float32, *small) == torch.bfloat16
    assert basis_dtype_for("auto", "cpu", torch.float32, *small) == torch.float32  # cheap: stays exact
    assert basis_dtype_for("auto", "cpu", torch.float64, *big) == torch.float64
    assert basis_dtype_for("auto", "cuda", torch.float16, *small) == torch.float16  # GPU: the model's dtype
    assert basis_dtype_for("auto", "cuda", torch.bfloat16, *big) == torch.bfloat16
    assert basis_dtype_for("auto", "cuda", torch.float32, *big) == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        basis_dtype_for("fp8", "cpu", torch.float32, *small)

    def machine(fp32, fp16, free=64 << 30):
        monkeypatch.setattr(products_mod, "cpu_product_times", lambda: {torch.float32: fp32, torch.float16: fp16})
        monkeypatch.setattr(products_mod, "_available_memory", lambda: free)
        return basis_dtype_for("auto", "cpu", torch.float32, *big)

    assert machine(8.0, 4.0) == torch.float16  # half the bytes, fast kernels
    assert machine(8.0, 7.5) == torch.float32  # not clearly faster: stay exact
    assert machine(8.0, 240.0) == torch.float32  # a build without a fast float16 CPU kernel
    assert machine(8.0, math.inf) == torch.float32  # no float16 CPU kernel at all
    assert machine(8.0, 4.0, free=4 << 30) == torch.float32  # the two half copies (4 GB) would not fit with 1 GB spare
    assert machine(8.0, 4.0, free=6 << 30) == torch.float16


def test_cpu_probe_times_every_candidate():
    times = cpu_product_times()
    assert set(times) == {torch.float32, torch.float16}
    assert all(t > 0 for t in times.values())
