"""Convolution factors: geometry, per-example kernel gradients and their norms (NumPy).

Example i's kernel gradient is the Dense factor sum over the output positions t,

    g_W[i] = Σ_t patch_t(a_i) δ_itᵀ

where ``patch_t(a_i)`` is the (dilated) window of the padded layer input under position t and
``δ_it`` the gradient at the pre-activation there. The windows are strided views of the input
(`sliding_window_view`); one block of examples' patches at a time is copied into a matrix
and multiplied by the deltas (im2col).
The padding is the one Keras applies: none ("valid"), the total split with the extra element
after ("same", as TensorFlow, XLA and Keras' torch backend), or all before ("causal").
A grouped convolution is one such convolution per group (its channels to its filters); a
transposed one is the convolution it transposes with the roles of input and δ swapped
(`transposed_rows`); a separable one's two kernels come from the full convolution's kernel
gradient and the other kernel's values (`separable_rows`).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from gradkit._parallel import in_blocks

#: Bytes of input patches one block of examples may copy.
PATCH_BLOCK_BYTES = 8 * 2**20


class Geometry(NamedTuple):
    kernel_size: tuple
    strides: tuple
    dilation: tuple
    padding: str  # "valid" | "same" | "causal"
    channels_first: bool
    #: input channels and filters split into this many groups in order, group g's filters
    #: seeing only group g's channels (the kernel holds one group's channels)
    groups: int = 1


def conv_geometry(layer: Any) -> Geometry:
    """The geometry of a Keras (3 or 2) Conv1D/2D/3D layer."""
    rank = len(layer.kernel_size)

    def per_axis(value: Any) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank

    return Geometry(tuple(layer.kernel_size), per_axis(layer.strides),
                    per_axis(layer.dilation_rate), str(layer.padding).lower(),
                    layer.data_format == "channels_first", int(getattr(layer, "groups", 1)))


def bias_deltas(deltas: Any, geometry: Geometry) -> np.ndarray:
    """(n, positions, filters): every call's and position's δ, channels last."""
    d = _channels_last(np.asarray(deltas), geometry)
    return d.reshape(len(d), -1, d.shape[-1])


def kernel_rows(inputs: Any, deltas: Any, geometry: Geometry, out: np.ndarray) -> None:
    """Write ``out[i] = g_W[i]`` (shape ``(n, *kernel_size, in_channels / groups, filters)``)
    from inputs (n, calls, *input shape) and deltas (n, calls, *output shape)."""
    def store(rows: slice, filters: slice, grads: np.ndarray) -> None:
        block = out[rows][..., filters]
        block[...] = grads.reshape(block.shape)

    _grouped(inputs, deltas, geometry, store)


def kernel_squared_norms(inputs: Any, deltas: Any, geometry: Geometry) -> np.ndarray:
    """||g_W[i]||² per example, forming one block of examples' kernel gradients at a time."""
    squared = np.zeros(len(inputs), np.float64)

    def store(rows: slice, filters: slice, grads: np.ndarray) -> None:
        flat = grads.reshape(len(grads), -1)
        squared[rows] += np.einsum("bk,bk->b", flat, flat, dtype=np.float64)

    _grouped(inputs, deltas, geometry, store)
    return squared


def transposed_rows(inputs: Any, deltas: Any, geometry: Geometry, out: np.ndarray) -> None:
    """Write a transposed convolution's kernel rows (n, *kernel_size, filters, in_channels).

    ``z = Cᵀ a`` for the convolution C with this kernel and geometry that maps the layer's
    output shape to its input shape, so ``∂⟨δ, Cᵀ a⟩/∂K = ∂⟨C δ, a⟩/∂K``: the kernel
    gradient of C with δ as its input and the layer input as its output gradient."""
    kernel_rows(deltas, inputs, geometry, out)


def transposed_squared_norms(inputs: Any, deltas: Any, geometry: Geometry) -> np.ndarray:
    """||g_K[i]||² per example of a transposed convolution (see `transposed_rows`)."""
    return kernel_squared_norms(deltas, inputs, geometry)


class Separable(NamedTuple):
    """A separable convolution's geometry (its depthwise stage's; the pointwise stage is 1x1)
    and the values of its two kernels when the factors were taken."""

    kernel_size: tuple
    strides: tuple
    dilation: tuple
    padding: str
    channels_first: bool
    depthwise: np.ndarray  # (*kernel_size, channels, multiplier)
    pointwise: np.ndarray  # (1, ..., channels * multiplier, filters)
    groups: int = 1


