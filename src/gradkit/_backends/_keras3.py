"""The objective as Keras 3 computes it, written once with `keras.ops` for all three backends.

This is the backend-neutral half of Keras' own JAX trainer (`compute_loss_and_updates`):
a stateless forward pass, the model's losses (regularizers, `add_loss`) collected from that
pass, and the compiled loss through `stateless_compute_loss`. Every state update the pass
makes (BatchNorm statistics, seed generators, loss metrics) stays inside a StatelessScope and
is thrown away. Each backend adapter only differentiates `objective_value`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from gradkit._backends import _buckets
from gradkit._errors import InvalidArgumentError, received
from gradkit._objective import Objective, data_loss, target_scores
from gradkit._seeds import split_seed, with_rows


def loss_scale(model: Any) -> float:
    """The optimizer's loss-scale factor (mixed precision), or 1.0.

    The loss is multiplied by it before differentiation and the gradients divided by it
    after, as `fit` does, so float16 gradients do not underflow and results are unscaled.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 1.0
    return float(keras.ops.convert_to_numpy(optimizer.scale_loss(np.float32(1.0))))


def resolve_loss(spec: Any) -> Any:
    """A `keras.losses.Loss` for a loss name, Loss or callable (Keras reduction semantics)."""
    if isinstance(spec, keras.losses.Loss):
        return spec
    if isinstance(spec, str):
        try:
            spec = keras.losses.get(spec)
        except ValueError:
            raise InvalidArgumentError(
                f"{spec!r} is not a Keras loss name. Use a name such as 'mse', "
                "'categorical_crossentropy' or 'sparse_categorical_crossentropy', a "
                "keras.losses.Loss, or a callable (y_true, y_pred). " + received(loss=spec)
            ) from None
        if isinstance(spec, keras.losses.Loss):
            return spec
    # The wrapper compile() itself puts around a loss function (keras.losses does not export it).
    from keras.src.losses.losses import LossFunctionWrapper

    return LossFunctionWrapper(spec, reduction="sum_over_batch_size", name="loss_fn")


def prepare_objective(objective: Objective) -> Objective:
    """Resolve a loss name to its Loss once, outside any traced function."""
    if objective.kind == "loss":
        return Objective("loss", resolve_loss(objective.spec))
    return objective


def objective_value(
    model: Any,
    objective: Objective,
    training: bool,
    trainable_values: list,
    non_trainable_values: list,
    metrics_values: list,
    x: Any,
    y: Any,
    sample_weight: Any,
    valid_rows: Any = None,
) -> Any:
    """The unscaled scalar objective at the given variable values; no state is changed.

    `valid_rows` (a boolean vector over the batch) marks the real rows of a batch padded
    to a compiled size: the others get weight 0 (see gradkit._backends._buckets).
    """
    y_pred, losses = forward(model, training, trainable_values, non_trainable_values, x)
    if valid_rows is not None:
        sample_weight = _buckets.exclude_padding(objective, y_pred, sample_weight, valid_rows)
    return objective_of_predictions(model, objective, training, trainable_values,
                                    non_trainable_values, metrics_values, x, y, y_pred,
                                    sample_weight, losses)


def forward(model: Any, training: bool, trainable_values: list, non_trainable_values: list,
            x: Any) -> tuple[Any, list]:
    """(predictions, forward-pass losses: add_loss, activity and weight regularizers)."""
    kwargs = {"training": training} if model._call_has_training_arg else {}
    y_pred, _, losses = model.stateless_call(
        trainable_values, non_trainable_values, x, return_losses=True, **kwargs
    )
    return y_pred, list(losses)


def objective_of_predictions(model, objective, training, trainable_values,
                             non_trainable_values, metrics_values, x, y, y_pred,
                             sample_weight, losses):
    """The objective from a forward pass's predictions and losses (see `forward`)."""
    if objective.kind == "target":
        return target_score(objective.spec, y_pred, sample_weight)
    if objective.kind == "loss":
        total = data_loss(objective.spec, y, y_pred, sample_weight)
        for extra in losses:
            total = total + aggregate(extra)
        return total
    return _compiled_loss(
        model, losses, trainable_values, non_trainable_values, metrics_values,
        x, y, y_pred, sample_weight, training,
    )


