"""The ops the in-step monitor uses, one namespace per backend (`namespace`): the framework's
own ops where they are cheaper than keras.ops in the step (TensorFlow's on Keras 3's
TensorFlow backend and on tf-keras, torch's on the eager torch step), keras.ops elsewhere;
plus `put`, which writes one slot of the recorder's ring.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def namespace(kind: str, xla: bool = False) -> SimpleNamespace:
    """The ops needed, the backend's name, and whether the step is compiled by XLA (`xla`):
    TensorFlow's own ops on Keras 3's TensorFlow backend and on tf-keras (keras.ops adds
    conversions to the graph), keras.ops on JAX, torch's own ops on torch."""
    if kind == "keras3":
        import keras
        from keras import ops

        backend = keras.backend.backend()
        if backend == "tensorflow":
            return _tf_namespace(xla, value=lambda v: v.value)
        xp = SimpleNamespace(
            backend=backend, abs=ops.abs, sum=ops.sum, max=ops.max, min=ops.min,
            where=ops.where, isfinite=ops.isfinite, isnan=ops.isnan, isinf=ops.isinf,
            cast=ops.cast, stack=ops.stack, concatenate=ops.concatenate, equal=ops.equal,
            cond=ops.cond, reshape=ops.reshape, mod=ops.mod, maximum=ops.maximum,
            minimum=ops.minimum, logical_or=ops.logical_or, logical_and=ops.logical_and,
            logical_not=ops.logical_not, zeros=ops.zeros, vdot=ops.vdot,
            count_nonzero=ops.count_nonzero, copy=ops.copy, value=lambda v: v.value,
            floordiv=ops.floor_divide, put=lambda ring, slot, x: ops.slice_update(
                ring, [slot] + [slot * 0] * len(x.shape), ops.expand_dims(x, 0)),  # one dtype
            squares=_dot_squares(ops.vdot), zero_count=lambda g: int(g.shape[0]) - ops.cast(
                ops.count_nonzero(g), "int32"))
        if backend == "torch":  # eager: keras.ops' conversions cost more than the passes
            vars(xp).update(_torch_ops())
        if backend == "jax":  # statistics outside a cond: keep XLA from fusing them into
            import jax        # the step's own kernels (it would recompute those per pass)

            xp.barrier = jax.lax.optimization_barrier
        xp.xla = xla
        return xp
    import tensorflow as tf

    return _tf_namespace(xla, value=tf.convert_to_tensor)


def _tf_namespace(xla: bool, value: Any) -> SimpleNamespace:
    import tensorflow as tf

    return SimpleNamespace(
        backend="tensorflow", abs=tf.abs, sum=tf.reduce_sum, max=tf.reduce_max,
        min=tf.reduce_min, where=tf.where, isfinite=tf.math.is_finite, isnan=tf.math.is_nan,
        isinf=tf.math.is_inf, cast=tf.cast, stack=tf.stack, concatenate=tf.concat,
        equal=tf.equal, cond=_tf_cond, reshape=tf.reshape, mod=tf.math.floormod,
        maximum=tf.maximum, minimum=tf.minimum, logical_or=tf.logical_or,
        logical_and=tf.logical_and, logical_not=tf.logical_not, zeros=tf.zeros,
        vdot=lambda a, b: tf.tensordot(a, b, 1), count_nonzero=tf.math.count_nonzero,
        copy=tf.identity, value=value, squares=_tf_squares, zero_count=_tf_zero_count,
        floordiv=tf.math.floordiv, put=lambda ring, slot, x: tf.tensor_scatter_nd_update(
            ring, tf.reshape(slot, (1, 1)), x[None]), xla=xla, barrier=lambda x: x)


def _torch_put(ring: Any, slot: Any, x: Any) -> Any:
    out = ring.clone()
    out[int(slot)] = x
    return out


def _torch_ops() -> dict:
    """torch's own ops where keras.ops' argument conversion dominates an eager step (about
    10 ms a recorded update on the benchmark's MLP); Python numbers and Keras variables are
    still accepted where the recorder passes them."""
    import torch
    from keras import ops

    def tensor(x: Any) -> Any:
        return x if isinstance(x, torch.Tensor) else ops.convert_to_tensor(x)

    def total(x: Any, axis: Any = None) -> Any:  # torch sums int32 into int64; keras.ops
        keep = {"dtype": x.dtype} if x.dtype == torch.int32 else {}  # keeps int32
        return torch.sum(x, **keep) if axis is None else torch.sum(x, axis, **keep)

    return dict(
        abs=torch.abs, sum=total, max=torch.amax, min=torch.amin, where=torch.where,
        isfinite=torch.isfinite, isnan=torch.isnan, isinf=torch.isinf,
        cast=lambda x, dtype: tensor(x).to(getattr(torch, dtype)), stack=torch.stack,
        concatenate=torch.cat, equal=lambda a, b: torch.eq(tensor(a), b),
        cond=lambda pred, true_fn, false_fn: true_fn() if bool(pred) else false_fn(),
        reshape=torch.reshape, mod=lambda a, b: torch.remainder(tensor(a), b),
        maximum=lambda a, b: torch.maximum(tensor(a), tensor(b)),
        minimum=lambda a, b: torch.minimum(tensor(a), tensor(b)),
        logical_and=lambda a, b: torch.logical_and(tensor(a), tensor(b)),
        logical_or=lambda a, b: torch.logical_or(tensor(a), tensor(b)),
        logical_not=lambda a: torch.logical_not(tensor(a)), vdot=torch.dot, copy=torch.clone,
        squares=_dot_squares(torch.dot), barrier=lambda x: x, put=_torch_put,
        floordiv=lambda a, b: torch.div(tensor(a), b, rounding_mode="floor"),
        zero_count=lambda g: torch.sum(g == 0, dtype=torch.int32))


def _dot_squares(vdot: Any) -> Any:
    """squares(g, shift) = Σ (g - shift)² as one dot product (no subtraction for shift 0.0)."""
    def squares(g: Any, shift: Any) -> Any:
        d = g if isinstance(shift, float) and shift == 0.0 else g - shift
        return vdot(d, d)

    return squares


def _tf_squares(g: Any, shift: Any) -> Any:
    import tensorflow as tf

    return tf.reduce_sum(tf.math.squared_difference(g, shift))


def _tf_zero_count(g: Any) -> Any:  # faster than tf.math.count_nonzero (int64)
    import tensorflow as tf

    return tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.int32))


def _tf_cond(pred: Any, true_fn: Any, false_fn: Any) -> Any:
    """``tf.cond`` kept as one functional ``If`` op: TensorFlow lowers a cond in a function to
    Switch/Merge, whose untaken branch still passes a dead tensor through each of its ops on
    every step; an ``If`` runs only the branch taken. (Falls back to the lowered cond where
    TensorFlow's private switch is gone.)"""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util_v2 as util

    if not hasattr(util, "_DISABLE_LOWER_USING_SWITCH_MERGE"):
        return tf.cond(pred, true_fn, false_fn)
    saved = util._DISABLE_LOWER_USING_SWITCH_MERGE
    util._DISABLE_LOWER_USING_SWITCH_MERGE = True
    try:
        return tf.cond(pred, true_fn, false_fn)
    finally:
        util._DISABLE_LOWER_USING_SWITCH_MERGE = saved
