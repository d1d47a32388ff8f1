"""From recorded layer inputs and pre-activation gradients to factor arrays, per layout.

The adapter records, per call of a planned layer, batched per-example tensors shaped
(n, 1, ..., features). Each layer kind joins its calls along axis 1 in one layout:

- `features` (Dense): inputs (n, T, in) and deltas (n, T, out), every position of every call
  along T;
- `ids` (Embedding): ids (n, T), in their own integer dtype (floats cast to int32, as the
  layer does), and deltas (n, T, dim);
- `spatial` (Conv): inputs (n, calls, *input shape) and deltas (n, calls, *output shape),
  spatial shapes kept for the convolution's geometry.

Factors are in `dtype` (float32, or float64 for float64 layers); the deltas are divided by the
loss `scale` after that cast, so float16 gradients are unscaled without underflow.
Framework-free: the adapter passes its `Ops`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Ops(NamedTuple):
    """The few tensor functions `factor_arrays` needs, from the adapter's framework."""

    reshape: Callable
    cast: Callable
    concat: Callable  # (list of tensors) -> joined along axis 1


def features(a_calls: list, d_calls: list, ops: Ops, dtype: str, scale: Any) -> tuple:
    """(inputs (n, T, in), deltas (n, T, out))."""
    d = _unscaled(ops.concat([_positions(x, ops, dtype) for x in d_calls]), ops, dtype, scale)
    return ops.concat([_positions(x, ops, dtype) for x in a_calls]), d


def ids(a_calls: list, d_calls: list, ops: Ops, dtype: str, scale: Any) -> tuple:
    """(ids (n, T), deltas (n, T, out)). Ids that arrive as floats (a model whose Input has
    no ``dtype="int32"``) are cast to int32, as the Embedding layer casts them."""
    d = _unscaled(ops.concat([_positions(x, ops, dtype) for x in d_calls]), ops, dtype, scale)
    return ops.concat([_positions(x, ops, None if "int" in str(x.dtype) else "int32",
                                  keep_last=False) for x in a_calls]), d


def spatial(a_calls: list, d_calls: list, ops: Ops, dtype: str, scale: Any) -> tuple:
    """(inputs (n, calls, *input shape), deltas (n, calls, *output shape))."""
    d = ops.concat([ops.cast(x, dtype) for x in d_calls])
    a = ops.concat([ops.cast(x, dtype) for x in a_calls])
    return a, _unscaled(d, ops, dtype, scale)


def _unscaled(d: Any, ops: Ops, dtype: str, scale: Any) -> Any:
    return d if scale is None else d / ops.cast(scale, dtype)


def _positions(x: Any, ops: Ops, dtype: Any, keep_last: bool = True) -> Any:
    """(n, T, features) (or (n, T) ids) from a batched per-example (n, 1, ..., features)."""
    shape = tuple(x.shape)
    inner = shape[1:-1] if keep_last else shape[1:]
    positions = 1
    for size in inner:
        positions *= int(size)
    x = ops.reshape(x, (-1, positions, int(shape[-1])) if keep_last else (-1, positions))
    return x if dtype is None else ops.cast(x, dtype)
