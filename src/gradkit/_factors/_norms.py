"""Squared L2 norms of per-example gradients from their factors: one closed form per role.

Every function is ``(factor, n) -> (n,) float64`` over the first `n` examples, and equals the
squared norm of the rows the role's writer (``gradkit._factors._rows``) writes, without forming
them where a closed form is cheaper:

    ||g_W||² = Σ_{t,s} (a_t·a_s)(δ_t·δ_s)        ||g_b||² = ||Σ_t δ_t||²
    ||g_E||² = Σ_{t,s} [id_t = id_s] (δ_t·δ_s)

A convolution (depthwise too) forms each example's (small) kernel gradient, a block of
examples at a time; a BatchNormalization's rows are (n, channels) and are formed
(``gradkit._factors._normalization``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradkit._factors import _conv as conv
from gradkit._factors import _einsum as einsum
from gradkit._factors._positions import positions_summed


def array_squared(rows: Any, n: int) -> np.ndarray:
    """Squared norms of materialized (n, ...) rows (or a list of one array per example)."""
    if isinstance(rows, list):
        return np.array([np.einsum("p,p->", r, r, dtype=np.float64) for r in
                         (np.ravel(example) for example in rows[:n])], np.float64)
    rows = np.asarray(rows)[:n].reshape(n, -1)
    return np.einsum("bp,bp->b", rows, rows, dtype=np.float64)


def dense_kernel(part: Any, n: int) -> np.ndarray:
    """``||Σ_t a_t δ_tᵀ||²``, by whichever of three forms touches the fewest numbers."""
    d = np.asarray(part.deltas)[:n].astype(np.float64)
    a = np.asarray(part.inputs)[:n].astype(np.float64)
    positions, fan_in, fan_out = a.shape[1], a.shape[2], d.shape[2]
    if positions == 1:  # ||a||² ||δ||²
        return np.einsum("bti,bti->b", a, a) * np.einsum("bto,bto->b", d, d)
    if positions * positions <= fan_in * fan_out:  # Σ_{t,s} (a_t·a_s)(δ_t·δ_s)
        return np.einsum("bts,bts->b", gram(a), gram(d))
    grads = np.matmul(a.transpose(0, 2, 1), d)  # fewer numbers than the Gram matrices
    return np.einsum("bio,bio->b", grads, grads)


def einsum_kernel(part: Any, n: int) -> np.ndarray:
    """An EinsumDense kernel's: the Dense closed form where its letters allow
    (``_einsum.as_matmul``), else of the rows formed whole."""
    factors = einsum.as_matmul(part, n)
    if factors is None:
        return from_rows64(einsum.kernel_rows64)(part, n)
    return dense_kernel(part._replace(inputs=factors[0], deltas=factors[1]), n)


def einsum_kernel_inner(part: Any, n: int) -> np.ndarray:
    """``⟨row_i, R⟩`` of an EinsumDense kernel (R the offset): the Dense closed form where its
    letters allow, else of the rows formed whole."""
    factors = einsum.as_matmul(part, n)
    offset = np.asarray(part.offset, np.float64)
    if factors is None:
        return einsum.kernel_rows64(part, n).reshape(n, -1) @ offset.ravel()
    inputs, deltas = factors
    return dense_kernel_inner(part._replace(
        inputs=inputs, deltas=deltas,
        offset=offset.reshape(inputs.shape[2], deltas.shape[2])), n)


def bias(part: Any, n: int) -> np.ndarray:
    """``||Σ_t δ_t||²`` (a Dense bias)."""
    summed = positions_summed(np.asarray(part.deltas)[:n], np.float64)
    return np.einsum("bo,bo->b", summed, summed)


def embeddings(part: Any, n: int) -> np.ndarray:
    """``Σ_{t,s} [id_t = id_s] (δ_t·δ_s)``: positions with the same id add into one row."""
    d = np.asarray(part.deltas)[:n].astype(np.float64)
    ids = np.asarray(part.inputs)[:n]
    same = (ids[:, :, None] == ids[:, None, :]).astype(np.float64)
    return np.einsum("bts,bts->b", same, gram(d))


def conv_kernel(part: Any, n: int) -> np.ndarray:
    """A convolution's kernel gradients formed a block of examples at a time, then squared."""
    return conv.kernel_squared_norms(np.asarray(part.inputs)[:n],
                                     np.asarray(part.deltas)[:n], part.geometry)


