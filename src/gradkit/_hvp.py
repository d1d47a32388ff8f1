"""`hvp()`: the Hessian of the objective of `gradients()` times a vector, without forming H."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._errors import DataShapeError, InvalidArgumentError, original_errors, received
from gradkit._request import Request, check_connected, finish, prepare, result_dtype
from gradkit._select import walk_layers


def hvp(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    vector: dict,
    loss: Any = None,
    target: Any = None,
    sample_weight: Any = None,
    layers: Any = None,
    training: bool = False,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """The Hessian-vector product ``H v`` of the objective ``gradients()`` differentiates.

    ``H`` is the Hessian of that same scalar (with ``loss=None`` the compiled loss as ``fit``
    computes it, by default the MEAN over the batch, regularizers included; ``loss=`` and
    ``target=`` as in ``gradients()``) with respect to the selected variables (all trainable
    ones, or those of ``layers=``: then ``H`` is that diagonal block). ``vector`` is a
    gradient set with exactly those keys and the variables' shapes, e.g. the output of
    ``gradients()``. Returns ``{variable path: array}`` with the same keys, order and dtypes
    as ``gradients()``. Mixed-precision loss scaling is undone.

    Exact, not a finite difference: forward-over-reverse or reverse-over-reverse automatic
    differentiation in the backend, compiled and cached like ``gradients()``. ``training``
    as in ``gradients()`` (dropout masks are part of the function differentiated); no model
    state changes. A selected variable that does not affect the objective raises.
    """
    request = prepare(model, x, y, loss=loss, target=target, sample_weight=sample_weight,
                      layers=layers, training=training, seed=seed)
    check_exact_second_order(request)
    tangents = checked_vector(request, vector)
    with original_errors():
        _, products = request.adapter.hvp(request, tangents)
    check_connected(request.keys, [p is not None for p in products], what="Hessian",
                    layers=request.layers)
    return finish(request, products)


def check_exact_second_order(request: Request) -> None:
    """Refuse what TensorFlow would get silently wrong: its batch-moments op stops the
    gradient at the mean inside the variance, which leaves first derivatives exact but
    drops terms of second ones, so H through BatchNormalization in training mode is off."""
    if request.flavour not in ("tensorflow", "tf_keras") or not request.training:
        return
    for path, layer in walk_layers(request.model):
        if "BatchNormalization" in type(layer).__name__ and layer.trainable:
            raise InvalidArgumentError(
                f"hvp with training=True on TensorFlow would be wrong through layer {path!r} "
                f"({type(layer).__name__}): TensorFlow's moments op stops the gradient at the "
                "batch mean, which gives exact first but not second derivatives. Pass "
                "training=False (moving statistics), freeze the layer (trainable=False), or "
                "use the JAX or torch backend. " + received(training=True, layer=path)
            )


def checked_vector(request: Request, vector: Any) -> list[np.ndarray]:
    """The arrays of `vector` in variable order, checked against the selected variables."""
    keys = request.keys
    if not isinstance(vector, dict):
        raise InvalidArgumentError(
            "vector= must be a gradient set: a dict {variable path: array} with the keys of "
            "gradients(model, x, y, layers=...), e.g. its output. "
            + received(vector=type(vector).__name__)
        )
    missing = [k for k in keys if k not in vector]
    extra = [k for k in vector if k not in set(keys)]
    if missing or extra:
        raise InvalidArgumentError(
            f"vector= must have exactly the keys of the selected variables; missing: "
            f"{missing[:5]}, not selected: {extra[:5]}. Build it from gradients() with the "
            "same layers=. " + received(missing=len(missing), extra=len(extra))
        )
    arrays = []
    for key, variable in zip(keys, request.variables):
        array = np.asarray(vector[key])
        if array.shape != tuple(variable.shape) or array.dtype.kind not in "fiu":
            raise DataShapeError(
                f"vector[{key!r}] has shape {array.shape} and dtype {array.dtype}; it must "
                f"be a real array of the variable's shape {tuple(variable.shape)}. "
                + received(key=key, shape=array.shape)
            )
        arrays.append(array.astype(result_dtype(variable), copy=False))
    return arrays
