"""The part of the monitor that runs inside the train step, in framework ops.

Only cheap work happens in the step: a finiteness check of every gradient (one pass), on
recorded updates a copy of the gradients into state variables (the statistics are then
computed on the host in float64, see `_history`), the norm and max |g| after clipping, and
on the first non-finite update the NaN and Inf counts per variable. XLA on CPU compiles each
reduction separately and slowly, so richer in-step statistics cost more than the copy.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def namespace(kind: str) -> SimpleNamespace:
    """The few ops needed, for Keras 3 (keras.ops) or tf-keras (tf)."""
    if kind == "keras3":
        from keras import ops

        return SimpleNamespace(
            abs=ops.abs, sqrt=ops.sqrt, sum=ops.sum, max=ops.max, where=ops.where,
            isfinite=ops.isfinite, isnan=ops.isnan, isinf=ops.isinf, cast=ops.cast,
            stack=ops.stack, equal=ops.equal, cond=ops.cond, reshape=ops.reshape, all=ops.all,
            mod=ops.mod, logical_or=ops.logical_or, logical_and=ops.logical_and,
            logical_not=ops.logical_not, zeros=ops.zeros, value=lambda v: v.value)
    import tensorflow as tf

    return SimpleNamespace(
        abs=tf.abs, sqrt=tf.sqrt, sum=tf.reduce_sum, max=tf.reduce_max, where=tf.where,
        isfinite=tf.math.is_finite, isnan=tf.math.is_nan, isinf=tf.math.is_inf, cast=tf.cast,
        stack=tf.stack, equal=tf.equal, cond=lambda p, a, b: tf.cond(p, a, b),
        reshape=tf.reshape, all=tf.reduce_all, mod=tf.math.floormod,
        logical_or=tf.logical_or, logical_and=tf.logical_and, logical_not=tf.logical_not,
        zeros=tf.zeros, value=tf.convert_to_tensor)


def all_finite(xp: SimpleNamespace, grads: list) -> Any:
    return xp.all(xp.stack([xp.all(xp.isfinite(g)) for g in grads]))


def nonfinite_counts(xp: SimpleNamespace, grads: list) -> Any:
    """(n, 2) float32: NaN and Inf counts per gradient."""
    return xp.stack([xp.stack([xp.sum(xp.cast(xp.isnan(g), "float32")),
                               xp.sum(xp.cast(xp.isinf(g), "float32"))]) for g in grads])


def clipped_rows(xp: SimpleNamespace, grads: list) -> Any:
    """(n, 2): the norm and max |g| (finite entries) of what the update rule receives."""
    rows = []
    for g in grads:
        g = xp.reshape(xp.cast(g, "float32"), [-1])
        gz = xp.where(xp.isfinite(g), g, 0.0)
        rows.append(xp.stack([xp.sqrt(xp.sum(gz * gz)), xp.max(xp.abs(gz))]))
    return xp.stack(rows)


def ordered(grads: list, variables: list, chosen: list, xp: SimpleNamespace) -> list:
    """The gradients of `chosen`, in that order, as float32 (zeros where the step has none)."""
    where = {id(v): g for g, v in zip(grads, variables)}
    return [xp.zeros(v.shape) if where.get(id(v)) is None else xp.cast(where[id(v)], "float32")
            for v in chosen]
