"""`gradients()` and `loss_and_gradients()`: the batch gradient, the first thing gradkit gives."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._errors import original_errors
from gradkit._request import Request, finish, prepare


def gradients(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    target: Any = None,
    sample_weight: Any = None,
    layers: Any = None,
    training: bool = False,
    seed: int | None = None,
    unconnected: str = "raise",
) -> dict[str, np.ndarray]:
    """Gradients of the loss with respect to the model's trainable variables, as NumPy.

    Returns ``{variable path: array of the variable's shape}`` in
    ``model.trainable_variables`` order (float32; float64 for float64 variables).

    Scale: with ``loss=None`` the objective is the compiled loss exactly as ``fit``
    differentiates it: per-output losses and loss weights, sample weights, and
    ``model.losses`` (regularizers, ``add_loss``), reduced as compiled (by default the MEAN
    over the batch). ``loss=`` replaces the compiled loss (Keras reduction, ``model.losses``
    still added). ``target=k`` (or a callable on the outputs) differentiates the SUM over the
    batch of the scores ``outputs[:, k]``, with no y and no regularizers. Mixed-precision loss
    scaling is undone: the result is the true gradient.

    Training mode: ``training=False`` (default) is ``model(x)``; ``training=True`` is what
    ``fit`` differentiates (dropout on, BatchNorm batch statistics). Either way no state
    changes: weights, moving statistics, seed generators and metrics stay bitwise identical.
    Dropout masks under ``training=True`` come from ``seed=``: an int gives the same masks on
    every call; ``None`` (default) fresh masks on each call, as ``fit`` would (the model's own
    seed state is not used). A seed is an input of the compiled function: no recompilation.

    Which variables: all trainable ones, or those of ``layers=`` (names, nested paths
    ``"outer/inner"``, globs ``"dense*"`` or Layer objects). A selected variable that does
    not affect the objective raises (``unconnected="raise"``), or gets zeros (``"zero"``)
    or ``None`` (``"none"``).
    """
    request = prepare(model, x, y, loss=loss, target=target, sample_weight=sample_weight,
                      layers=layers, training=training, seed=seed, unconnected=unconnected)
    return loss_and_gradients_of(request, unconnected)[1]


def loss_and_gradients(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    target: Any = None,
    sample_weight: Any = None,
    layers: Any = None,
    training: bool = False,
    seed: int | None = None,
    unconnected: str = "raise",
) -> tuple[float, dict[str, np.ndarray]]:
    """``(objective value, gradients)``: the scalar ``gradients()`` differentiates (the
    compiled loss, ``loss=`` or the ``target=`` sum; mixed-precision scaling undone) and the
    same dict ``gradients()`` returns, from one forward and backward pass."""
    request = prepare(model, x, y, loss=loss, target=target, sample_weight=sample_weight,
                      layers=layers, training=training, seed=seed, unconnected=unconnected)
    return loss_and_gradients_of(request, unconnected)


def loss_and_gradients_of(request: Request, unconnected: str = "raise"):
    """(loss, gradient set) of a prepared request."""
    with original_errors():
        value, grads = request.adapter.gradients(request)
    return value, finish(request, grads, unconnected)
