"""BatchNormalization with its moving statistics: per-example γ and β gradients (NumPy).

In inference a BatchNormalization layer is a fixed affine map per channel,
``y = γ (a − μ) / √(σ² + ε) + β`` with the moving mean μ and variance σ², so example i's
gradients sum its output gradients δ over every call and position t of the channel:

    g_γ[i] = Σ_t δ_it (a_it − μ) / √(σ² + ε)        g_β[i] = Σ_t δ_it

The factors are the layer input ``a`` and δ at the layer's output, in the `spatial` layout
(n, calls, *input shape), and the layer's `Moments`. They hold only where the moving
statistics are used: per-example work refuses ``training=True`` through a trainable
BatchNormalization (it couples the examples), so the factors are never taken in training.
Rows are (n, channels): every role forms them, small, in float64.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np


class Moments(NamedTuple):
    axis: int  # the channel axis of the factors (n, calls, *input shape); negative from the end
    mean: np.ndarray  # (channels,) float64
    variance: np.ndarray
    epsilon: float


def moments(layer: Any) -> Moments:
    """The channel axis and moving statistics of a Keras (3 or 2) BatchNormalization layer,
    read now (the factors were taken at the same weights: gradkit changes no state)."""
    axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else int(layer.axis)
    return Moments(axis + 1 if axis > 0 else axis,  # the factors insert a calls axis
                   np.asarray(layer.moving_mean, np.float64).reshape(-1),
                   np.asarray(layer.moving_variance, np.float64).reshape(-1),
                   float(layer.epsilon))


def plain(layer: Any) -> bool:
    """A single channel axis and none of the training-time variants (renorm, virtual
    batches, a custom adjustment) that tf-keras' inference path may still apply."""
    axis = layer.axis
    single = not isinstance(axis, (list, tuple)) or len(axis) == 1
    return (single and not getattr(layer, "renorm", False)
            and getattr(layer, "virtual_batch_size", None) is None
            and getattr(layer, "adjustment", None) is None)


def scale_rows64(part: Any, n: int) -> np.ndarray:
    """(n, channels) float64 ``g_γ``."""
    a, d = _channels_last(part.inputs, part.geometry, n), _channels_last(part.deltas,
                                                                        part.geometry, n)
    centered = a - part.geometry.mean.astype(a.dtype)
    summed = np.einsum("ntc,ntc->nc", d, centered, dtype=np.float64)
    return summed / np.sqrt(part.geometry.variance + part.geometry.epsilon)


def offset_rows64(part: Any, n: int) -> np.ndarray:
    """(n, channels) float64 ``g_β``."""
    return _channels_last(part.deltas, part.geometry, n).sum(axis=1, dtype=np.float64)


def writer(rows64: Callable) -> Callable:
    """The role's rows writer ``(factor, out, product) -> finite``."""
    def write(part: Any, out: np.ndarray, product: Callable | None = None) -> bool:
        out[...] = rows64(part, out.shape[0]).reshape(out.shape)
        return bool(np.isfinite(out).all())

    return write


def squared(rows64: Callable) -> Callable:
    """The role's squared norms ``(factor, n) -> (n,)``."""
    def norms(part: Any, n: int) -> np.ndarray:
        rows = rows64(part, n)
        return np.einsum("bc,bc->b", rows, rows)

    return norms


def summed(rows64: Callable) -> Callable:
    """The role's weighted sum ``(factor, weights, shape) -> Σ_i w_i row_i``."""
    def total(part: Any, weights: np.ndarray, shape: tuple) -> np.ndarray:
        return (weights.astype(np.float64) @ rows64(part, len(weights))).reshape(shape)

    return total


def _channels_last(x: Any, geometry: Moments, n: int) -> np.ndarray:
    """(n, positions, channels) of the first n examples."""
    x = np.moveaxis(np.asarray(x)[:n], geometry.axis, -1)
    return x.reshape(n, -1, x.shape[-1])
