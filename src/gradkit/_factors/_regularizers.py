"""Weight regularizers of factored layers: their gradient, added to every example's row.

A regularizer R(W) is part of each example's objective (the loss of a batch of one plus
the model's losses), but it depends on W directly, not through the layer's pre-activation,
so the factors ``(a, δ)`` do not carry it. Its gradient is the same for every example, so
example i's row is ``factor_row_i + ∇R(W)``. Keras' (3 or 2) built-in L1, L2 and L1L2
(``"l1"``, ``"l2"``, ``"l1_l2"``, ``L1(a)``, ``L2(c)``, ``L1L2(a, c)``) are taken here:
``∇R = a·∂|W| + 2cW``, where ∂|w| is sign(w) and, at w = 0, the slope the framework's own
autodiff gives |w| there (0 on TensorFlow and torch, 1 on JAX: the loop of single-example
gradients gives the same). A layer with any other regularizer (orthogonal, custom) is not
factored and is differentiated directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def coefficients(regularizer: Any) -> tuple[float, float] | None:
    """(a, c) of a Keras (3 or 2) ``L1(a)``, ``L2(c)`` or ``L1L2(a, c)``; None for any other
    regularizer."""
    cls = type(regularizer)
    if cls.__module__.split(".")[0] not in ("keras", "tf_keras"):
        return None
    if cls.__name__ not in ("L1", "L2", "L1L2"):
        return None
    return (float(getattr(regularizer, "l1", 0.0) or 0.0),
            float(getattr(regularizer, "l2", 0.0) or 0.0))


def closed_form(regularizer: Any) -> bool:
    """Whether a factored layer may carry `regularizer` (None: no regularizer)."""
    return regularizer is None or coefficients(regularizer) is not None


def offsets(planned: list, variables: list, roles: dict,
            abs_slope_at_zero: float) -> dict[int, np.ndarray]:
    """``{index of a selected variable: ∇R(W)}`` (float64, the variable's shape) for every
    planned variable with a regularizer, at the variable's current value; `roles` maps a
    planned kind's name to its ``{attribute: Role}``; `abs_slope_at_zero`: the framework's
    derivative of |w| at 0."""
    found = {}
    for entry in planned:
        for attribute, j in entry.roles.items():
            regularizer = getattr(entry.layer, roles[entry.kind][attribute].regularizer, None)
            if regularizer is None:
                continue
            (l1, l2), value = coefficients(regularizer), _host_value(variables[j])
            gradient = 2.0 * l2 * value
            if l1:
                gradient += l1 * np.sign(value)  # 0 at 0
                if abs_slope_at_zero:
                    gradient[value == 0.0] += l1 * abs_slope_at_zero
            found[j] = gradient
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
