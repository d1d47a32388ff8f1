"""Weight regularizers of factored layers: their gradient, added to every example's row.

A regularizer R(W) is part of each example's objective (the loss of a batch of one plus
the model's losses), but it depends on W directly, not through the layer's pre-activation,
so the factors ``(a, δ)`` do not carry it. Its gradient is the same for every example, so
example i's row is ``factor_row_i + ∇R(W)``. Only Keras' L2 and L1L2 without an L1 term
(``"l2"``, ``L2(c)``, ``L1L2(l2=c)``: ``∇R = 2cW``) are taken here; a layer with any other
regularizer (L1, whose derivative at a zero weight is a framework's choice, orthogonal or
custom ones) is not factored and is differentiated directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def l2_coefficient(regularizer: Any) -> float | None:
    """c of a Keras (3 or 2) ``L2(c)`` or ``L1L2(0, c)``; None for any other regularizer."""
    cls = type(regularizer)
    if cls.__module__.split(".")[0] not in ("keras", "tf_keras"):
        return None
    if cls.__name__ not in ("L2", "L1L2") or float(getattr(regularizer, "l1", 0.0) or 0.0):
        return None
    return float(regularizer.l2)


def closed_form(regularizer: Any) -> bool:
    """Whether a factored layer may carry `regularizer` (None: no regularizer)."""
    return regularizer is None or l2_coefficient(regularizer) is not None


def offsets(planned: list, variables: list, roles: dict) -> dict[int, np.ndarray]:
    """``{index of a selected variable: ∇R(W)}`` (float64, the variable's shape) for every
    planned variable with a regularizer, at the variable's current value; `roles` maps a
    planned kind's name to its ``{attribute: Role}``."""
    found = {}
    for entry in planned:
        for attribute, j in entry.roles.items():
            regularizer = getattr(entry.layer, roles[entry.kind][attribute].regularizer, None)
            if regularizer is not None:
                found[j] = 2.0 * l2_coefficient(regularizer) * _host_value(variables[j])
    return found


def _host_value(variable: Any) -> np.ndarray:
    """A Keras 3 variable's or a tf.Variable's value as float64 NumPy."""
    value = getattr(variable, "value", variable)
    value = variable if callable(value) else value  # tf.Variable.value is a method
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)
