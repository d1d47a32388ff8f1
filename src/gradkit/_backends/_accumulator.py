"""The running sum of gradkit.accumulate, written once for every adapter over primitives.

One compiled step per batch signature adds ``weight * gradient`` into sums kept on the device
(donated where the backend can reuse their memory) and returns a per-variable "all finite"
flag; with `skip_nonfinite` a batch with any NaN/Inf adds nothing. It runs the engine's own
gradient function, so it differentiates exactly what gradkit.gradients does. Sums are copied
to the host once, by `total()`.
"""

from __future__ import annotations

import numpy as np

from gradkit._backends._steps import compiled, data_of, gradient_fn
from gradkit._request import result_dtype
from gradkit._seeds import fold


class Accumulator:
    """gradkit._backends.Accumulator over an adapter that has ``p`` (its primitives),
    ``objective(request, scaled)`` and ``scale_of(model)`` (see gradkit._backends._steps)."""

    def __init__(self, adapter, request, skip_nonfinite: bool) -> None:
        p = self._p = adapter.p
        self._scale = adapter.scale_of(request.model)  # constant: the model is not trained
        self.connected: list[bool] | None = None
        self._seed, self._step = request.seed, 0
        box: list = []  # the connectivity found while tracing (or on each eager call)
        self._box, self._run = compiled(
            request, self._scale, "accumulate", lambda scaled: (box, p.compile(
                adder(gradient_fn(adapter, request, scaled), p, skip_nonfinite, box),
                request.model, donate=(2,))), bool(skip_nonfinite))
        self._sums = [p.zeros(tuple(v.shape), result_dtype(v).name) for v in request.variables]
        self.flag_lag = 8 if p.asynchronous(self._sums[0]) else 0

    def add(self, batch, weight: float):
        self._step += 1  # each batch its own dropout masks, as in fit
        self._sums, finite = self._run(data_of(batch, fold(self._seed, self._step)),
                                       self._scale, self._sums, np.float32(weight))
        self.connected = list(self._box)
        return finite

    def running(self):
        return self._p.guard()

    def finite(self, flags: list) -> list:
        return [self._p.to_numpy(f).astype(bool) for f in flags]

    def total(self) -> list:
        return [self._p.to_numpy(s) if ok else None for s, ok in zip(self._sums, self.connected)]


def adder(gradient_fn, p, skip_nonfinite: bool, box: list):
    """add(values, data, scale, sums, weight) -> (sums + weight * gradient, all-finite flag
    per variable); the connectivity found is written into `box`."""
    cast = p.ops.cast

    def add(values, data, scale, sums, weight):
        _, grads = gradient_fn(values, data, scale)
        box[:] = [g is not None for g in grads]
        true = p.all_finite(p.zeros((), "float32"))
        finite = p.stack([true if g is None else p.all_finite(g) for g in grads])
        new = [s if g is None else s + cast(weight, s.dtype) * cast(g, s.dtype)
               for s, g in zip(sums, grads)]
        if skip_nonfinite:
            keep = p.all(finite)
            new = [p.where(keep, n, s) for n, s in zip(new, sums)]
        return new, finite

    return add
