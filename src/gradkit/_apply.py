"""gradkit.apply: one optimizer step with a gradient set, as `fit`'s own apply step takes it.

The front door checks everything first (keys, shapes, dtypes, finiteness, the optimizer), so
a bad gradient set changes nothing; then the flavour's step (`gradkit._backends._optimizer`)
hands the gradients to the optimizer exactly as `fit` does after differentiating.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradkit._backends import _optimizer
from gradkit._detect import flavour_of
from gradkit._errors import InvalidArgumentError, NonFiniteGradientError, received
from gradkit._request import check_built, result_dtype
from gradkit._select import unique_keys


def apply(model: Any, grads: Mapping[str, Any], *, optimizer: Any = None) -> None:
    """Take one optimizer step on `model` with `grads`, the TRUE-scale gradients.

    `grads` is a gradient set ``{variable path: array}`` as `gradkit.gradients` returns it
    (possibly changed, e.g. by `gradkit.transforms`): its keys are the model's trainable
    variable paths, all of them or a subset. Only the variables in `grads` are updated (a
    ``None`` value counts as absent); the optimizer's step counter advances once.

    The step is the one `fit` takes after differentiating, through the model's compiled
    optimizer or `optimizer`: Keras 3 ``optimizer.apply(grads, variables)`` (JAX:
    ``optimizer.stateless_apply``, as its trainer does), tf-keras
    ``optimizer.apply_gradients``. The optimizer's own clipping (``clipnorm``,
    ``global_clipnorm``, ``clipvalue``), weight decay and variable constraints apply as in
    `fit`. With a ``LossScaleOptimizer`` the gradients are not divided by the loss scale
    (they are already true-scale), and its dynamic scale advances as in `fit`. So
    ``apply(model, gradients(model, x, y, training=True))`` moves the weights and the
    optimizer's variables as ``model.train_on_batch(x, y)`` does (a model without dropout;
    up to float rounding). An optimizer not yet built is built on all trainable variables.
    A model built in a TF distribution strategy's scope takes the step inside its replicas,
    the whole of `grads` on the first, so its clipping acts on the whole gradient.

    Nothing changes if any check fails: unknown keys, a shape other than the variable's, a
    non-real dtype, NaN or Inf (`NonFiniteGradientError`), or no optimizer.
    """
    flavour = flavour_of(model)
    check_built(model)
    optimizer = _optimizer_of(model, optimizer)
    variables, arrays = _checked(model, grads)
    _optimizer.check(flavour, optimizer, model, variables)
    _optimizer.step(flavour, optimizer, model, variables, arrays)


def _optimizer_of(model: Any, optimizer: Any) -> Any:
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise InvalidArgumentError(
                f"Model {model.name!r} has no optimizer to apply the gradients with. Compile "
                "it with one (model.compile(optimizer='adam', ...)) or pass optimizer= "
                "(a Keras optimizer; it keeps its state between calls). "
                + received(optimizer=None))
    return optimizer


def _checked(model: Any, grads: Any) -> tuple[list, list[np.ndarray]]:
    """The variables named in `grads` (model order) and their gradients as checked arrays."""
    if not isinstance(grads, Mapping):
        raise InvalidArgumentError(
            "apply() takes a gradient set: a dict {variable path: array} as "
            "gradkit.gradients returns it. Pass the dict itself. " + received(grads=grads))
    trainable = list(model.trainable_variables)
    keys = unique_keys(trainable)
    unknown = [k for k in grads if k not in keys]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), keys, n=3, cutoff=0.5)
        hint = f"Did you mean {', '.join(map(repr, close))}? " if close else ""
        raise InvalidArgumentError(
            f"{len(unknown)} key(s) of the gradient set name no trainable variable of model "
            f"{model.name!r}: {', '.join(map(repr, unknown[:5]))}. {hint}Keys are the "
            f"variable paths gradkit.gradients(model, ...) gives: {', '.join(keys[:8])}"
            f"{' ...' if len(keys) > 8 else ''}. " + received(key=unknown[0]))
    variables, arrays, bad = [], [], []
    for key, variable in zip(keys, trainable):
        if grads.get(key) is None:
            continue
        array = _array(key, grads[key], variable)
        if not np.all(np.isfinite(array)):
            bad.append(key)
        variables.append(variable)
        arrays.append(array)
    if bad:
        raise NonFiniteGradientError(
            f"The gradients of {len(bad)} variable(s) hold NaN or Inf (in their dtype): "
            f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. Nothing was applied. "
            "Skip this step, or wrap the transforms in gradkit.transforms.apply_if_finite. "
            + received(key=bad[0]))
    if not variables:
        raise InvalidArgumentError(
            "The gradient set has no arrays to apply (it is empty or all None). Pass the "
            "gradients of at least one trainable variable. " + received(grads=dict(grads)))
    return variables, arrays


def _array(key: str, value: Any, variable: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # a framework tensor NumPy cannot read
        raise InvalidArgumentError(
            f"The gradient of {key!r} could not be read as a NumPy array ({exc}). Pass NumPy "
            "arrays, as gradkit.gradients returns them. " + received(**{key: value})) from None
    if array.dtype.kind not in "fiu":
        raise InvalidArgumentError(
            f"The gradient of {key!r} has dtype {array.dtype}, not a real number type. Pass "
            "floating-point arrays (float32, as gradkit.gradients returns them). "
            + received(**{key: array}))
    shape = tuple(variable.shape)
    if array.shape != shape:
        raise InvalidArgumentError(
            f"The gradient of {key!r} has shape {array.shape}, but the variable has shape "
            f"{shape}; nothing was applied. Pass the gradient of that variable, unreshaped. "
            + received(**{key: array}))
    with np.errstate(over="ignore"):  # a float64 value beyond float32 becomes Inf: reported
        return array.astype(result_dtype(variable), copy=False)
