"""The front door: `gradients()` checks its arguments, then hands one batch to the adapter."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gradkit import _backends
from gradkit._data import Batch, leaves, prepare_batch
from gradkit._detect import flavour_of
from gradkit._errors import (
    InvalidArgumentError,
    NonFiniteGradientWarning,
    UnconnectedGradientError,
    UnsupportedModelError,
    original_errors,
    received,
)
from gradkit._objective import Objective, resolve_objective
from gradkit._select import select_variables, unique_keys

UNCONNECTED_MODES = ("raise", "zero", "none")


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

    Which variables: all trainable ones, or those of ``layers=`` (names, nested paths
    ``"outer/inner"``, globs ``"dense*"`` or Layer objects). A selected variable that does
    not affect the objective raises (``unconnected="raise"``), or gets zeros (``"zero"``)
    or ``None`` (``"none"``).
    """
    flavour, variables, objective, batch = _prepare(
        model, x, y, loss, target, sample_weight, layers, training, unconnected
    )
    with original_errors():
        _, grads = _backends.load(flavour).compute_gradients(
            model, variables, objective, batch, bool(training)
        )
    return finish(variables, grads, unconnected, batch)


def _prepare(model, x, y, loss, target, sample_weight, layers, training, unconnected):
    flavour = flavour_of(model)
    check_built(model)
    if unconnected not in UNCONNECTED_MODES:
        raise InvalidArgumentError(
            f"unconnected= must be one of {UNCONNECTED_MODES}. " + received(unconnected=unconnected)
        )
    if not isinstance(training, (bool, np.bool_)):
        raise InvalidArgumentError(
            "training= must be True or False. " + received(training=training)
        )
    objective: Objective = resolve_objective(model, loss, target, y)
    variables = select_variables(model, layers)
    batch = prepare_batch(model, x, y, sample_weight, _floatx(flavour))
    return flavour, variables, objective, batch


def check_built(model: Any) -> None:
    """Raise if the model has no weights yet (a Sequential without Input, never called)."""
    if not getattr(model, "built", True):
        raise UnsupportedModelError(
            f"Model {model.name!r} has not been built, so it has no weights to differentiate. "
            "Build it first: call it once on a batch (model(x[:1])) or call model.build(...). "
            + received(built=False)
        )


def _floatx(flavour: str) -> str:
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras.backend.floatx()
    import keras

    return keras.config.floatx()


def finish(
    variables: list, grads: list, unconnected: str, batch: Batch | None = None
) -> dict[str, Any]:
    """Name the adapter's arrays, apply the `unconnected` rule and report NaN/Inf."""
    keys = unique_keys(variables)
    missing = [k for k, g in zip(keys, grads) if g is None]
    if missing and unconnected == "raise":
        raise UnconnectedGradientError(
            f"{len(missing)} selected variable(s) do not affect the loss, so their gradient "
            f"is undefined: {', '.join(missing)}. Select other layers with layers=, or pass "
            "unconnected='zero' (zeros) or unconnected='none' (None) to accept it. "
            + received(unconnected=unconnected)
        )
    result: dict[str, Any] = {}
    for key, variable, grad in zip(keys, variables, grads):
        dtype = _result_dtype(variable)
        if grad is None:
            result[key] = np.zeros(tuple(variable.shape), dtype) if unconnected == "zero" else None
        else:
            result[key] = np.asarray(grad, dtype=dtype).reshape(tuple(variable.shape))
    report_nonfinite(result, batch)
    return result


def _result_dtype(variable: Any) -> np.dtype:
    name = getattr(variable.dtype, "name", variable.dtype)
    return np.dtype("float64") if str(name) == "float64" else np.dtype("float32")


def report_nonfinite(result: dict[str, Any], batch: Batch | None = None) -> None:
    """Warn, naming the variables, if any gradient holds NaN or Inf."""
    bad = [k for k, g in result.items() if g is not None and not np.all(np.isfinite(g))]
    if not bad:
        return
    cause = ""
    if batch is not None:
        arrays = [a for a in leaves(batch.x) + leaves(batch.y) if isinstance(a, np.ndarray)]
        count = sum(int(np.sum(~np.isfinite(a))) for a in arrays if a.dtype.kind == "f")
        if count:
            cause = f" The data itself holds {count} NaN/Inf value(s)."
    warnings.warn(
        f"Non-finite gradient (NaN or Inf) in {len(bad)} variable(s): {', '.join(bad[:10])}"
        f"{' ...' if len(bad) > 10 else ''}.{cause} Check the data for NaN/Inf, the loss "
        "for log(0) or division by zero, and the learning rate for divergence.",
        NonFiniteGradientWarning,
        stacklevel=3,
    )