def transposed_kernel(part: Any, n: int) -> np.ndarray:
    """A transposed convolution's kernel gradients formed a block of examples at a time."""
    return conv.transposed_squared_norms(np.asarray(part.inputs)[:n],
                                         np.asarray(part.deltas)[:n], part.geometry)


def depthwise_kernel(part: Any, n: int) -> np.ndarray:
    """A depthwise convolution's kernel gradients formed a block of examples at a time."""
    deltas = np.asarray(part.deltas)[:n]
    channels = part.inputs.shape[2 if part.geometry.channels_first else -1]
    multiplier = deltas.shape[2 if part.geometry.channels_first else -1] // channels
    return conv.depthwise_squared_norms(np.asarray(part.inputs)[:n], deltas, part.geometry,
                                        multiplier)


def conv_bias(part: Any, n: int) -> np.ndarray:
    """``||Σ_t δ_t||²`` over every call and output position of a convolution."""
    summed = positions_summed(conv.bias_deltas(part.deltas, part.geometry)[:n], np.float64)
    return np.einsum("bo,bo->b", summed, summed)


def from_rows64(rows64: Callable) -> Callable:
    """Squared norms of a role whose rows ``rows64(factor, n)`` are formed whole."""
    def squared(part: Any, n: int) -> np.ndarray:
        rows = rows64(part, n).reshape(n, -1)
        return np.einsum("bp,bp->b", rows, rows)

    return squared


def gram(x: np.ndarray) -> np.ndarray:
    """``x xᵀ`` per example: (n, T, k) -> (n, T, T)."""
    return np.matmul(x, x.transpose(0, 2, 1))


def dense_kernel_inner(part: Any, n: int) -> np.ndarray:
    """``⟨Σ_t a_t δ_tᵀ, R⟩ = Σ_t (a_t R)·δ_t`` with R the Factor's offset."""
    a = np.asarray(part.inputs)[:n].astype(np.float64)
    d = np.asarray(part.deltas)[:n].astype(np.float64)
    return np.einsum("bto,bto->b", a @ np.asarray(part.offset, dtype=np.float64), d)


def bias_inner(part: Any, n: int) -> np.ndarray:
    """``⟨Σ_t δ_t, r⟩`` (a Dense bias; a convolution's over every call and output position)
    with r the Factor's offset."""
    deltas = np.asarray(part.deltas) if part.geometry is None \
        else conv.bias_deltas(part.deltas, part.geometry)
    return positions_summed(deltas[:n], np.float64) @ np.asarray(part.offset, np.float64)


#: Rows formed at once for the norms of a regularized variable (`offset_squared`)
OFFSET_BLOCK_BYTES = 16 * 2**20


def offset_squared(part: Any, n: int, write: Callable) -> np.ndarray:
    """``||row_i + offset||²`` of a Factor with a regularizer's gradient (``part.offset``) for a
    role without an inner product in closed form: the rows written by `write` (its role's
    writer) in float64, a block of examples at a time."""
    offset = np.asarray(part.offset, dtype=np.float64)
    step = max(1, OFFSET_BLOCK_BYTES // (8 * max(1, offset.size)))
    inputs, deltas = part.inputs, np.asarray(part.deltas)
    squares = np.empty(n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = part._replace(
            inputs=None if inputs is None else np.asarray(inputs)[start:stop],
            deltas=deltas[start:stop], offset=None)
        rows = np.empty((stop - start, *offset.shape))
        write(block, rows)
        rows += offset
        squares[start:stop] = np.einsum("bp,bp->b", *(rows.reshape(stop - start, -1),) * 2)
    return squares
