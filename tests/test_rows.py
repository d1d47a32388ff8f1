"""gradkit._factors.write_rows: rows written from factors in parallel blocks, against a loop.

Framework-free: the factors are NumPy arrays. The result starts as NaN, so a row that no
block writes (or writes twice into the wrong place) shows up.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradkit import _parallel
from gradkit._factors import Factor, write_rows
from gradkit._factors._rows import kernel_rows

RNG = np.random.default_rng(11)


@pytest.fixture(params=["serial", "parallel"])
def mode(request, monkeypatch):
    if request.param == "parallel":  # every write goes through the pool, in blocks
        monkeypatch.setattr(_parallel, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(_parallel, "_workers", lambda: 3)
    return request.param


def nan_rows(*shape):
    return np.full(shape, np.nan, np.float32)


@pytest.mark.parametrize("n", [1, 7, 13])
def test_kernel_rows_are_outer_products(mode, n):
    a = RNG.normal(size=(n, 1, 5)).astype("float32")
    d = RNG.normal(size=(n, 1, 4)).astype("float32")
    out = nan_rows(n, 5, 4)
    assert write_rows(Factor("kernel", a, d), out)
    for i in range(n):
        np.testing.assert_allclose(out[i], np.outer(a[i, 0], d[i, 0]), rtol=1e-6)


def test_sequence_kernel_rows_sum_over_positions(mode):
    a = RNG.normal(size=(9, 3, 5)).astype("float32")
    d = RNG.normal(size=(9, 3, 4)).astype("float32")
    out = nan_rows(9, 5, 4)
    write_rows(Factor("kernel", a, d), out)
    for i in range(9):
        expected = sum(np.outer(a[i, t], d[i, t]) for t in range(3))
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_bias_rows_and_position_sums_against_a_float64_loop(dtype):
    """Σ_t δ_it as one BLAS product (gradkit._factors._rows.positions_summed): in float32 for
    float16 deltas, into `out` of another dtype, and a NaN or Inf in δ reported."""
    from gradkit._factors._positions import positions_summed

    d = RNG.normal(size=(6, 50, 3)).astype(dtype)
    expected = np.array([[sum(float(d[i, t, k]) for t in range(50)) for k in range(3)]
                         for i in range(6)])
    tol = {"float16": 1e-5, "float32": 1e-5, "float64": 1e-12}[dtype]
    summed = positions_summed(d, np.float64)
    assert summed.dtype == np.float64
    np.testing.assert_allclose(summed, expected, rtol=tol, atol=tol)
    out = nan_rows(6, 3)
    assert write_rows(Factor("bias", None, d), out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    d[2, 7, 1] = np.nan
    assert not write_rows(Factor("bias", None, d), nan_rows(6, 3))


def test_arrays_are_copied_and_checked(mode):
    rows = RNG.normal(size=(11, 6, 2)).astype("float32")
    out = nan_rows(11, 6, 2)
    assert write_rows(rows, out)
    np.testing.assert_array_equal(out, rows)
    rows[4, 1, 0] = np.inf
    assert not write_rows(rows, nan_rows(11, 6, 2))


def test_an_error_in_a_block_reaches_the_caller(mode):
    def write(rows):
        if rows.start > 0 or mode == "serial":
            raise ValueError("block failed")

    with pytest.raises(ValueError, match="block failed"):
        _parallel.in_blocks(10, 10**9, write)


def test_blocks_cover_every_row_once():
    seen = []
    _parallel.in_blocks(50, 10**9, lambda rows: seen.extend(range(50)[rows]))
    assert sorted(seen) == list(range(50))


@pytest.mark.flavours("torch")
@pytest.mark.parametrize("positions", [1, 3])
def test_torch_writes_the_same_kernel_rows(keras, positions):
    from gradkit._backends.torch import TorchPrimitives

    torch_kernel_rows = TorchPrimitives().kernel_rows

    a = RNG.normal(size=(6, positions, 5)).astype("float32")
    d = RNG.normal(size=(6, positions, 4)).astype("float32")
    expected, out = nan_rows(6, 5, 4), nan_rows(9, 5, 4)
    kernel_rows(a, d, expected)
    assert write_rows(Factor("kernel", a, d), out[2:8], torch_kernel_rows)  # a view
    np.testing.assert_allclose(out[2:8], expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(out[:2]).all() and np.isnan(out[8:]).all()


def test_nested_blocks_run_serially_instead_of_waiting_on_the_pool():
    """A block that itself works in blocks (conv norms) must not wait for pool threads that
    are all busy with the outer blocks. In a subprocess: a deadlock fails on the timeout."""
    import subprocess
    import sys

    code = """
from gradkit import _parallel
_parallel.PARALLEL_MIN_BYTES, _parallel._workers = 0, lambda: 2
seen = []
def outer(rows):
    _parallel.in_blocks(3, 10**9, lambda inner: seen.extend(
        (i, j) for i in range(8)[rows] for j in range(3)[inner]))
_parallel.in_blocks(8, 10**9, outer)
assert sorted(seen) == [(i, j) for i in range(8) for j in range(3)], seen
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
