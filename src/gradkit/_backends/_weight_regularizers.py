"""The gradients of weight regularizers alone, for factored layers (gradkit._factors).

A weight regularizer R(W) is the same term in every example's objective, so the factored
routes add ∇R(W) to each row instead of differentiating it per example. It is taken here by
the framework's own autodiff at the variables' current values, one function compiled per
model and selection: Keras' L1/L2/L1L2/orthogonal regularizers and any custom callable of
the weight give exactly what the loop of single-example gradients gives, the framework's
conventions included (the slope of |w| at an exact zero: 0 on TensorFlow and torch, 1 on
JAX).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from gradkit._backends._steps import compiled


def run_regularizer_gradients(adapter, request, regularizers: dict) -> dict:
    """``{j: ∇R_j(W_j)}`` (float64 NumPy) for ``regularizers = {j: R_j}`` of selected
    variables j (zeros where R_j does not depend on W_j)."""
    indices = sorted(regularizers)
    run = compiled(request, 1.0, "regularizers", lambda scaled: adapter.p.compile(
        regularizer_fn(adapter.p, [regularizers[j] for j in indices], indices,
                       adapter.objective(request, False)[1]), request.model),
        tuple(indices))
    grads = run({}, 1.0)
    return {j: np.zeros(tuple(request.variables[j].shape)) if g is None
            else np.asarray(adapter.p.to_numpy(g), np.float64) for j, g in zip(indices, grads)}


def regularizer_fn(p: Any, regularizers: list, indices: list, chosen_of: Callable) -> Callable:
    """fn -> [∇R(W) or None per regularizer]: each regularizer of its selected variable's
    value (``chosen_of(values)[j]``, j in `indices`), summed as Keras adds it to the model's
    losses, differentiated with ``p.grad``."""
    def fn(values, data, scale):
        chosen = chosen_of(values)

        def f(perturb, weights):
            terms = [p.ops.cast(p.sum(r(w)), "float32") for r, w in zip(regularizers, weights)]
            return p.sum(p.stack(terms)), None

        _, (grads,), _ = p.grad(f)([chosen[j] for j in indices])
        return grads

    return fn
