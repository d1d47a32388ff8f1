"""Max pooling whose derivatives XLA computes fast on CPU, inside gradkit's JAX programs.

Keras pools with `lax.reduce_window`, whose gradient is XLA's select-and-scatter: on CPU
about 0.9 ms of a small CNN's 2 ms batch gradient (a 2×2 pooling of 16 × 26 × 26 × 16
values). Where the windows tile the input (strides equal to the pool size, no padding added),
the same maximum is a reshape and a `max` over each window, and its derivative the tangent at
the window's first maximum (a `custom_jvp`, linear in the tangent: JAX transposes it into a
masked broadcast, 0.09 ms). The first maximum on ties is select-and-scatter's own choice, and
windows that do not overlap add no two contributions, so gradients, per-example rows and
Hessian-vector products are Keras' own to rounding (XLA may order a sum differently).

`fast_max_pooling(model)` shadows the `call` of the model's max-pooling layers while gradkit
traces a program (a trace runs the Python once; the compiled program keeps the fast form).
Other pooling (overlapping windows, "same" padding that pads) and a pooling layer whose own
output is tapped (activation gradients, `locate_nonfinite`) run Keras' own call.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from gradkit._select import walk_layers
from gradkit._taps import restore, shadow


@contextlib.contextmanager
def fast_max_pooling(model: Any) -> Iterator[None]:
    """Within the block, `model`'s max-pooling layers pool with `tiled_max` where exact; not
    a layer whose call is already shadowed (an output tap, which must see its output)."""
    saved: list = []
    try:
        for _, layer in walk_layers(model):
            if _is_max_pooling(layer) and "call" not in vars(layer):
                shadow(layer, "call", _tiled_call(layer, layer.call), saved)
        yield
    finally:
        restore(saved)


def _is_max_pooling(layer: Any) -> bool:
    from keras.src.layers.pooling.base_pooling import BasePooling

    return (isinstance(layer, BasePooling) and getattr(layer, "pool_mode", None) == "max"
            and tuple(layer.pool_size) == tuple(layer.strides))


def _tiled_call(layer: Any, keras_call: Any) -> Any:
    @functools.wraps(keras_call)
    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        axes = _tiled_axes(layer, inputs)
        if args or kwargs or axes is None:
            return keras_call(inputs, *args, **kwargs)
        return tiled_max(inputs, axes, tuple(layer.pool_size))

    return call


def _tiled_axes(layer: Any, x: Any) -> tuple | None:
    """The pooled axes of `x` if `layer`'s windows tile them exactly (float values, static
    sizes, no padding added), else None."""
    if not (hasattr(x, "ndim") and jnp.issubdtype(x.dtype, jnp.floating)):
        return None
    axes = tuple(range(1, x.ndim - 1) if layer.data_format == "channels_last"
                 else range(2, x.ndim))
    sizes = [x.shape[axis] for axis in axes]
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        return None
    pads = layer.padding != "valid" and any(n % p for n, p in zip(sizes, layer.pool_size))
    return None if pads else axes


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def tiled_max(x: Any, axes: tuple, pool: tuple) -> Any:
    """The maximum over windows of size `pool` tiling `axes` of `x` (a trailing remainder
    shorter than a window is dropped, as "valid" pooling does)."""
    return jnp.max(_windows(x, axes, pool), axis=-1)


@tiled_max.defjvp
def _tiled_max_jvp(axes: tuple, pool: tuple, primals: tuple, tangents: tuple) -> tuple:
    (x,), (dx,) = primals, tangents
    windows = _windows(x, axes, pool)
    first = jnp.argmax(windows, axis=-1)[..., None]  # the first maximum, as XLA's gradient
    chosen = first == jnp.arange(windows.shape[-1])
    dwindows = _windows(dx, axes, pool)
    # the value through tiled_max again, so derivatives of this rule (a forward-over-reverse
    # product) keep the first maximum too, not `jnp.max`'s tie-sharing rule
    return (tiled_max(x, axes, pool),
            jnp.sum(jnp.where(chosen, dwindows, jnp.zeros((), dx.dtype)), axis=-1))


def _windows(x: Any, axes: tuple, pool: tuple) -> Any:
    """`x` with each window's values along a new last axis (window order: row-major)."""
    size = dict(zip(axes, pool))
    count = {a: x.shape[a] // p for a, p in size.items()}
    x = x[tuple(slice(0, count[a] * size[a]) if a in size else slice(None)
                for a in range(x.ndim))]
    shape: list = []
    for a in range(x.ndim):
        shape += [count[a], size[a]] if a in size else [x.shape[a]]
    x = x.reshape(shape)
    # pooled axis a (the j-th, axes ascending) is split into axes a + j and a + j + 1
    inner = [a + j + 1 for j, a in enumerate(axes)]
    outer = [d for d in range(x.ndim) if d not in inner]
    x = x.transpose(outer + inner)
    return x.reshape(x.shape[:len(outer)] + (math.prod(pool),))
