"""`activation_gradients()`: the gradient of the objective with respect to layer outputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._errors import (
    InvalidArgumentError,
    UnconnectedGradientError,
    original_errors,
    received,
)
from gradkit._request import prepare, report_nonfinite, result_dtype
from gradkit._select import layer_keys, resolve_layers


def activation_gradients(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    layers: Any,
    loss: Any = None,
    target: Any = None,
    training: bool = False,
    seed: int | None = None,
    unconnected: str = "raise",
    return_activations: bool = False,
) -> Any:
    """The gradient of the objective with respect to the outputs of the chosen layers.

    Returns ``{layer key: array shaped like that layer's output}`` in the order the layers
    were selected (float32; float64 for float64 outputs); with ``return_activations=True``,
    ``(gradients, activations)``, two dicts with the same keys (Grad-CAM needs both). A
    layer's key is the one every result keyed by layer uses (per_example_norms with
    ``by_layer=True``, GradientStats.layers): the path its variables carry, i.e. their keys
    without the last part (``"dense"`` in a Functional model, ``"sequential/dense"`` in a
    Keras 3 Sequential); a layer without variables of its own: its Keras path, else its
    path of names inside the model.

    ``layers=``: names, nested paths, globs (``"conv*"``) or Layer objects; layers inside
    nested models and on residual branches included. The gradient is taken with respect to
    a zero perturbation added to the layer's output, so it counts every path from that
    output to the objective (the skip connection and the residual branch alike).

    Scale: the objective is the one ``gradients()`` differentiates: with ``loss=None`` the
    compiled loss, by default the MEAN over the batch (row ``i`` is ``1/N`` of example ``i``'s
    own gradient); ``loss=`` a Keras loss (Keras reduction); ``target=k`` or a callable the
    SUM over the batch of the scores (row ``i`` is example ``i``'s own score gradient).
    Mixed-precision loss scaling is undone. No model state changes; the model is restored
    exactly even if an error is raised.

    A layer whose output does not affect the objective raises (``unconnected="raise"``),
    or gets zeros (``"zero"``) or ``None`` (``"none"``). A layer called more than once in
    one forward pass (a shared layer), one that is not called, or one whose output is not
    a single floating-point tensor, is a clear error. Globs skip InputLayers (they are never
    called; ``input_gradients`` gives the gradient at the inputs).
    """
    if layers is None:
        raise InvalidArgumentError(
            "layers= is required: the layers whose outputs to differentiate (names, nested "
            "paths, globs or Layer objects). " + received(layers=None)
        )
    if not isinstance(return_activations, (bool, np.bool_)):
        raise InvalidArgumentError(
            "return_activations= must be True or False. "
            + received(return_activations=return_activations)
        )
    request = prepare(model, x, y, loss=loss, target=target, training=training, seed=seed,
                      unconnected=unconnected)
    chosen = _resolve(model, layers)
    keys = layer_keys(model, chosen)
    with original_errors():
        _, grads, outputs = request.adapter.activation_gradients(
            request, chosen, keys, bool(return_activations) or unconnected == "zero")
    result = _apply_unconnected(keys, grads, outputs, unconnected)
    report_nonfinite(result, request.batch)
    if not return_activations:
        return result
    return result, {key: _as_float(out) for key, out in zip(keys, outputs)}


def _resolve(model: Any, layers: Any) -> list[Any]:
    """The selected layers; an InputLayer (never called) only if named, not by a glob."""
    chosen = resolve_layers(model, layers)
    specs = list(layers) if isinstance(layers, (list, tuple, set)) else [layers]
    named = [s for s in specs if not (isinstance(s, str) and any(c in s for c in "*?["))]
    explicit = {id(layer) for layer in resolve_layers(model, named)} if named else set()
    kept = [layer for layer in chosen
            if id(layer) in explicit or type(layer).__name__ != "InputLayer"]
    return kept or chosen  # only InputLayers: let the adapter explain


def _apply_unconnected(keys, grads, outputs, unconnected) -> dict[str, Any]:
    missing = [key for key, grad in zip(keys, grads) if grad is None]
    if missing and unconnected == "raise":
        raise UnconnectedGradientError(
            f"The output of {len(missing)} selected layer(s) does not affect the objective, so "
            f"its gradient is undefined: {', '.join(missing)}. Select layers on the path to "
            "the loss or target, or pass unconnected='zero' (zeros) or unconnected='none' "
            "(None) to accept it. " + received(unconnected=unconnected)
        )
    result: dict[str, Any] = {}
    for key, grad, output in zip(keys, grads, outputs):
        if grad is not None:
            result[key] = _as_float(grad)
        elif unconnected == "zero":
            result[key] = np.zeros_like(_as_float(output))
        else:
            result[key] = None
    return result


def _as_float(value: Any) -> np.ndarray:
    array = np.asarray(value)
    return array.astype(result_dtype(array), copy=False)
