"""Collecting factors during a forward pass: `LayerTaps`, then `factor_arrays` and `assemble`.

While installed, each planned layer's ``call`` records its input, and the adapter's
``perturb(layer, call, z)`` adds a zero perturbation where the kind takes its δ (inside a Dense
or Conv layer's activation; at an Embedding's output). The adapter differentiates each
example's objective with respect to those perturbations inside its vectorizer, joins the
recordings with `factor_arrays` and hands one entry per selected variable back with `assemble`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from gradkit._taps import restore, shadow
from gradkit._factors import _regularizers
from gradkit._factors._arrays import Ops
from gradkit._factors._registry import KINDS, Factor, Planned, rest
from gradkit._request import result_dtype


class LayerTaps:
    """Record planned layers' inputs and route their pre-activations through `perturb`."""

    def __init__(self, planned: list[Planned]):
        self.planned = planned
        self.perturb: Callable[[int, int, Any], Any] = lambda layer, call, z: z
        self.inputs: list[list] = [[] for _ in planned]

    def start(self, perturb: Callable[[int, int, Any], Any]) -> None:
        """Use `perturb(layer index, call index, z)` for the next forward pass."""
        self.perturb = perturb
        self.inputs = [[] for _ in self.planned]

    @contextlib.contextmanager
    def installed(self) -> Iterator[LayerTaps]:
        """Shadow the planned layers' call (and Dense/Conv activation) inside the block."""
        patched: list[tuple[Any, str, Any]] = []
        try:
            for index, (layer, kind, _) in enumerate(self.planned):
                at_output = KINDS[kind].at_output
                call, activation = layer.call, getattr(layer, "activation", None)
                shadow(layer, "call", self._recording(index, at_output, call), patched)
                if not at_output:
                    shadow(layer, "activation", self._perturbing(index, activation), patched)
            yield self
        finally:
            restore(patched)

    def _recording(self, index: int, at_output: bool, call: Callable) -> Callable:
        def recording(*args: Any, **kwargs: Any) -> Any:
            self.inputs[index].append(args[0] if args else kwargs["inputs"])
            output = call(*args, **kwargs)
            if at_output:
                output = self.perturb(index, len(self.inputs[index]) - 1, output)
            return output

        return recording

    def _perturbing(self, index: int, activation: Callable) -> Callable:
        def perturbing(z: Any) -> Any:
            return activation(self.perturb(index, len(self.inputs[index]) - 1, z))

        return perturbing


def factor_arrays(planned: list[Planned], inputs: list[list], deltas: list[list],
                  ops: Ops, scale: Any = None) -> list[tuple]:
    """[(inputs, deltas) per planned layer] in its kind's layout (``gradkit._factors._arrays``),
    all calls joined, from batched per-example recordings shaped (n, 1, ..., features).

    Factors are float32 (float64 for float64 layers); the deltas are divided by the loss
    `scale` after that cast, so float16 gradients are unscaled without underflow.
    """
    arrays = []
    for entry, a_calls, d_calls in zip(planned, inputs, deltas):
        dtype = result_dtype(d_calls[0]).name
        arrays.append(KINDS[entry.kind].arrays(a_calls, d_calls, ops, dtype, scale))
    return arrays


def assemble(count: int, planned: list[Planned], arrays: list[tuple], rest_grads: list) -> list:
    """One entry per selected variable: a `Factor`, or its directly computed (n, ...) array."""
    result: list[Any] = [None] * count
    for entry, (a, d) in zip(planned, arrays):
        kind = KINDS[entry.kind]
        geometry = None if kind.geometry is None else kind.geometry(entry.layer)
        for attribute, j in entry.roles.items():
            role = kind.roles[attribute]
            result[j] = Factor(role.factor, a if role.uses_inputs else None, d, geometry)
    for j, grad in zip(rest(planned, count), rest_grads):
        result[j] = grad
    return result


def with_regularizers(request: Any, planned: list[Planned], parts: list) -> list:
    """`parts` (per selected variable: a Factor, an array or None) with the gradients of the
    planned variables' regularizers (gradkit._factors._regularizers) where the objective holds
    them (a compiled loss or ``loss=``, not a ``target=`` score): a Factor's offset, or, for a
    regularized layer that does not reach the objective (None), every example's row."""
    if request.objective.kind == "target":
        return parts
    found = _regularizers.regularized(planned, {name: kind.roles for name, kind in KINDS.items()})
    if not found:
        return parts
    key = ("regularizer_gradients", tuple(found))
    offsets = request.per_call.get(key)
    if offsets is None:  # once per call: the weights do not change between its chunks
        offsets = request.per_call[key] = request.adapter.regularizer_gradients(request, found)
    parts = list(parts)
    for j, offset in offsets.items():
        parts[j] = (np.broadcast_to(offset, (request.batch.size, *offset.shape))
                    if parts[j] is None else parts[j]._replace(offset=offset))
    return parts
