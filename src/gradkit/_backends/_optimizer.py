"""One optimizer step with true-scale gradients, taken the way each flavour's `fit` takes it.

- Keras 3 on TensorFlow and torch: ``optimizer.apply(grads, variables)`` (torch: under
  ``no_grad``), as ``train_step`` does. JAX: ``optimizer.stateless_apply`` on the current
  values, then the new values assigned, as the JAX trainer does (a LossScaleOptimizer's
  ``apply`` cannot run eagerly on JAX: its ``cond`` branches assign variables).
- `fit` hands Keras 3's ``apply`` the gradients of the SCALED loss (``optimizer.scale_loss``:
  a LossScaleOptimizer's dynamic scale, or ``loss_scale_factor``) and ``apply`` divides them
  back. So the true gradients are multiplied by that scale first (a power of two: exact),
  and the LossScaleOptimizer's own state (finite check, step counter, scale growth) moves as
  in `fit`, instead of skipping it through ``inner_optimizer``.
- tf-keras: ``optimizer.apply_gradients(zip(grads, variables))``. Its LossScaleOptimizer
  takes unscaled gradients there (``minimize`` unscales them before), so they go in as
  they are.

An optimizer not yet built is built on all of the model's trainable variables, as `fit`
builds it, so a first call with a subset does not tie it to that subset.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from gradkit._backends._step_state import strategy_scope
from gradkit._errors import (
    InvalidArgumentError,
    NonFiniteGradientError,
    UnsupportedModelError,
    received,
)


def check(flavour: str, optimizer: Any, model: Any, variables: list) -> None:
    """Raise unless `optimizer` is one of this flavour that can update `variables`."""
    if flavour == "tf_keras":
        import tensorflow as tf
        import tf_keras

        if not tf.executing_eagerly():
            raise UnsupportedModelError(
                "gradkit.apply runs on tf-keras models in eager mode, but eager execution is "
                "disabled (tf.compat.v1.disable_eager_execution() was called). Remove that "
                "call. " + received(executing_eagerly=False))
        kinds: tuple = (tf_keras.optimizers.Optimizer, tf_keras.optimizers.legacy.Optimizer)
        base = getattr(optimizer, "_optimizer", optimizer)  # a LossScaleOptimizer's inner one
        index = getattr(base, "_index_dict", None) if getattr(base, "_built", False) else None
        known = None if index is None else (lambda v: base._var_key(v) in index)
    else:
        import keras

        kinds = (keras.optimizers.Optimizer,)
        known = None
        if isinstance(optimizer, kinds) and optimizer.built:
            ids = optimizer._trainable_variables_indices
            known = lambda v: optimizer._var_key(v) in ids  # noqa: E731
    if not isinstance(optimizer, kinds):
        raise InvalidArgumentError(
            f"optimizer= must be an optimizer of the model's Keras ({flavour} flavour), such "
            "as keras.optimizers.SGD(0.1) (tf_keras.optimizers.SGD for tf-keras models); a "
            "name like 'adam' would lose its state after one step. "
            + received(optimizer=optimizer))
    unknown = [v.name for v in variables if known is not None and not known(v)]
    if unknown:
        raise InvalidArgumentError(
            f"The optimizer was built for other variables than model {model.name!r}'s "
            f"(it does not know {', '.join(unknown[:5])}); nothing was applied. Pass the "
            "model's own optimizer or a new one. " + received(optimizer=optimizer.name))


def step(flavour: str, optimizer: Any, model: Any, variables: list, arrays: list) -> None:
    """Apply `arrays` (true-scale, checked) to `variables` with `optimizer`."""
    if flavour == "tf_keras":
        _tf_keras_step(optimizer, model, variables, arrays)
        return
    import keras

    scale = float(keras.ops.convert_to_numpy(optimizer.scale_loss(np.float32(1.0))))
    arrays = [_scaled(a, scale, v) for a, v in zip(arrays, variables)]
    grads = [keras.ops.convert_to_tensor(a, dtype=v.dtype) for a, v in zip(arrays, variables)]
    if flavour == "jax":
        _built(optimizer, model)
        _stateless_step(optimizer, variables, grads)
    elif flavour == "torch":
        import torch

        _built(optimizer, model)
        with torch.no_grad():
            optimizer.apply(grads, variables)
    else:
        with strategy_scope(model):  # a model built in a strategy's scope: applied in it
            _built(optimizer, model)
            _in_replicas(lambda g: optimizer.apply(g, variables), grads)


def _in_replicas(apply: Callable[[list], None], grads: list) -> None:
    """``apply(grads)`` with a TensorFlow optimizer. In a distribution strategy's scope (a
    model built there) it runs inside the replicas, whose optimizer sums what they hand it:
    the first hands `grads`, the others zeros, so the sum is exactly them. (Applied from
    outside them, tf-keras would update each replica's copy in turn, with the optimizer's
    slots moved once per replica, leaving the copies apart; Keras 3 refuses.) Clipping acts on
    the sum on tf-keras, as in its `fit`; on Keras 3 on the first replica's share, all of it
    (its `fit` clips each replica's share of the batch)."""
    import tensorflow as tf

    if not tf.distribute.in_cross_replica_context():  # no strategy
        apply(grads)
        return

    def first_replica_hands_them() -> None:
        first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        apply([tf.where(first, g, tf.zeros_like(g)) for g in grads])

    tf.distribute.get_strategy().run(first_replica_hands_them)


def _built(optimizer: Any, model: Any) -> None:
    if not optimizer.built:
        optimizer.build(model.trainable_variables)


def _stateless_step(optimizer: Any, variables: list, grads: list) -> None:
    """The JAX trainer's step: new values from the current ones, then assigned."""
    chosen = {id(v): g for v, g in zip(variables, grads)}
    tracked = list(optimizer._trainable_variables)  # the order stateless_apply maps
    with warnings.catch_warnings():  # a subset: None for the rest, as intended
        warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
        new_values, new_state = optimizer.stateless_apply(
            [v.value for v in optimizer.variables], [chosen.get(id(v)) for v in tracked],
            [v.value for v in tracked])
    for v, value in zip(tracked, new_values):
        if id(v) in chosen:
            v.assign(value)
    for v, value in zip(optimizer.variables, new_state):
        v.assign(value)


def _tf_keras_step(optimizer: Any, model: Any, variables: list, arrays: list) -> None:
    import tensorflow as tf
    import tf_keras

    arrays = [_scaled(a, 1.0, v) for a, v in zip(arrays, variables)]
    if hasattr(optimizer, "_gradients_have_been_unscaled"):
        # gradkit scaled the loss and unscaled the gradients: true, and it silences the
        # LossScaleOptimizer's "you forgot to call get_scaled_loss()" warning.
        optimizer._loss_has_been_scaled = optimizer._gradients_have_been_unscaled = True
    grads = [tf.convert_to_tensor(a, dtype=v.dtype) for a, v in zip(arrays, variables)]
    with strategy_scope(model):
        if isinstance(optimizer, tf_keras.optimizers.Optimizer):
            with tf.init_scope():
                optimizer.build(model.trainable_variables)  # a no-op once built
        _in_replicas(lambda g: optimizer.apply_gradients(zip(g, variables)), grads)


def _scaled(array: np.ndarray, scale: float, variable: Any) -> np.ndarray:
    """`array` times the loss scale, checked to stay finite in the variable's dtype."""
    if scale != 1.0:
        with np.errstate(over="ignore"):
            array = array * np.asarray(scale, array.dtype)
    name = str(getattr(variable.dtype, "name", variable.dtype))
    limit = np.finfo(np.float16).max if name == "float16" else np.finfo(array.dtype).max
    if not np.all(np.abs(array) <= limit):
        raise NonFiniteGradientError(
            f"The gradient of {variable.name!r} times the loss scale {scale:g} overflows "
            f"{name}, so the optimizer would skip the step; nothing was applied. Lower the "
            "loss scale or clip the gradients (gradkit.transforms.clip_by_global_norm). "
            + received(loss_scale=scale))
    return array
