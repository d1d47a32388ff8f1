"""Weight regularizers of factored layers: their gradient, added to every example's row.

A regularizer R(W) is part of each example's objective (the loss of a batch of one plus
the model's losses), but it depends on W directly, not through the layer's pre-activation,
so the factors ``(a, δ)`` do not carry it. Its gradient is the same for every example, so
example i's row is ``factor_row_i + ∇R(W)``. The adapter takes ∇R with the framework's own
autodiff at the variable's current value (``Adapter.regularizer_gradients``), so Keras' L1,
L2, L1L2 and orthogonal regularizers and any custom callable of the weight give what the
loop of single-example gradients gives, the framework's conventions included (the slope of
|w| at an exact zero: 0 on TensorFlow and torch, 1 on JAX).
"""

from __future__ import annotations

from typing import Any


def regularized(planned: list, roles: dict) -> dict[int, Any]:
    """``{index of a selected variable: its regularizer}`` for every planned variable that has
    one; `roles` maps a planned kind's name to its ``{attribute: Role}``."""
    found = {}
    for entry in planned:
        for attribute, j in entry.roles.items():
            regularizer = getattr(entry.layer, roles[entry.kind][attribute].regularizer, None)
            if regularizer is not None:
                found[j] = regularizer
    return found
