"""tf-keras in graph mode (after `tf.compat.v1.disable_eager_execution()`).

The Keras 2 idiom, done once and cached: gradient tensors of the objective are built in the
Keras graph from the model's own input placeholders and outputs (`tf.gradients`), then
evaluated with the Keras session, feeding the learning phase (1 = training). Only the
gradient tensors are run, never the model's update ops, so BatchNorm statistics, metrics and
weights are untouched. The compiled objective is assembled as the v1 training loop assembles
`model.total_loss` (per-output losses with their loss weights, sample weights, then the
model's regularization and `add_loss` losses). Loss scaling is not applied: the result is the
gradient of the unscaled loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from tf_keras.src import backend  # get_graph/get_session/learning phase (not in tf_keras.backend)

from gradkit._backends import _cache
from gradkit._data import leaves
from gradkit._errors import InvalidArgumentError, UnsupportedModelError, received


class _Graph:
    """Placeholders and fetches of one cached gradient computation."""

    def __init__(self, ys, sample_weight, loss, grads):
        self.ys, self.sample_weight, self.loss, self.grads = ys, sample_weight, loss, grads


def compute_gradients(request) -> tuple[float, list]:
    """(loss, [gradient or None per selected variable]) of a prepared request."""
    model, variables, objective = request.model, request.variables, request.objective
    batch, training = request.batch, request.training
    inputs = list(getattr(model, "inputs", None) or [])
    if not inputs:
        raise UnsupportedModelError(
            f"In graph mode gradkit differentiates models with symbolic inputs (functional or "
            f"Sequential with an Input), but model {model.name!r} has none. Build it from "
            "tf_keras.Input(...) or run in eager mode. " + received(inputs=None)
        )
    xs, ys = _input_arrays(model, batch.x), _output_arrays(model, batch.y)
    key = ("graph", request.cache_key(), tuple(_spec(a) for a in ys),
           batch.sample_weight is not None)

    def build():
        with backend.get_graph().as_default():
            return _build(model, variables, objective, ys, batch.sample_weight)

    graph = _cache.cached(model, key, build)
    feed = dict(zip(inputs, xs))
    feed.update(zip(graph.ys, ys))
    if graph.sample_weight is not None:
        feed[graph.sample_weight] = np.asarray(batch.sample_weight)
    phase = backend.symbolic_learning_phase()
    if not isinstance(phase, int):
        feed[phase] = bool(training)
    fetches = [graph.loss] + [g for g in graph.grads if g is not None]
    values = iter(backend.get_session().run(fetches, feed))
    loss = next(values)
    return float(loss), [None if g is None else next(values) for g in graph.grads]


def _input_arrays(model, x) -> list:
    if isinstance(x, dict):
        return [np.asarray(x[name]) for name in model.input_names]
    return [np.asarray(a) for a in leaves(x)]


def _output_arrays(model, y) -> list:
    if isinstance(y, dict):
        return [np.asarray(y[name]) for name in model.output_names if name in y]
    return [np.asarray(a) for a in leaves(y)]


def _spec(array: np.ndarray) -> tuple:
    return (array.dtype.str, array.shape[1:])


def _placeholder(array: np.ndarray) -> Any:
    return tf.compat.v1.placeholder(tf.as_dtype(array.dtype), [None, *array.shape[1:]])


def _build(model, variables, objective, ys, sample_weight) -> _Graph:
    y_phs = [_placeholder(a) for a in ys]
    sw_ph = None
    if sample_weight is not None:
        sw_ph = _placeholder(np.asarray(sample_weight, backend.floatx()))
    outputs = list(model.outputs)
    y_pred = outputs[0] if len(outputs) == 1 else outputs
    if objective.kind == "compiled":
        loss = _compiled_loss(model, y_phs, sw_ph)
    else:
        from gradkit._backends.tf_keras import objective_value, prepare_objective

        y = y_phs[0] if len(y_phs) == 1 else (y_phs or None)
        loss = objective_value(model, prepare_objective(objective), model.inputs, y, sw_ph,
                               y_pred)
    grads = tf.gradients(loss, variables)
    return _Graph(y_phs, sw_ph, loss, grads)


def _compiled_loss(model, y_phs, sample_weight):
    """`model.total_loss` of the v1 training loop, with our own target and weight inputs."""
    endpoints = [e for e in model._training_endpoints if not e.should_skip_target()]
    if len(endpoints) != len(y_phs):
        raise InvalidArgumentError(
            f"The model's compiled loss compares {len(endpoints)} output(s) with targets, but "
            f"y holds {len(y_phs)} array(s). Pass one target array per output with a loss. "
            + received(y_count=len(y_phs))
        )
    terms = []
    for endpoint, y_true in zip(endpoints, y_phs):
        y_true = tf.cast(y_true, endpoint.output.dtype) if y_true.dtype.is_floating else y_true
        value = endpoint.loss_fn(y_true, endpoint.output, sample_weight=sample_weight)
        terms.append(endpoint.loss_weight * value)
    terms += model.get_losses_for(None) + model.get_losses_for(model.inputs)
    if not terms:
        return tf.constant(0.0)
    wide = any(term.dtype == tf.float64 for term in terms)
    return tf.add_n([tf.cast(term, tf.float64 if wide else tf.float32) for term in terms])
