"""The few array functions the transforms use, for NumPy gradient sets and inside `fit`.

A transform's ``update`` is written once over an `ArrayOps`: `ops_for(grads)` gives NumPy's
for a gradient set of NumPy arrays (norms accumulated in float64), and the framework's for
framework tensors, which is what a transform sees inside the compiled train step of a
`wrap`-ped optimizer (``keras.ops`` on Keras 3, ``tensorflow`` on tf-keras; norms in
float32). Every function keeps each array's dtype; nothing branches on a value, so the same
code traces into a compiled step.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyOps:
    """NumPy gradient sets: exact float64 norms, arrays as they are."""

    name = "numpy"

    @staticmethod
    def is_array(g: Any) -> bool:
        return isinstance(g, np.ndarray) and g.dtype.kind == "f"

    @staticmethod
    def squared_norm(g: Any) -> Any:
        """``sum(g²)`` in float64 (float16 squared in float32: no overflow)."""
        return np.sum(np.square(g, dtype=np.promote_types(g.dtype, np.float32)),
                      dtype=np.float64)

    sqrt = staticmethod(np.sqrt)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def scaled(g: Any, factor: Any) -> Any:
        return np.asarray(g * factor).astype(g.dtype, copy=False)

    @staticmethod
    def clip(g: Any, lo: float, hi: float) -> Any:
        return np.clip(g, lo, hi).astype(g.dtype, copy=False)

    zeros_like = staticmethod(np.zeros_like)

    @staticmethod
    def all_finite(arrays: list) -> Any:
        return all(bool(np.all(np.isfinite(g))) for g in arrays)

    @staticmethod
    def where(condition: Any, g: Any, other: Any) -> Any:
        return g if condition else other


class KerasOps:
    """Framework tensors of Keras 3 (any backend), through ``keras.ops``."""

    name = "keras"

    def __init__(self) -> None:
        import keras

        self.ops = keras.ops

    def is_array(self, g: Any) -> bool:
        return hasattr(g, "dtype") and hasattr(g, "shape") and "float" in str(
            getattr(g.dtype, "name", g.dtype))

    def squared_norm(self, g: Any) -> Any:
        return self.ops.sum(self.ops.square(self.ops.cast(g, "float32")))

    def sqrt(self, x: Any) -> Any:
        return self.ops.sqrt(x)

    def minimum(self, a: Any, b: Any) -> Any:
        return self.ops.minimum(a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return self.ops.maximum(a, b)

    def scaled(self, g: Any, factor: Any) -> Any:
        return self.ops.cast(self.ops.cast(g, "float32") * factor, g.dtype)

    def clip(self, g: Any, lo: float, hi: float) -> Any:
        return self.ops.cast(self.ops.clip(self.ops.cast(g, "float32"), lo, hi), g.dtype)

    def zeros_like(self, g: Any) -> Any:
        return self.ops.zeros_like(g)

    def all_finite(self, arrays: list) -> Any:
        flags = [self.ops.all(self.ops.isfinite(g)) for g in arrays]
        return self.ops.all(self.ops.stack(flags)) if flags else True

    def where(self, condition: Any, g: Any, other: Any) -> Any:
        return self.ops.where(condition, g, other)


class TensorFlowOps(KerasOps):
    """tf-keras tensors: the same functions from ``tensorflow`` (no Keras 3 imported)."""

    name = "tensorflow"

    def __init__(self) -> None:  # noqa: D107 - the namespace is TensorFlow's
        import tensorflow as tf

        self.tf = tf
        self.ops = _TfAsKerasOps(tf)


class _TfAsKerasOps:
    """The handful of ``keras.ops`` names above, spelled in TensorFlow."""

    def __init__(self, tf: Any) -> None:
        self.tf = tf

    def cast(self, x: Any, dtype: Any) -> Any:
        return self.tf.cast(x, dtype)

    def sum(self, x: Any) -> Any:
        return self.tf.reduce_sum(x)

    def square(self, x: Any) -> Any:
        return self.tf.square(x)

    def sqrt(self, x: Any) -> Any:
        return self.tf.sqrt(x)

    def minimum(self, a: Any, b: Any) -> Any:
        return self.tf.minimum(a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return self.tf.maximum(a, b)

    def clip(self, x: Any, lo: float, hi: float) -> Any:
        return self.tf.clip_by_value(x, lo, hi)

    def zeros_like(self, x: Any) -> Any:
        return self.tf.zeros_like(x)

    def all(self, x: Any) -> Any:
        return self.tf.reduce_all(x)

    def isfinite(self, x: Any) -> Any:
        return self.tf.math.is_finite(x)

    def stack(self, xs: list) -> Any:
        return self.tf.stack(xs)

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        return self.tf.where(condition, a, b)


_in_step: list = []  # the ops of the wrapped optimizer's step being traced (see in_step)


def ops_for(grads: dict) -> Any:
    """NumPy's functions for a NumPy gradient set; inside a `wrap`-ped step, the framework's."""
    first = next((g for g in grads.values() if g is not None), None)
    if first is None or isinstance(first, np.ndarray) or not _in_step:
        return NumpyOps
    return _in_step[-1]


class in_step:  # noqa: N801 - used as a context manager, like a function
    """``with in_step(ops): transform.update(tensors, state)``: run a transform on the
    framework tensors of a compiled step, with `ops` (`KerasOps()` or `TensorFlowOps()`)."""

    def __init__(self, ops: Any) -> None:
        self.ops = ops

    def __enter__(self) -> Any:
        _in_step.append(self.ops)
        return self.ops

    def __exit__(self, *exc: Any) -> None:
        _in_step.pop()
