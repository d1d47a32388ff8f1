"""tf-keras (Keras 2), eager mode: a GradientTape inside a cached `tf.function`.

tf-keras layers assign their state during the call (BatchNorm moving statistics, loss
metrics), so the function reads that state first and writes the same values back after the
gradient: the model leaves the call bitwise as it entered. The batch axis of the input
signature is open (None), so a new batch size does not retrace.
"""

from __future__ import annotations

import weakref
from typing import Any

import tensorflow as tf
import tf_keras

from gradkit._backends import _cache
from gradkit._backends.tensorflow import (
    _inputs,
    _relaxed_spec,
    _scale_tensor,
    _signature_key,
    tapped_gradients,
    watched_taps,
)
from gradkit._backends._taps import OutputTaps
from gradkit._data import Batch, leaves, map_structure
from gradkit._errors import InvalidArgumentError, UnsupportedModelError, received
from gradkit._objective import Objective, data_loss, target_scores

_CACHE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def compute_gradients(model, variables, objective: Objective, batch: Batch, training: bool):
    if not tf.executing_eagerly():  # tf.compat.v1.disable_eager_execution() was called
        from gradkit._backends import tf_keras_graph

        return tf_keras_graph.compute_gradients(model, variables, objective, batch, training)
    if not model.built or not model.variables:
        raise UnsupportedModelError(
            f"Model {model.name!r} has not been built, so it has no weights to differentiate. "
            "Call it once on a batch (model(x[:1])) or call model.build(...) first. "
            + received(built=model.built)
        )
    inputs = _inputs(batch)
    signature = map_structure(_relaxed_spec, inputs)
    scale = _loss_scale(model)
    key = (tuple(id(v) for v in variables), objective.cache_key(), bool(training),
           _signature_key(signature), scale != 1.0)
    per_model = _cache.per_model(_CACHE, model)
    if key not in per_model:
        per_model[key] = _build(model, variables, objective, training, signature,
                                scaled=scale != 1.0)
    loss, grads = per_model[key](inputs, _scale_tensor(scale))
    return float(loss), [None if g is None else g.numpy() for g in grads]


def _loss_scale(model: Any) -> float:
    optimizer = getattr(model, "optimizer", None)
    scale = getattr(optimizer, "loss_scale", None) if optimizer is not None else None
    return 1.0 if scale is None else float(scale)


def _resolve_loss(spec: Any) -> Any:
    if isinstance(spec, tf_keras.losses.Loss):
        return spec
    if isinstance(spec, str):
        try:
            spec = tf_keras.losses.get(spec)
        except ValueError:
            raise InvalidArgumentError(
                f"{spec!r} is not a tf-keras loss name. Use a name such as 'mse' or "
                "'categorical_crossentropy', a tf_keras.losses.Loss, or a callable "
                "(y_true, y_pred). " + received(loss=spec)
            ) from None
        if isinstance(spec, tf_keras.losses.Loss):
            return spec
    from tf_keras.src.losses import LossFunctionWrapper

    return LossFunctionWrapper(spec, reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE)


def _state_variables(model: Any) -> list:
    """Everything a forward pass or a loss may assign: non-trainable and metric variables."""
    seen, state = set(), []
    candidates = list(model.non_trainable_variables)
    # The compiled loss hides its "loss" (and per-output) Mean metrics from model.metrics
    # until first used, and creates the per-output ones then: build it now (functional
    # models), and take its total-loss mean in any case, so that they are restored too.
    container = getattr(model, "compiled_loss", None)
    if container is not None and not container.built \
            and getattr(model, "_nested_outputs", None) is not None:
        container.build(model._nested_outputs)
    total_mean = getattr(container, "_total_loss_mean", None)
    for metric in [*model.metrics, *([total_mean] if total_mean is not None else [])]:
        candidates.extend(metric.variables)
    for v in candidates:
        if id(v) not in seen:
            seen.add(id(v))
            state.append(v)
    return state


def _objective_value(model, objective, x, y, sample_weight, y_pred):
    if objective.kind == "compiled":
        return model.compute_loss(x, y, y_pred, sample_weight)
    if objective.kind == "target":
        scores = tf.cast(target_scores(objective.spec, y_pred), tf.float32)
        if sample_weight is not None:
            weights = tf.cast(sample_weight, scores.dtype)
            extra = scores.shape.rank - weights.shape.rank
            scores = scores * tf.reshape(weights, tf.concat(
                [tf.shape(weights), tf.ones([max(extra, 0)], tf.int32)], 0))
        return tf.reduce_sum(scores)
    total = data_loss(objective.spec, y, y_pred, sample_weight)
    if model.losses:
        total = total + tf.add_n([tf.cast(l, total.dtype) for l in model.losses])
    return total


