"""The statistics computed inside the train step, in framework ops (keras.ops or tf for tf-keras).

Per variable one float32 row: `COLUMNS` then `bins` histogram counts. Everything is taken over
the FINITE entries (NaN and Inf are counted in their own columns, never dropped silently):
norm = sqrt(sum g²), max_abs, mean, std (population, two-pass), zero_count (exact zeros),
nan_count, inf_count, min and max. The histogram has `bins` equal bins from that record's
min to max (the range is chosen per record and per variable; both ends are in the row), the
last bin closed; counts come from `bins - 1` comparisons, so they are exact. Counts are
float32: exact up to 2**24 entries per variable.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

COLUMNS = ("norm", "max_abs", "mean", "std", "zero_count", "nan_count", "inf_count", "min",
           "max")
CLIPPED = ("norm", "max_abs")


def namespace(kind: str) -> SimpleNamespace:
    """The few ops the statistics need, for Keras 3 (keras.ops) or tf-keras (tf)."""
    if kind == "keras3":
        from keras import ops

        return SimpleNamespace(
            abs=ops.abs, sqrt=ops.sqrt, sum=ops.sum, max=ops.max, min=ops.min, where=ops.where,
            isfinite=ops.isfinite, isnan=ops.isnan, isinf=ops.isinf, cast=ops.cast,
            stack=ops.stack, equal=ops.equal, less=ops.less, cond=ops.cond,
            reshape=ops.reshape, all=ops.all, mod=ops.mod, logical_or=ops.logical_or,
            logical_and=ops.logical_and, logical_not=ops.logical_not, maximum=ops.maximum,
            zeros=ops.zeros, value=lambda v: v.value)
    import tensorflow as tf

    return SimpleNamespace(
        abs=tf.abs, sqrt=tf.sqrt, sum=tf.reduce_sum, max=tf.reduce_max, min=tf.reduce_min,
        where=tf.where, isfinite=tf.math.is_finite, isnan=tf.math.is_nan,
        isinf=tf.math.is_inf, cast=tf.cast, stack=tf.stack, equal=tf.equal, less=tf.less,
        cond=lambda p, a, b: tf.cond(p, a, b), reshape=tf.reshape, all=tf.reduce_all,
        mod=tf.math.floormod, logical_or=tf.logical_or, logical_and=tf.logical_and,
        logical_not=tf.logical_not, maximum=tf.maximum, zeros=tf.zeros,
        value=lambda v: tf.convert_to_tensor(v))


def full_row(xp: SimpleNamespace, g: Any, bins: int) -> Any:
    """One variable's `COLUMNS` and histogram counts, as a float32 vector."""
    g = xp.reshape(xp.cast(g, "float32"), [-1])
    fin = xp.isfinite(g)
    count = xp.sum(xp.cast(fin, "float32"))
    safe = xp.maximum(count, 1.0)
    gz = xp.where(fin, g, 0.0)
    mean = xp.sum(gz) / safe
    dev = xp.where(fin, g - mean, 0.0)
    big = 3.0e38
    lo = xp.min(xp.where(fin, g, big))
    hi = xp.max(xp.where(fin, g, -big))
    lo, hi = xp.where(count > 0, lo, 0.0), xp.where(count > 0, hi, 0.0)
    values = [xp.sqrt(xp.sum(gz * gz)), xp.max(xp.abs(gz)), mean,
              xp.sqrt(xp.sum(dev * dev) / safe), xp.sum(xp.cast(xp.equal(g, 0.0), "float32")),
              xp.sum(xp.cast(xp.isnan(g), "float32")), xp.sum(xp.cast(xp.isinf(g), "float32")),
              lo, hi]
    below = [xp.sum(xp.cast(xp.logical_and(fin, xp.less(g, lo + (hi - lo) * (k / bins))),
                            "float32")) for k in range(1, bins)]
    edges = [0.0 * count] + below + [count]
    values += [edges[k + 1] - edges[k] for k in range(bins)]
    return xp.stack(values)


def clipped_row(xp: SimpleNamespace, g: Any) -> Any:
    """The norm and max |g| of what the update rule receives (finite entries)."""
    g = xp.reshape(xp.cast(g, "float32"), [-1])
    gz = xp.where(xp.isfinite(g), g, 0.0)
    return xp.stack([xp.sqrt(xp.sum(gz * gz)), xp.max(xp.abs(gz))])


def ordered(grads: list, variables: list, chosen: list) -> list:
    """The gradients of `chosen` (in that order; None where the step has none)."""
    where = {id(v): g for g, v in zip(grads, variables)}
    return [where.get(id(v)) for v in chosen]
