"""Streaming accumulation on Keras 3 with JAX (gradkit.accumulate).

One jitted step per batch shape adds ``weight * gradient`` into donated sums on the device,
over the same traced gradient function that gradients() uses.
"""

from __future__ import annotations

import jax
import numpy as np

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends.jax import _CACHE, _build, _connected, _Entry
from gradkit._data import Batch
from gradkit._objective import Objective


def gradient_accumulator(model, variables, objective: Objective, training: bool,
                         skip_nonfinite: bool):
    """A running sum Σ_b w_b ∇L_b kept on the device (see gradkit._accumulate).

    ``add(batch, weight)`` runs one jitted step that adds ``weight * gradient`` into the
    donated sums and returns per-variable "all finite" flags (not waited on); with
    `skip_nonfinite` a batch with any NaN/Inf adds nothing. ``total()`` copies the sums
    to the host once. One XLA program per batch shape, cached per model.
    """
    k3.check_built(model)
    key = ("accumulate", tuple(id(v) for v in variables), objective.cache_key(),
           bool(training), bool(skip_nonfinite))
    per_model = _cache.per_model(_CACHE, model)
    if key not in per_model:
        entry = _build(model, variables, objective, training)
        per_model[key] = (entry, _build_adder(entry.fn.__wrapped__, bool(skip_nonfinite)))
    entry, adder = per_model[key]
    return _Accumulator(model, variables, entry, adder)


def _build_adder(grads_of, skip_nonfinite: bool):
    def add(sums, weight, *args):
        _, grads = grads_of(*args)
        finite = jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(g)) for g in grads])
        new = [s + weight.astype(s.dtype) * g.astype(s.dtype) for s, g in zip(sums, grads)]
        if skip_nonfinite:
            keep = jax.numpy.all(finite)
            new = [jax.numpy.where(keep, n, s) for n, s in zip(new, sums)]
        return new, finite

    return jax.jit(add, donate_argnums=0)


class _Accumulator:
    def __init__(self, model, variables, entry: _Entry, adder) -> None:
        self._entry, self._adder = entry, adder
        self._scale = np.float32(k3.loss_scale(model))  # constant: the model is not trained
        self._sums = [jax.numpy.zeros(tuple(v.shape), _sum_dtype(v)) for v in variables]
        trainable = list(model.trainable_variables)
        chosen = set(entry.selected)
        # The variable objects, split once; their values are read afresh for every batch.
        self._groups = ([trainable[i] for i in entry.selected],
                        [v for i, v in enumerate(trainable) if i not in chosen],
                        list(model.non_trainable_variables), list(model.metrics_variables))
        self.connected: list[bool] | None = None

    def add(self, batch: Batch, weight: float):
        args = (*([v.value for v in group] for group in self._groups),
                batch.x, batch.y, batch.sample_weight, self._scale)
        if self._entry.connected is None:
            self._entry.connected = _connected(self._entry.fn, args)
        self.connected = self._entry.connected
        self._sums, finite = self._adder(self._sums, np.float32(weight), *args)
        return finite

    def running(self):
        """Around the whole pass (nothing to guard: every step is stateless)."""
        from contextlib import nullcontext

        return nullcontext()

    #: Batches whose flags may be outstanding: dispatch is asynchronous, so flags are read
    #: in groups, waiting on the device once per group rather than once per batch.
    flag_lag = 8

    def finite(self, flags: list) -> list[np.ndarray]:
        return [np.asarray(f, dtype=bool) for f in jax.device_get(flags)]

    def total(self) -> list[np.ndarray]:
        return [np.asarray(s) for s in jax.device_get(self._sums)]


def _sum_dtype(variable) -> str:
    return "float64" if str(getattr(variable.dtype, "name", variable.dtype)) == "float64" \
        else "float32"