def _build(model, variables, objective, training, signature, scaled=True):
    """The cached step(inputs, scale) -> (loss, grads); `scaled=False` ignores `scale` (1.0),
    sparing a division per gradient (x / 1.0 == x, so the result is the same)."""
    model_ref = weakref.ref(model)
    if objective.kind == "loss":
        objective = Objective("loss", _resolve_loss(objective.spec))
    state = _state_variables(model)

    @tf.function(input_signature=[signature, tf.TensorSpec([], tf.float32)])
    def step(inputs, scale):
        model = model_ref()
        saved = [tf.identity(v) for v in state]
        x, y, sw = inputs["x"], inputs.get("y"), inputs.get("sample_weight")
        with tf.GradientTape() as tape:
            y_pred = model(x, training=training)
            loss = _objective_value(model, objective, x, y, sw, y_pred)
            target = tf.cast(loss, tf.float32)
            if scaled:
                target = target * scale
        grads = [None if g is None else tf.convert_to_tensor(g)
                 for g in tape.gradient(target, variables)]
        if scaled:
            grads = [None if g is None else g / tf.cast(scale, g.dtype) for g in grads]
        with tf.control_dependencies([g for g in grads if g is not None] + [loss]):
            for v, value in zip(state, saved):
                v.assign(value)
        return loss, grads

    return step


# --- Input and activation gradients (gradkit.input_gradients, gradkit.activation_gradients)

_AUX_CACHE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def _check_ready(model: Any) -> None:
    if not tf.executing_eagerly():
        raise UnsupportedModelError(
            "gradkit runs tf-keras models in eager mode, but eager execution is disabled "
            "(tf.compat.v1.disable_eager_execution() was called). Remove that call. "
            + received(executing_eagerly=False)
        )
    if not model.built or not model.variables:
        raise UnsupportedModelError(
            f"Model {model.name!r} has not been built, so it cannot be differentiated yet. "
            "Call it once on a batch (model(x[:1])) or call model.build(...) first. "
            + received(built=model.built)
        )


def _cached_step(model, key, build):
    per_model = _cache.per_model(_AUX_CACHE, model)
    if key not in per_model:
        per_model[key] = build()
    return per_model[key]


def compute_input_gradients(model, objective: Objective, batch: Batch, training: bool):
    """(loss, [gradient or None per leaf of batch.x]) of the objective w.r.t. the inputs."""
    _check_ready(model)
    template = map_structure(lambda _: 0, batch.x)
    inputs = dict(_inputs(batch), x=leaves(batch.x))
    signature = map_structure(_relaxed_spec, inputs)
    key = ("inputs", repr(template), objective.cache_key(), bool(training),
           _signature_key(signature))
    step = _cached_step(model, key, lambda: _build_tapped_step(
        model, None, objective, training, signature, template))
    loss, grads, _ = step(inputs, tf.constant(_loss_scale(model), tf.float32))
    return float(loss), [None if g is None else g.numpy() for g in grads]


def compute_activation_gradients(model, layers, keys, objective: Objective, batch: Batch,
                                 training: bool, return_activations: bool):
    """(loss, [gradient or None], [activation or None]) for the outputs of `layers`."""
    _check_ready(model)
    template = map_structure(lambda _: 0, batch.x)
    inputs = dict(_inputs(batch), x=leaves(batch.x))
    signature = map_structure(_relaxed_spec, inputs)
    key = ("activations", tuple(id(layer) for layer in layers), repr(template),
           objective.cache_key(), bool(training), _signature_key(signature))
    taps, step = _cached_step(model, key, lambda: _tapped_entry(
        model, OutputTaps(layers, keys), objective, training, signature, template))
    with taps.installed():
        loss, grads, outputs = step(inputs, tf.constant(_loss_scale(model), tf.float32))
    taps.check()  # what the trace recorded: a shared, unused or non-float layer
    return float(loss), [None if g is None else g.numpy() for g in grads], [
        None if o is None or not return_activations else o.numpy() for o in outputs]


def _tapped_entry(model, taps, objective, training, signature, template):
    return taps, _build_tapped_step(model, taps, objective, training, signature, template)


def _build_tapped_step(model, taps, objective, training, signature, template):
    """Gradients w.r.t. the inputs (taps=None) or the tapped layer outputs; state restored."""
    model_ref = weakref.ref(model)
    if objective.kind == "loss":
        objective = Objective("loss", _resolve_loss(objective.spec))
    state = _state_variables(model)

    @tf.function(input_signature=[signature, tf.TensorSpec([], tf.float32)])
    def step(inputs, scale):
        model = model_ref()
        saved = [tf.identity(v) for v in state]
        feed = iter(inputs["x"])
        x = map_structure(lambda _: next(feed), template)
        y, sw = inputs.get("y"), inputs.get("sample_weight")
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            if taps is None:
                sources, outputs = list(inputs["x"]), []
                tape.watch(sources)
            else:
                sources, outputs = watched_taps(taps, tape)
            loss = _objective_value(model, objective, x, y, sw, model(x, training=training))
            scaled = tf.cast(loss, tf.float32) * scale
        grads = tapped_gradients(tape, scaled, sources, scale)
        done = [t for t in grads + outputs if t is not None] + [loss]
        with tf.control_dependencies(done):
            for v, value in zip(state, saved):
                v.assign(value)
        return loss, grads, outputs

    return step
