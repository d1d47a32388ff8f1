"""BatchNormalization (moving statistics), Layer- and GroupNormalization: per-example γ and
β gradients (NumPy).

In inference a BatchNormalization layer is a fixed affine map per channel,
``y = γ (a − μ) / √(σ² + ε) + β`` with the moving mean μ and variance σ², so example i's
gradients sum its output gradients δ over every call and position t of the channel:

    g_γ[i] = Σ_t δ_it (a_it − μ) / √(σ² + ε)        g_β[i] = Σ_t δ_it

The factors are the layer input ``a`` and δ at the layer's output, in the `spatial` layout
(n, calls, *input shape), and the layer's `Moments`. They hold only where the moving
statistics are used: per-example work refuses ``training=True`` through a trainable
BatchNormalization (it couples the examples), so the factors are never taken in training.
A LayerNormalization normalizes each position of each example by its own mean and variance
over the feature axis, ``â = (a − mean(a)) / √(var(a) + ε)`` (no other example enters), so
``g_γ[i] = Σ_t δ_it â_it`` with â recomputed from the recorded input, and β as above.
A GroupNormalization does the same per group of channels over every position of one call
of one example. Rows are (n, channels): every role forms them, small, in float64, from sums
over the positions taken in the factors' precision (float32 for float32 layers, as the
framework's own gradient takes them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from gradkit._factors._positions import positions_summed


class Moments(NamedTuple):
    axis: int  # the channel axis of the factors (n, calls, *input shape); negative from the end
    mean: np.ndarray  # (channels,) float64
    variance: np.ndarray
    epsilon: float


def moments(layer: Any) -> Moments:
    """The channel axis and moving statistics of a Keras (3 or 2) BatchNormalization layer,
    read now (the factors were taken at the same weights: gradkit changes no state)."""
    return Moments(_factor_axis(layer), np.asarray(layer.moving_mean, np.float64).reshape(-1),
                   np.asarray(layer.moving_variance, np.float64).reshape(-1),
                   float(layer.epsilon))


class Features(NamedTuple):
    """A LayerNormalization's feature axis in the factors' layout, and its epsilon."""

    axis: int
    epsilon: float


def features(layer: Any) -> Features:
    return Features(_factor_axis(layer), float(layer.epsilon))


def plain_layer_normalization(layer: Any) -> bool:
    """One feature axis and the centred form (not Keras 3's `rms_scaling`)."""
    return _single_axis(layer) and not getattr(layer, "rms_scaling", False)


def normalized_scale_rows64(part: Any, n: int) -> np.ndarray:
    """(n, features) float64 ``g_γ`` of a LayerNormalization: â from the input itself, in
    the factors' precision (as the framework normalizes), δ â summed over positions."""
    a, d = _channels_last(part.inputs, part.geometry, n), _channels_last(part.deltas,
                                                                        part.geometry, n)
    work = np.result_type(a.dtype, d.dtype, np.float32)
    products = np.subtract(a, a.mean(axis=-1, keepdims=True, dtype=work), dtype=work)
    variance = np.einsum("ntc,ntc->nt", products, products)[..., None] / a.shape[-1]
    np.multiply(products, d, out=products)
    np.divide(products, np.sqrt(variance + part.geometry.epsilon, dtype=work), out=products)
    return positions_summed(products, np.float64)


class Groups(NamedTuple):
    """A GroupNormalization's channel axis in the factors' layout, groups and epsilon."""

    axis: int
    groups: int
    epsilon: float


def groups(layer: Any) -> Groups:
    return Groups(_factor_axis(layer), int(layer.groups), float(layer.epsilon))


def grouped_scale_rows64(part: Any, n: int) -> np.ndarray:
    """(n, channels) float64 ``g_γ`` of a GroupNormalization: each call of each example
    normalized by its own moments per group (over its positions and the group's channels)."""
    geometry = part.geometry
    a = np.moveaxis(np.asarray(part.inputs)[:n], geometry.axis, -1).astype(np.float64)
    channels, calls = a.shape[-1], a.shape[1]
    a = a.reshape(n, calls, -1, geometry.groups, channels // geometry.groups)
    centered = a - a.mean(axis=(2, 4), keepdims=True)
    normalized = centered / np.sqrt((centered * centered).mean(axis=(2, 4), keepdims=True)
                                    + geometry.epsilon)
    d = np.moveaxis(np.asarray(part.deltas)[:n], geometry.axis, -1)
    return np.einsum("nkpc,nkpc->nc", d.reshape(n, calls, -1, channels),
                     normalized.reshape(n, calls, -1, channels))


def plain(layer: Any) -> bool:
    """A single channel axis and none of the training-time variants (renorm, virtual
    batches, a custom adjustment) that tf-keras' inference path may still apply."""
    return (_single_axis(layer) and not getattr(layer, "renorm", False)
            and getattr(layer, "virtual_batch_size", None) is None
            and getattr(layer, "adjustment", None) is None)


def scale_rows64(part: Any, n: int) -> np.ndarray:
    """(n, channels) float64 ``g_γ``."""
    a, d = _channels_last(part.inputs, part.geometry, n), _channels_last(part.deltas,
                                                                        part.geometry, n)
    work = np.result_type(a.dtype, d.dtype, np.float32)
    products = np.subtract(a, part.geometry.mean.astype(work), dtype=work)
    np.multiply(products, d, out=products)  # δ (a − μ), summed over positions by BLAS
    return (positions_summed(products, np.float64)
            / np.sqrt(part.geometry.variance + part.geometry.epsilon))


def offset_rows64(part: Any, n: int) -> np.ndarray:
    """(n, channels) float64 ``g_β``."""
    return positions_summed(_channels_last(part.deltas, part.geometry, n), np.float64)


def _single_axis(layer: Any) -> bool:
    return not isinstance(layer.axis, (list, tuple)) or len(layer.axis) == 1


def _factor_axis(layer: Any) -> int:
    """The layer's (single) channel axis in the factors' layout, which inserts a calls axis
    after the examples' (negative axes count from the end and stay)."""
    axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else int(layer.axis)
    return axis + 1 if axis > 0 else axis


def _channels_last(x: Any, geometry: Any, n: int) -> np.ndarray:
    """(n, positions, channels) of the first n examples."""
    x = np.moveaxis(np.asarray(x)[:n], geometry.axis, -1)
    return x.reshape(n, -1, x.shape[-1])
