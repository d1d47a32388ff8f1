"""`input_gradients()`: the gradient of the objective with respect to the model's inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._data import leaves, map_structure
from gradkit._errors import InvalidArgumentError, original_errors, received
from gradkit._request import prepare, report_nonfinite, result_dtype
from gradkit._select import walk_layers


def input_gradients(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    target: Any = None,
    sample_weight: Any = None,
    training: bool = False,
    seed: int | None = None,
) -> Any:
    """The gradient of the objective with respect to each model input, as NumPy.

    Returns an array shaped like ``x`` (or a list/dict mirroring a multi-input ``x``),
    float32 (float64 for float64 inputs). Saliency maps, attribution and adversarial
    directions start here.

    Scale: the objective is the one ``gradients()`` differentiates. With ``loss=None`` it is
    the compiled loss as ``fit`` computes it, by default the MEAN over the batch, so row ``i``
    is ``1/N`` times the gradient of example ``i``'s own loss (plus its share of any
    regularizer that depends on the inputs). ``loss=`` replaces the compiled loss (Keras
    reduction). ``target=k`` (or a callable on the outputs) differentiates the SUM over the
    batch of the scores, so row ``i`` is exactly the gradient of example ``i``'s own score
    (weighted by ``sample_weight`` if given). Mixed-precision loss scaling is undone.

    Rows never mix: unless the model has layers that couple examples (BatchNorm with
    ``training=True``), changing example ``j`` leaves row ``i`` unchanged. An input the
    objective does not depend on gets zeros. No model state changes (``training=True``
    included). Integer inputs (token ids) have no gradient: next to float inputs they come
    back as None; a model whose inputs are all integers, or none of whose float inputs
    reaches the objective differentiably (token ids given as floats, which an Embedding
    casts to integers), raises, pointing to
    ``activation_gradients(model, x, layers="<embedding layer>")``.
    """
    request = prepare(model, x, y, loss=loss, target=target, sample_weight=sample_weight,
                      training=training, seed=seed)
    batch = request.batch
    _check_float_inputs(model, batch.x)
    with original_errors():
        _, grads = request.adapter.input_gradients(request)
    _check_some_input_reaches(model, batch.x, grads)
    arrays = [_as_result(g, leaf) if _is_float(leaf) else None
              for g, leaf in zip(grads, leaves(batch.x))]
    report_nonfinite(dict(zip(_input_names(batch.x), arrays)), batch)
    feed = iter(arrays)
    return map_structure(lambda _: next(feed), batch.x)


def _as_result(grad: Any, leaf: Any) -> np.ndarray:
    shape = tuple(int(d) for d in leaf.shape)
    dtype = result_dtype(leaf)
    if grad is None:
        return np.zeros(shape, dtype)
    return np.asarray(grad, dtype=dtype).reshape(shape)


def _dtype_name(leaf: Any) -> str:
    name = str(getattr(leaf.dtype, "name", leaf.dtype))
    return name.rsplit(".", 1)[-1]  # torch.float32 -> float32


def _input_names(x: Any) -> list[str]:
    if isinstance(x, dict):
        return [f"x[{key!r}]" for key in x]
    if isinstance(x, (list, tuple)):
        return [f"x[{i}]" for i in range(len(x))]
    return ["x"]


def _is_float(leaf: Any) -> bool:
    return "float" in _dtype_name(leaf)


def _check_float_inputs(model: Any, x: Any) -> None:
    """Raise unless some input is float (the others, token ids, get None)."""
    if any(_is_float(leaf) for leaf in leaves(x)):
        return
    name, leaf = _input_names(x)[0], leaves(x)[0]
    raise InvalidArgumentError(
        f"Input {name} holds {_dtype_name(leaf)} values (token ids or categories), which "
        "have no gradient. Differentiate the first layer's float output instead: "
        f"gradkit.activation_gradients(model, x, ..., {_reader_hint(model)}). "
        + received(input=name, dtype=_dtype_name(leaf))
    )


def _check_some_input_reaches(model: Any, x: Any, grads: list) -> None:
    """Raise if no float input reaches the objective through differentiable operations
    (its gradient would be zeros everywhere): float token ids, which an Embedding casts to
    integers, are the usual cause."""
    floats = [(name, g) for name, g, leaf in zip(_input_names(x), grads, leaves(x))
              if _is_float(leaf)]
    if floats and all(g is None for _, g in floats):
        raise InvalidArgumentError(
            f"No float input ({', '.join(name for name, _ in floats)}) reaches the objective "
            "through differentiable operations, so every input gradient would be zero. If "
            "the input holds token ids as floats (an Embedding casts them to integers), "
            "differentiate the layer that reads them instead: gradkit.activation_gradients("
            f"model, x, ..., {_reader_hint(model)}). "
            + received(inputs=[name for name, _ in floats])
        )


def _reader_hint(model: Any) -> str:
    embeddings = [path for path, layer in walk_layers(model)
                  if "Embedding" in type(layer).__name__]
    return f"layers={embeddings[0]!r}" if embeddings else "layers=<the layer that reads them>"