def _compiled_loss(model, losses, trainable_values, non_trainable_values, metrics_values,
                   x, y, y_pred, sample_weight, training):
    saved = model._losses_override
    if losses:  # forward-pass losses (add_loss, regularizers) as the JAX trainer passes them
        model._losses_override = list(losses)
    try:
        loss, _ = model.stateless_compute_loss(
            trainable_values, non_trainable_values, metrics_values,
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training,
        )
    finally:
        model._losses_override = saved
    return loss


def aggregate(loss: Any) -> Any:
    if not keras.backend.is_float_dtype(loss.dtype):
        loss = keras.ops.cast(loss, keras.config.floatx())
    return keras.ops.sum(loss)


def target_score(target: Any, y_pred: Any, sample_weight: Any) -> Any:
    """The SUM over the batch of the (optionally weighted) target scores."""
    ops = keras.ops
    scores = target_scores(target, y_pred)
    if not keras.backend.is_float_dtype(scores.dtype):
        scores = ops.cast(scores, "float32")
    if sample_weight is not None:
        weights = ops.cast(sample_weight, scores.dtype)
        for _ in range(len(scores.shape) - len(weights.shape)):
            weights = ops.expand_dims(weights, -1)  # the batch axis may be None when traced
        scores = scores * weights
    return ops.sum(scores)


def variable_values(model: Any, fresh: bool = False) -> tuple[list, list, list]:
    """Current (trainable, non-trainable, metrics) values, read fresh for this call (inside
    `values_held` for `model`: read once, on the first call or a `fresh` one)."""
    held = getattr(_held, "entry", None)
    if held is not None and held[0] is model and held[1] is not None and not fresh:
        return held[1]
    values = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.metrics_variables],
    )
    if held is not None and held[0] is model:
        _held.entry = (model, values)
    return values


_held = threading.local()


@contextlib.contextmanager
def values_held(model: Any) -> Iterator[None]:
    """Read `model`'s variables once for the calls inside the block (a loop over the
    examples of one batch, at the same weights: reading them costs about as much as a small
    model's compiled call); nothing in the block may change them."""
    saved = getattr(_held, "entry", None)
    _held.entry = (model, None)
    try:
        yield
    finally:
        _held.entry = saved


def selected_indices(model: Any, variables: list) -> list[int]:
    """Positions of `variables` in model.trainable_variables."""
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    return [position[id(v)] for v in variables]


# --- dropout seeds (gradkit._seeds): the SeedGenerator states given to stateless_call


def seed_positions(model: Any) -> list[int]:
    """Positions in model.non_trainable_variables of the model's SeedGenerator states."""
    variables = model.non_trainable_variables
    known = _SEED_POSITIONS.get(model)
    if known is None or known[0] != len(variables):
        states = {id(generator.state) for layer in model._flatten_layers()
                  for generator in getattr(layer, "_seed_generators", ())}
        known = (len(variables), [i for i, v in enumerate(variables) if id(v) in states])
        _SEED_POSITIONS[model] = known
    return known[1]


_SEED_POSITIONS: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def seed_data(model: Any, data: dict) -> dict:
    """Host side: an int ``data["seed"]`` as one row per SeedGenerator, plus one."""
    return with_rows(data, len(seed_positions(model)) + 1) if "seed" in data else data


def seeded(fn: Any, model_ref: Any) -> Any:
    """``fn(values, data, ...)`` whose ``data["seed"]`` rows replace the SeedGenerator state
    values (inside the compiled function: the seed is an input, not a constant)."""
    def with_seed(values, data, *rest):
        data, rows = split_seed(data)
        if rows is not None:
            trainable, non_trainable, metrics = values
            non_trainable = list(non_trainable)
            for row, i in enumerate(seed_positions(model_ref())):
                non_trainable[i] = keras.ops.cast(rows[row], non_trainable[i].dtype)
            values = (trainable, non_trainable, metrics)
        return fn(values, data, *rest)

    with_seed.__name__ = getattr(fn, "__name__", "fn")
    return with_seed
