"""`ggn_vp()`: the generalized Gauss-Newton matrix of the loss on the outputs times a vector.

For an objective L(z(w)) of the model's outputs z, the Hessian is

    H = Jᵀ H_L J + Σ_k (∂L/∂z_k) ∇²z_k,      J = ∂z/∂w,  H_L = ∇²_z L,

and the generalized Gauss-Newton matrix (Schraudolph 2002; Martens 2010) keeps the first
term, G = Jᵀ H_L J: positive semi-definite whenever the loss is convex in the outputs, equal
to H for a model linear in its weights. It needs only first derivatives of the network.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._errors import InvalidArgumentError, original_errors, received
from gradkit._hvp import checked_vector
from gradkit._objective import has_compiled_loss
from gradkit._request import Request, check_connected, finish, prepare


def ggn_vp(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    vector: dict,
    loss: Any = None,
    sample_weight: Any = None,
    layers: Any = None,
    training: bool = False,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """The generalized Gauss-Newton product ``G v = Jᵀ H_L J v``.

    J: the Jacobian of the model's outputs (exactly what the model returns, e.g. softmax
    probabilities, not the logits before them) with respect to the selected variables (all
    trainable ones, or those of ``layers=``: then G is that diagonal block). H_L: the Hessian,
    with respect to those outputs, of the compiled loss as ``fit`` computes it (by default
    the MEAN over the batch) or of ``loss=``. Regularizers and ``add_loss`` terms are NOT part
    of G (they do not act through the outputs): add their own Hessian if you want it, e.g.
    ``2 * l2 * v`` for ``L2(l2)`` on a kernel. G is positive semi-definite for a loss convex
    in the outputs (mse; cross-entropy), and equals ``hvp()`` for a model linear in its
    weights. For the usual "GGN = Fisher" of a classifier, output logits and use a loss with
    ``from_logits=True``.

    ``vector``: a gradient set with the selected variables' keys and shapes. Returns
    ``{variable path: array}``, keys, order and dtypes as ``gradients()``; mixed-precision
    loss scaling is undone. Exact automatic differentiation (a Jacobian-vector product, a
    Hessian-vector product of the loss alone, a vector-Jacobian product), compiled and
    cached. ``training=True`` is allowed on every backend, BatchNormalization included (with
    batch statistics J couples the examples; only first derivatives of the network are
    needed); ``seed`` (its dropout masks) as in ``gradients()``; no model state changes.
    """
    request = prepare(model, x, y, loss=loss, sample_weight=sample_weight, layers=layers,
                      training=training, seed=seed, scores=False)
    check_loss_on_outputs(request)
    tangents = checked_vector(request, vector)
    with original_errors():
        _, products = request.adapter.ggn_vp(request, tangents)
    check_connected(request.keys, [p is not None for p in products],
                    what="Gauss-Newton product", layers=request.layers)
    return finish(request, products)


def check_loss_on_outputs(request: Request) -> None:
    """Raise unless the objective is a loss of the model's outputs (G is built on it)."""
    if request.objective.kind == "target":
        raise InvalidArgumentError(
            "The Gauss-Newton matrix is built on a loss of the model's outputs; a target= "
            "score is linear in the outputs, so its Gauss-Newton matrix is zero. Pass "
            "matrix='hessian' for the Hessian of the target score, or a loss. "
            + received(target=request.objective.spec, matrix="ggn"))
    if request.objective.kind == "compiled" and not has_compiled_loss(request.model):
        raise InvalidArgumentError(
            f"Model {request.model.name!r} is compiled without a loss on its outputs (only "
            "add_loss/regularizer terms), so its Gauss-Newton matrix is zero. Pass loss= "
            "(e.g. 'mse'), or compile the model with a loss. " + received(loss=None))
