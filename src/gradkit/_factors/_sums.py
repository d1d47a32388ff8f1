"""Weighted sums of per-example gradients from their factors: one form per role.

Every function is ``(factor, weights, shape) -> array of shape`` (`shape`: the variable's),
with `weights` of shape (n,) for the first n examples, and equals ``Σ_i weights[i] · row_i`` for the rows the role's writer
(``gradkit._factors._rows``) would write, without forming the rows where the factors allow:

    Σ_i w_i Σ_t a_it δ_itᵀ = Aᵀ (w ⊙ Δ)        (every position of every example, one matmul)
    Σ_i w_i Σ_t δ_it                            (a bias)
    Σ_i w_i Σ_t δ_it scattered into row id_it   (an embedding)

A convolution's (depthwise, transposed and separable too) per-example kernel gradients are
small: they are formed a block of examples at a time from the reweighted deltas and summed;
an EinsumDense kernel's sum is one einsum of the inputs with the reweighted deltas;
normalization rows are formed and weighted. The sums are float64.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradkit._factors import _conv as conv
from gradkit._factors._positions import positions_summed


def array_sum(rows: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """``Σ_i w_i rows[i]`` of materialized (n, ...) rows (or a list of one array per
    example)."""
    if isinstance(rows, list):
        total = np.zeros(shape, np.float64)
        for w, example in zip(weights.tolist(), rows):
            total += w * np.reshape(example, shape)
        return total
    rows = np.asarray(rows)[:len(weights)].reshape(len(weights), -1)
    return (weights @ rows.astype(np.float64, copy=False)).reshape(shape)


def dense_kernel(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """``Aᵀ (w ⊙ Δ)`` over every position of every example."""
    a, d = _weighted(part, weights)
    total = a.reshape(-1, a.shape[-1]).T @ d.reshape(-1, d.shape[-1])
    return total.reshape(shape).astype(np.float64)


def bias(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    _, d = _weighted(part, weights, inputs=False)
    return positions_summed(d.reshape(1, -1, d.shape[-1]), np.float64).reshape(shape)


def embeddings(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """The reweighted deltas added into the rows of their ids."""
    _, d = _weighted(part, weights, inputs=False)
    ids = np.asarray(part.inputs)[:len(weights)].astype(np.intp).ravel()
    total = np.zeros(shape, np.float64)
    np.add.at(total, ids, d.reshape(-1, d.shape[-1]).astype(np.float64))
    return total


def conv_kernel(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """Per-example kernel gradients of the reweighted deltas, summed."""
    return _summed_rows(conv.kernel_rows, part, weights, shape)


def transposed_kernel(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """Per-example transposed-convolution kernel gradients of the reweighted deltas, summed."""
    return _summed_rows(conv.transposed_rows, part, weights, shape)


def depthwise_kernel(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """Per-example depthwise kernel gradients of the reweighted deltas, summed."""
    return _summed_rows(conv.depthwise_rows, part, weights, shape)


def _summed_rows(write: Any, part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    """``write(inputs, w ⊙ deltas, geometry, rows)`` for the first n examples, summed."""
    n = len(weights)
    _, d = _weighted(part, weights, inputs=False)
    rows = np.empty((n, *shape), d.dtype)
    write(np.asarray(part.inputs)[:n].astype(d.dtype), d, part.geometry, rows)
    return rows.sum(axis=0, dtype=np.float64)


def conv_bias(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
    deltas = conv.bias_deltas(part.deltas, part.geometry)[:len(weights)]
    return (weights @ positions_summed(deltas, np.float64)).reshape(shape)


def from_rows64(rows64: Callable) -> Callable:
    """The weighted sum of a role whose rows ``rows64(factor, n)`` are formed whole."""
    def total(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
        rows = rows64(part, len(weights)).reshape(len(weights), -1)
        return (weights.astype(np.float64) @ rows).reshape(shape)

    return total


def _weighted(part: Any, weights: np.ndarray, inputs: bool = True) -> tuple:
    """(inputs, deltas · w) of the first n examples in the factors' float dtype (at least
    float32); deltas keep their layout."""
    n = len(weights)
    deltas = np.asarray(part.deltas)[:n]
    dtype = np.promote_types(deltas.dtype, np.float32)
    d = deltas * weights.astype(dtype).reshape((n,) + (1,) * (deltas.ndim - 1))
    a = np.asarray(part.inputs)[:n].astype(dtype, copy=False) if inputs else None
    return a, d
