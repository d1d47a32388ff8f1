"""Where NaN or Inf first appear on a batch: in the forward pass, and in backpropagation."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gradkit._activation_gradients import activation_gradients
from gradkit._errors import NonFiniteGradientWarning
from gradkit._objective import resolve_objective
from gradkit._select import model_layers


def locate_nonfinite(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    layers: Any = None,
    loss: Any = None,
    training: bool = True,
    seed: int | None = None,
) -> dict:
    """The layers where NaN or Inf first appear on this batch (`GradientMonitor` reports
    the batch whose gradients held them: run this on it).

    Returns ``{"output": key or None, "gradient": key or None, "layers": {key: (a, g)}}``:

    - ``"output"``: the first layer, in forward order, whose output holds NaN/Inf (None if
      every output is finite);
    - ``"gradient"``: the layer nearest the objective whose output gradient holds NaN/Inf,
      i.e. the first one backpropagation meets: the non-finite value was made by the
      backward pass of the layer after it (or by the loss, if it is the last layer). With a
      non-finite output upstream, every gradient downstream is usually non-finite too:
      look at ``"output"`` first;
    - ``"layers"``: per layer key, in forward order, the NaN/Inf counts of its output and
      of its output gradient.

    The objective is the one ``gradients()`` differentiates (``loss=``), with dropout on
    (``training=True``, as in ``fit``; ``seed=`` fixes its masks). ``layers=``: which layers
    to look at (names, globs, Layer objects). By default every layer of the model's graph and
    of the models nested in it, but not the sublayers a layer keeps inside (an LSTM's cell,
    attention's projections), the inputs, or a layer whose output is several tensors (an RNN
    returning its states). A shared layer, or one with several outputs named in ``layers=``,
    is a clear error: leave it out. No model state changes.
    """
    resolve_objective(model, loss, None, y, scores=False)  # fail early; no target= here
    if layers is None:
        layers = model_layers(model)
    with warnings.catch_warnings():  # non-finite gradients are what is looked for here
        warnings.simplefilter("ignore", NonFiniteGradientWarning)
        grads, outputs = activation_gradients(
            model, x, y, layers=layers, loss=loss, training=training, seed=seed,
            unconnected="none", return_activations=True)
    counts = {key: (_nonfinite(outputs[key]), _nonfinite(grads[key])) for key in grads}
    output = next((key for key, (a, _) in counts.items() if a), None)
    gradient = next((key for key, (_, g) in reversed(counts.items()) if g), None)
    return {"output": output, "gradient": gradient, "layers": counts}


def _nonfinite(array: Any) -> int:
    return 0 if array is None else int(np.size(array) - np.count_nonzero(np.isfinite(array)))