def separable_geometry(layer: Any) -> Separable:
    """The geometry and current kernel values of a Keras (3 or 2) SeparableConv1D/2D."""
    return Separable(*conv_geometry(layer)[:5], np.asarray(layer.depthwise_kernel),
                     np.asarray(layer.pointwise_kernel))


def separable_rows(inputs: Any, deltas: Any, geometry: Separable) -> tuple:
    """(depthwise rows (n, *kernel_size, C, M), pointwise rows (n, 1, ..., C·M, F)) of
    ``z = P ∘ D(a)``, from G = the full convolution's kernel rows of (a, δ) (n, *k, C, F),
    formed a block of examples at a time (G is k·C·F numbers an example):

        g_D[k, c, m] = Σ_f G[k, c, f] P[c·M + m, f]
        g_P[c·M + m, f] = Σ_k D[k, c, m] G[k, c, f]
    """
    a, d = np.asarray(inputs), np.asarray(deltas)
    channels, multiplier = geometry.depthwise.shape[-2:]
    filters = geometry.pointwise.shape[-1]
    pointwise = geometry.pointwise.reshape(channels, multiplier, filters).astype(d.dtype)
    depthwise = geometry.depthwise.reshape(-1, channels, multiplier).astype(d.dtype)
    rows_d = np.empty((len(d), *geometry.depthwise.shape), d.dtype)
    rows_p = np.empty((len(d), channels, multiplier, filters), d.dtype)
    step = max(1, PATCH_BLOCK_BYTES // (depthwise.shape[0] * channels * filters * d.itemsize))
    for start in range(0, len(d), step):
        rows = slice(start, start + step)
        full = np.empty((len(d[rows]), *geometry.kernel_size, channels, filters), d.dtype)
        kernel_rows(a[rows], d[rows], geometry, full)
        full = full.reshape(len(full), -1, channels, filters)
        rows_d[rows] = np.einsum("nkcf,cmf->nkcm", full, pointwise).reshape(
            rows_d[rows].shape)
        rows_p[rows] = np.einsum("kcm,nkcf->ncmf", depthwise, full)
    return rows_d, rows_p.reshape(len(d), *geometry.pointwise.shape)


def separable_rows64(stage: int) -> Callable:
    """``(factor, n) -> (n, ...) float64`` rows of a separable convolution's depthwise (0) or
    pointwise (1) kernel, for the registry's roles whose rows are formed whole."""
    def rows64(part: Any, n: int) -> np.ndarray:
        return separable_rows(np.asarray(part.inputs)[:n], np.asarray(part.deltas)[:n],
                              part.geometry)[stage].astype(np.float64)

    return rows64


def transposable(layer: Any) -> bool:
    """A transposed convolution whose output the convolution it transposes maps back to the
    input's shape under the layer's own padding ("valid" or "same"). With ``output_padding``
    too: the rows it adds at the end lie past every window of that convolution ("valid"),
    or the "same" padding of the longer output is what the framework pads. Checked against a
    loop of single-example gradients on every flavour for kernels 2-4, strides 2-3 and every
    output_padding, and on JAX and torch (TensorFlow's CPU kernels take no dilation) for
    kernels 2-4 and dilations 2-3 with ``output_padding=0``, the one Keras allows with a
    dilation, whose "same" output can be one shorter than the input."""
    return str(layer.padding).lower() in ("valid", "same")


def _grouped(inputs: Any, deltas: Any, geometry: Geometry, store: Callable) -> None:
    """``store(rows, filters, g_W[rows][..., filters])`` group by group: a grouped
    convolution is one convolution per group, of its channels to its filters."""
    a = _channels_last(np.asarray(inputs), geometry)
    d = _channels_last(np.asarray(deltas), geometry)
    channels, filters = a.shape[-1] // geometry.groups, d.shape[-1] // geometry.groups
    for g in range(geometry.groups):
        own = slice(g * filters, (g + 1) * filters)
        _blockwise(a[..., g * channels:(g + 1) * channels], d[..., own], geometry,
                   lambda rows, grads, own=own: store(rows, own, grads))


def depthwise_rows(inputs: Any, deltas: Any, geometry: Geometry, out: np.ndarray) -> None:
    """Write ``out[i] = g_K[i]`` (shape ``(n, *kernel_size, channels, multiplier)``) of a
    depthwise convolution: channel c's kernel sees only input channel c, and output channel
    ``c * multiplier + m`` is its m-th filter."""
    def store(rows: slice, grads: np.ndarray) -> None:
        out[rows] = grads

    _depthwise_blockwise(inputs, deltas, geometry, out.shape[-1], store)


def depthwise_squared_norms(inputs: Any, deltas: Any, geometry: Geometry,
                            multiplier: int) -> np.ndarray:
    """||g_K[i]||² per example of a depthwise convolution, a block of examples at a time."""
    squared = np.empty(len(inputs), np.float64)

    def store(rows: slice, grads: np.ndarray) -> None:
        flat = grads.reshape(len(grads), -1)
        squared[rows] = np.einsum("bk,bk->b", flat, flat, dtype=np.float64)

    _depthwise_blockwise(inputs, deltas, geometry, multiplier, store)
    return squared


def _depthwise_blockwise(inputs: Any, deltas: Any, geometry: Geometry, multiplier: int,
                         store: Callable) -> None:
    """``store(rows, g_K[rows])`` (n, *kernel_size, channels, multiplier) for blocks of
    examples: per kernel offset, the strided input under it dotted with the deltas over every
    call and position, channel by channel (a few times faster than one einsum over the
    windows, which NumPy cannot hand to BLAS)."""
    a = _channels_last(np.asarray(inputs), geometry)
    d = _channels_last(np.asarray(deltas), geometry)
    channels = a.shape[-1]
    windows = _patches(a, d.shape[2:-1], geometry)  # (n, calls, *positions, C, *kernel)
    positions = "np" + "ijk"[:len(geometry.kernel_size)]
    offsets = list(itertools.product(*(range(k) for k in geometry.kernel_size)))

    def block(rows: slice) -> None:
        d_rows = d[rows]
        grads = np.empty((len(d_rows), *geometry.kernel_size, channels, multiplier), d.dtype)
        if multiplier == 1:  # one dot per channel: no filter axis to carry
            for offset in offsets:
                grads[(slice(None), *offset, slice(None), 0)] = np.einsum(
                    f"{positions}c,{positions}c->nc", windows[(rows, Ellipsis, *offset)], d_rows)
        else:
            d_rows = d_rows.reshape(*d_rows.shape[:-1], channels, multiplier)
            for offset in offsets:
                grads[(slice(None), *offset)] = np.einsum(
                    f"{positions}c,{positions}cm->ncm", windows[(rows, Ellipsis, *offset)],
                    d_rows)
        store(rows, grads)

    per_example = max(1, int(np.prod(d.shape[1:])) * (1 + int(np.prod(geometry.kernel_size)))
                      * a.itemsize)
    in_blocks(len(a), per_example * len(a), block, PATCH_BLOCK_BYTES // per_example)


def _blockwise(a: np.ndarray, d: np.ndarray, geometry: Geometry, store: Callable) -> None:
    """``store(rows, g_W[rows])`` (flattened to (n, kernel positions x channels, filters))
    for blocks of examples, in parallel: im2col of the block, then a batched matmul. `a` and
    `d` are channels last."""
    windows = _patches(a, d.shape[2:-1], geometry)  # (n, calls, *positions, C, *kernel)
    rank = len(geometry.kernel_size)
    positions, channel, kernel = (range(2, 2 + rank), 2 + rank,
                                  range(3 + rank, 3 + 2 * rank))
    width = int(np.prod(geometry.kernel_size)) * a.shape[-1]
    # The copy runs along the last axis of the patches: C channels at a time when they come
    # last (the kernel's own order); with few channels, a run along an output row is longer
    # (C = 1 on a 26-wide row: 23 against 160 µs), so the patches are laid out transposed.
    by_rows = a.shape[-1] <= 4 and 4 * a.shape[-1] < d.shape[-2]
    order = (0, *kernel, channel, 1, *positions) if by_rows else (0, 1, *positions, *kernel,
                                                                  channel)

    def block(rows: slice) -> None:
        patches = np.ascontiguousarray(windows[rows].transpose(order))
        n = len(patches)
        patches = (patches.reshape(n, width, -1) if by_rows
                   else patches.reshape(n, -1, width).transpose(0, 2, 1))
        store(rows, np.matmul(patches, d[rows].reshape(n, -1, d.shape[-1])))

    per_example = max(1, int(np.prod(windows.shape[1:])) * a.itemsize)
    in_blocks(len(a), per_example * len(a), block, PATCH_BLOCK_BYTES // per_example)


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
    if any(any(pad) for pad in pads):  # (np.pad copies even when it adds nothing)
        a = np.pad(a, [(0, 0), (0, 0), *pads, (0, 0)])
    windows = sliding_window_view(a, spans, axis=tuple(range(2, 2 + len(spans))))
    index = (slice(None), slice(None),
             *[slice(0, (size - 1) * s + 1, s) for s, _, size in steps], slice(None),
             *[slice(None, None, dil) for _, dil, _ in steps])
    return windows[index]
