"""Streaming accumulation on Keras 3 with TensorFlow (gradkit.accumulate); tf-keras reuses
`accumulator_over` with its own cached step.

The running sum ``Σ_b w_b ∇L_b`` stays on the device, in tensors that one cached
`tf.function` per input signature updates, over the same compiled gradient step that
gradients() uses.
"""

from __future__ import annotations

import weakref
from typing import Any

import tensorflow as tf

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends.tensorflow import (
    _CACHE,
    _build,
    _inputs,
    _relaxed_spec,
    _signature_key,
)
from gradkit._data import Batch, map_structure
from gradkit._objective import Objective

_ACCUMULATE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def gradient_accumulator(model, variables, objective: Objective, training: bool,
                         skip_nonfinite: bool):
    """A running sum Σ_b w_b ∇L_b kept on the device (see gradkit._accumulate)."""
    k3.check_built(model)
    return accumulator_over(model, variables, objective, training, skip_nonfinite,
                            k3.loss_scale(model), _CACHE, _build, _ACCUMULATE)


def accumulator_over(model, variables, objective, training, skip_nonfinite, scale,
                     step_cache, build, adder_cache):
    """A TFAccumulator over the cached gradient step that gradients() uses (`build`)."""

    def step_for(signature):
        key = (tuple(id(v) for v in variables), objective.cache_key(), bool(training),
               _signature_key(signature), scale != 1.0)
        per_model = _cache.per_model(step_cache, model)
        if key not in per_model:
            per_model[key] = build(model, variables, objective, training, signature,
                                   scaled=scale != 1.0)
        return per_model[key]

    key = (tuple(id(v) for v in variables), objective.cache_key(), bool(training),
           bool(skip_nonfinite))
    by_key = _cache.per_model(adder_cache, model)
    if key not in by_key:
        by_key[key] = {}  # adding functions per input signature
    adders = by_key[key]
    return TFAccumulator(variables, step_for, scale, skip_nonfinite, adders)


class TFAccumulator:
    """``add(batch, weight)`` adds ``weight * gradient`` into tensors kept on the device.

    `step_for(signature)` gives the cached gradient `tf.function` ``(inputs, scale) ->
    (loss, grads)``; each one is wrapped once in an adding `tf.function` (cached in
    `adders` per input signature) that returns the new sums and per-variable "all finite"
    flags; with `skip_nonfinite` a batch with any NaN/Inf adds nothing. Variables with no
    path to the objective (a None gradient at trace time) are reported in ``connected``.
    """

    def __init__(self, variables, step_for, scale: float, skip_nonfinite: bool,
                 adders: dict) -> None:
        self._step_for, self._adders, self._skip = step_for, adders, bool(skip_nonfinite)
        self._scale = tf.constant(scale, tf.float32)
        self._sums = [tf.zeros(tuple(v.shape), _sum_dtype(v)) for v in variables]
        self.connected: list[bool] | None = None

    def add(self, batch: Batch, weight: float):
        inputs = map_structure(tf.convert_to_tensor, _inputs(batch))
        signature = map_structure(_relaxed_spec, inputs)
        key = _signature_key(signature)
        if key not in self._adders:
            step = self._step_for(signature)
            grads = step.get_concrete_function().structured_outputs[1]
            specs = [tf.TensorSpec(s.shape, s.dtype) for s in self._sums]
            self._adders[key] = (_build_adder(step, signature, specs, self._skip),
                                 [g is not None for g in grads])
        adder, self.connected = self._adders[key]
        self._sums, finite = adder(inputs, self._scale, self._sums,
                                   tf.constant(weight, tf.float32))
        return finite

    def running(self):
        """Around the whole pass (nothing to guard: each step restores what it changes)."""
        from contextlib import nullcontext

        return nullcontext()

    @property
    def flag_lag(self) -> int:
        """Batches whose flags may be outstanding: none on CPU (eager TF is synchronous
        there), a group on an accelerator, so the host waits once per group."""
        return 0 if self._sums[0].device.endswith("CPU:0") else 8

    def finite(self, flags: list) -> list:
        return [f.numpy() for f in flags]  # NumPy bool arrays, one flag per variable

    def total(self) -> list:
        return [s.numpy() for s in self._sums]


def _build_adder(step, signature, sum_specs, skip_nonfinite: bool):
    scalar = tf.TensorSpec([], tf.float32)

    @tf.function(input_signature=[signature, scalar, sum_specs, scalar])
    def add(inputs, scale, sums, weight):
        _, grads = step(inputs, scale)
        finite = tf.stack([tf.constant(True) if g is None else tf.reduce_all(tf.math.is_finite(g))
                           for g in grads])
        new = [s if g is None else s + tf.cast(weight, s.dtype) * tf.cast(g, s.dtype)
               for s, g in zip(sums, grads)]
        if skip_nonfinite:
            keep = tf.reduce_all(finite)
            new = [tf.where(keep, n, s) for n, s in zip(new, sums)]
        return new, finite

    return add


def _sum_dtype(variable) -> tf.DType:
    return tf.float64 if tf.as_dtype(variable.dtype) == tf.float64 else tf.float32
