"""Labels checked against the model's outputs and losses before any work is done.

A framework meets a misnamed ``y`` key, a class index beyond the output or one-hot labels
given to a sparse loss deep inside a traced function (a graph error, a shape error, or on JAX
no error at all: an out-of-range index silently gives a wrong loss). Here each is a
`DataShapeError` naming the output, the key or the labels. Only NumPy labels are read (a
backend tensor is left to its framework); a model that declares no outputs is not checked.
"""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np

from gradkit._errors import DataShapeError, received

_SPARSE = "sparse_categorical_crossentropy"
_CATEGORICAL = "categorical_crossentropy"


def check_labels(model: Any, objective: Any, y: Any) -> None:
    """Raise DataShapeError if `y` cannot be what the objective's losses compare with."""
    if objective.kind not in ("compiled", "loss") or y is None:
        return
    outputs = declared_outputs(model)
    if not outputs:
        return
    losses = objective.spec if objective.kind == "loss" else getattr(model, "loss", None)
    for name, label, shape, loss in _pairs(outputs, y, losses):
        if isinstance(label, np.ndarray) and label.dtype.kind in "biuf":
            _check_kind(name, label, shape, loss_kind(loss), _ignored_class(loss))


def declared_outputs(model: Any) -> dict[str, tuple] | None:
    """{output key: shape} in output order: dict outputs by key, others by output name."""
    struct = getattr(model, "_outputs_struct", None)  # Keras 3 functional
    if struct is None:
        struct = getattr(model, "_nested_outputs", None)  # tf-keras functional
    try:
        tensors = list(model.outputs or [])
    except (AttributeError, ValueError):
        return None
    if isinstance(struct, dict):
        return {key: tuple(t.shape) for key, t in struct.items()}
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in
                                                         range(len(tensors))])
    if len(names) != len(tensors):
        return None
    return {name: tuple(t.shape) for name, t in zip(names, tensors)}


def _pairs(outputs: dict, y: Any, losses: Any) -> list[tuple]:
    """(output key, labels, output shape, loss) per output that has labels."""
    keys = list(outputs)
    if isinstance(y, dict):
        _check_keys(keys, y, losses)
        labels = [y.get(k) for k in keys]
    elif isinstance(y, (list, tuple)):
        if len(y) != len(keys):
            return []  # the count is reported with the loss's own message
        labels = list(y)
    else:
        labels = [y] if len(keys) == 1 else []
    if isinstance(losses, dict):
        per_output = [losses.get(k) for k in keys]
    elif isinstance(losses, (list, tuple)):
        per_output = list(losses) if len(losses) == len(keys) else [None] * len(keys)
    else:
        per_output = [losses] * len(keys)
    return [p for p in zip(keys, labels, outputs.values(), per_output) if p[1] is not None]


def _check_keys(keys: list[str], y: dict, losses: Any) -> None:
    unknown = [k for k in y if k not in keys]
    for key in unknown:
        close = difflib.get_close_matches(str(key), keys, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise DataShapeError(
            f"y has the key {key!r}, but the model's outputs are {keys}.{hint} Key y by "
            "output name. " + received(y_keys=list(y))
        )
    needed = [k for k in keys if not isinstance(losses, dict) or losses.get(k) is not None]
    missing = [k for k in needed if k not in y]
    if missing:
        raise DataShapeError(
            f"y lacks labels for the output(s) {missing}, which have a loss; the model's "
            f"outputs are {keys}. Add them to y, or differentiate other outputs with loss= "
            "or target=. " + received(y_keys=list(y))
        )


def loss_kind(loss: Any) -> str | None:
    """"sparse_categorical_crossentropy", "categorical_crossentropy" or None (other)."""
    if loss is None:
        return None
    if isinstance(loss, str):
        name = loss
    else:
        fn = getattr(loss, "fn", None)
        name = getattr(fn, "__name__", None) or getattr(loss, "__name__", None) \
            or type(loss).__name__
    name = name.lower().replace("_", "")
    kinds = {kind.replace("_", ""): kind for kind in (_SPARSE, _CATEGORICAL)}
    return kinds.get(name)


def _ignored_class(loss: Any) -> Any:
    kwargs = getattr(loss, "_fn_kwargs", None) or {}
    return kwargs.get("ignore_class", getattr(loss, "ignore_class", None))


def _check_kind(name: str, labels: np.ndarray, shape: tuple, kind: str | None,
                ignored: Any) -> None:
    classes = shape[-1] if shape else None
    if kind is None or classes is None or len(shape) < 2:
        return
    if kind == _SPARSE:
        if labels.ndim == len(shape) and labels.shape[-1] == classes and classes > 1:
            raise DataShapeError(
                f"The labels of output {name!r} look one-hot (shape {labels.shape}), but its "
                "loss is sparse_categorical_crossentropy, which takes class indices. Pass "
                "labels.argmax(-1), or use categorical_crossentropy. "
                + received(y_shape=labels.shape, loss=kind)
            )
        valid = labels if ignored is None else labels[labels != ignored]
        bad = valid[(valid < 0) | (valid >= classes) | (valid != np.floor(valid))]
        if bad.size:
            raise DataShapeError(
                f"The labels of output {name!r} must be class indices 0..{classes - 1} (the "
                f"output has {classes} classes), but they hold {np.unique(bad)[:5].tolist()}. "
                "Check the label encoding, or give the output more units. "
                + received(labels_min=valid.min().item(), labels_max=valid.max().item(),
                           classes=classes)
            )
    elif labels.ndim < len(shape) or (labels.shape[-1] == 1 and classes > 1):
        raise DataShapeError(
            f"The labels of output {name!r} look like class indices (shape {labels.shape}), "
            "but its loss is categorical_crossentropy, which takes one-hot rows of "
            f"{classes}. Use sparse_categorical_crossentropy, or one-hot encode them "
            "(np.eye(classes)[labels]). " + received(y_shape=labels.shape, loss=kind)
        )
