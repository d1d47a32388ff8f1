"""Per-example kernel gradients of convolutions from their factors (NumPy, framework-free).

Example i's kernel gradient is the Dense factor sum over the output positions t,

    g_W[i] = Σ_t patch_t(a_i) δ_itᵀ

where ``patch_t(a_i)`` is the (dilated) window of the padded layer input under position t and
``δ_it`` the gradient at the pre-activation there. The windows are strided views of the input
(`sliding_window_view`); one block of examples' patches at a time is copied into a matrix
and multiplied by the deltas (im2col).
The padding is the one Keras applies: none ("valid"), the total split with the extra element
after ("same", as TensorFlow, XLA and Keras' torch backend), or all before ("causal").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: Bytes of input patches one block of examples may copy.
PATCH_BLOCK_BYTES = 8 * 2**20


class Geometry(NamedTuple):
    kernel_size: tuple
    strides: tuple
    dilation: tuple
    padding: str  # "valid" | "same" | "causal"
    channels_first: bool


def conv_geometry(layer: Any) -> Geometry:
    """The geometry of a Keras (3 or 2) Conv1D/2D/3D layer."""
    rank = len(layer.kernel_size)

    def per_axis(value: Any) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank

    return Geometry(tuple(layer.kernel_size), per_axis(layer.strides),
                    per_axis(layer.dilation_rate), str(layer.padding).lower(),
                    layer.data_format == "channels_first")


def bias_deltas(deltas: Any, geometry: Geometry) -> np.ndarray:
    """(n, positions, filters): every call's and position's δ, channels last."""
    d = _channels_last(np.asarray(deltas), geometry)
    return d.reshape(len(d), -1, d.shape[-1])


def kernel_rows(inputs: Any, deltas: Any, geometry: Geometry, out: np.ndarray) -> None:
    """Write ``out[i] = g_W[i]`` (shape ``(n, *kernel_size, in_channels, filters)``) from
    inputs (n, calls, *input shape) and deltas (n, calls, *output shape)."""
    a = _channels_last(np.asarray(inputs), geometry)
    d = _channels_last(np.asarray(deltas), geometry)
    windows = _patches(a, d.shape[2:-1], geometry)  # (n, calls, *positions, C, *kernel)
    rank = len(geometry.kernel_size)
    order = (0, 1, *range(2, 2 + rank), *range(3 + rank, 3 + 2 * rank), 2 + rank)
    per_example = max(1, int(np.prod(windows.shape[1:])) * a.itemsize)
    step = max(1, PATCH_BLOCK_BYTES // per_example)
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        block = windows[rows].transpose(order)  # kernel axes before channels, as the kernel
        n = len(block)
        patches = np.ascontiguousarray(block).reshape(n, -1, int(np.prod(out.shape[1:-1])))
        grads = np.matmul(patches.transpose(0, 2, 1), d[rows].reshape(n, -1, d.shape[-1]))
        out[rows] = grads.reshape(out[rows].shape)


def kernel_squared_norms(inputs: Any, deltas: Any, geometry: Geometry) -> np.ndarray:
    """||g_W[i]||² per example, forming one block of examples' kernel gradients at a time."""
    a = _channels_last(np.asarray(inputs), geometry)
    d = _channels_last(np.asarray(deltas), geometry)
    kernel_shape = (*geometry.kernel_size, a.shape[-1], d.shape[-1])
    squared = np.empty(len(a), np.float64)
    step = max(1, PATCH_BLOCK_BYTES // (8 * int(np.prod(kernel_shape))))
    for start in range(0, len(a), step):
        rows = slice(start, min(start + step, len(a)))
        block = np.empty((rows.stop - start, *kernel_shape), np.float64)
        kernel_rows(a[rows].astype(np.float64), d[rows].astype(np.float64),
                    geometry._replace(channels_first=False), block)
        flat = block.reshape(len(block), -1)
        squared[rows] = np.einsum("bk,bk->b", flat, flat)
    return squared


def _channels_last(x: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(n, calls, *spatial, channels) from the layer's own layout."""
    return np.moveaxis(x, 2, -1) if geometry.channels_first else x


def _patches(a: np.ndarray, out_spatial: tuple, geometry: Geometry) -> np.ndarray:
    """A strided view (n, calls, *out_spatial, channels, *kernel_size) of the padded input."""
    pads, spans, steps = [], [], []
    for axis, size_out in enumerate(out_spatial):
        k, s, dil = (geometry.kernel_size[axis], geometry.strides[axis],
                     geometry.dilation[axis])
        span = (k - 1) * dil + 1
        total = max(0, (size_out - 1) * s + span - a.shape[2 + axis])
        before = {"causal": span - 1, "same": total // 2}.get(geometry.padding, 0)
        pads.append((before, max(0, total - before)))
        spans.append(span)
        steps.append((s, dil, size_out))
    a = np.pad(a, [(0, 0), (0, 0), *pads, (0, 0)])
    windows = sliding_window_view(a, spans, axis=tuple(range(2, 2 + len(spans))))
    index = (slice(None), slice(None),
             *[slice(0, (size - 1) * s + 1, s) for s, _, size in steps], slice(None),
             *[slice(None, None, dil) for _, dil, _ in steps])
    return windows[index]
