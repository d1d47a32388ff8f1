"""Keras 3 on TensorFlow: a GradientTape inside a cached `tf.function`.

The function is traced once per model, variable selection, objective and input signature,
with the batch axis left open (None), so a new batch size does not retrace.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends._taps import OutputTaps
from gradkit._data import Batch, leaves, map_structure
from gradkit._objective import Objective

_CACHE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def compute_gradients(model, variables, objective: Objective, batch: Batch, training: bool):
    k3.check_built(model)
    inputs = _inputs(batch)
    signature = map_structure(_relaxed_spec, inputs)
    scale = k3.loss_scale(model)
    key = (tuple(id(v) for v in variables), objective.cache_key(), bool(training),
           _signature_key(signature), scale != 1.0)
    per_model = _cache.per_model(_CACHE, model)
    if key not in per_model:
        per_model[key] = _build(model, variables, objective, training, signature,
                                scaled=scale != 1.0)
    loss, grads = per_model[key](inputs, _scale_tensor(scale))
    return float(loss), [None if g is None else g.numpy() for g in grads]


def _scale_tensor(scale: float) -> tf.Tensor:
    """The loss scale as a float32 scalar tensor (the usual 1.0 made only once)."""
    return _one() if scale == 1.0 else tf.constant(scale, tf.float32)


@functools.cache
def _one() -> tf.Tensor:
    return tf.constant(1.0, tf.float32)


def _inputs(batch: Batch) -> dict:
    inputs = {"x": batch.x}
    if batch.y is not None:
        inputs["y"] = batch.y
    if batch.sample_weight is not None:
        inputs["sample_weight"] = batch.sample_weight
    return inputs


def _relaxed_spec(value: Any) -> tf.TensorSpec:
    """The spec of `value` with the batch axis open; NumPy arrays are not copied to read it."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        shape, dtype = value.shape, tf.as_dtype(value.dtype)
    else:
        tensor = value if isinstance(value, tf.Tensor) else tf.convert_to_tensor(value)
        shape, dtype = tensor.shape, tensor.dtype
    return tf.TensorSpec([None, *shape[1:]] if len(shape) else [], dtype)


def _signature_key(signature: Any) -> str:
    return repr(signature)


def _build(model, variables, objective, training, signature, scaled=True):
    """The cached step(inputs, scale) -> (loss, grads); `scaled=False` ignores `scale` (1.0),
    sparing a division per gradient (x / 1.0 == x, so the result is the same)."""
    model_ref = weakref.ref(model)
    objective = k3.prepare_objective(objective)
    selected = k3.selected_indices(model, variables)

    @tf.function(input_signature=[signature, tf.TensorSpec([], tf.float32)])
    def step(inputs, scale):
        model = model_ref()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            trainable = [tf.identity(v.value) for v in model.trainable_variables]
            watched = [trainable[i] for i in selected]
            tape.watch(watched)
            _, non_trainable, metrics = k3.variable_values(model)
            loss = k3.objective_value(
                model, objective, training, trainable, non_trainable, metrics,
                inputs["x"], inputs.get("y"), inputs.get("sample_weight"),
            )
            target = tf.cast(loss, tf.float32)
            if scaled:
                target = target * scale
        grads = tape.gradient(target, watched)
        if not scaled:
            return loss, [None if g is None else tf.convert_to_tensor(g) for g in grads]
        return loss, [None if g is None else tf.convert_to_tensor(g) / tf.cast(scale, g.dtype)
                      for g in grads]

    return step


# --- Input and activation gradients (gradkit.input_gradients, gradkit.activation_gradients)

_AUX_CACHE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def compute_input_gradients(model, objective: Objective, batch: Batch, training: bool):
    """(loss, [gradient or None per leaf of batch.x]) of the objective w.r.t. the inputs."""
    k3.check_built(model)
    template = map_structure(lambda _: 0, batch.x)
    inputs = dict(_inputs(batch), x=leaves(batch.x))
    signature = map_structure(_relaxed_spec, inputs)
    key = ("inputs", repr(template), objective.cache_key(), bool(training),
           _signature_key(signature))
    per_model = _cache.per_model(_AUX_CACHE, model)
    if key not in per_model:
        per_model[key] = _build_input_step(model, objective, training, signature, template)
    loss, grads = per_model[key](inputs, tf.constant(k3.loss_scale(model), tf.float32))
    return float(loss), [None if g is None else g.numpy() for g in grads]


def _build_input_step(model, objective, training, signature, template):
    model_ref = weakref.ref(model)
    objective = k3.prepare_objective(objective)

    @tf.function(input_signature=[signature, tf.TensorSpec([], tf.float32)])
    def step(inputs, scale):
        flat = list(inputs["x"])
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(flat)
            loss = _forward_objective(model_ref(), objective, training, inputs, flat, template)
            scaled = tf.cast(loss, tf.float32) * scale
        return loss, _unscaled(tape.gradient(scaled, flat), scale)

    return step


def _forward_objective(model, objective, training, inputs, flat, template):
    feed = iter(flat)
    x = map_structure(lambda _: next(feed), template)
    trainable, non_trainable, metrics = k3.variable_values(model)
    return k3.objective_value(model, objective, training, trainable, non_trainable, metrics,
                              x, inputs.get("y"), inputs.get("sample_weight"))


def _unscaled(grads, scale):
    return [None if g is None else tf.convert_to_tensor(g) / tf.cast(scale, g.dtype)
            for g in grads]


def compute_activation_gradients(model, layers, keys, objective: Objective, batch: Batch,
                                 training: bool, return_activations: bool):
    """(loss, [gradient or None], [activation or None]) for the outputs of `layers`."""
    k3.check_built(model)
    template = map_structure(lambda _: 0, batch.x)
    inputs = dict(_inputs(batch), x=leaves(batch.x))
    signature = map_structure(_relaxed_spec, inputs)
    key = ("activations", tuple(id(layer) for layer in layers), repr(template),
           objective.cache_key(), bool(training), _signature_key(signature))
    per_model = _cache.per_model(_AUX_CACHE, model)
    if key not in per_model:
        taps = OutputTaps(layers, keys)
        per_model[key] = (taps, _build_activation_step(
            model, taps, objective, training, signature, template))
    taps, step = per_model[key]
    with taps.installed():
        loss, grads, outputs = step(inputs, tf.constant(k3.loss_scale(model), tf.float32))
    taps.check()  # what the trace recorded: a shared, unused or non-float layer
    return float(loss), [None if g is None else g.numpy() for g in grads], [
        None if o is None or not return_activations else o.numpy() for o in outputs]


def _build_activation_step(model, taps, objective, training, signature, template):
    model_ref = weakref.ref(model)
    objective = k3.prepare_objective(objective)

    @tf.function(input_signature=[signature, tf.TensorSpec([], tf.float32)])
    def step(inputs, scale):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            perturbations, outputs = watched_taps(taps, tape)
            loss = _forward_objective(model_ref(), objective, training, inputs,
                                      list(inputs["x"]), template)
            scaled = tf.cast(loss, tf.float32) * scale
        return loss, tapped_gradients(tape, scaled, perturbations, scale), outputs

    return step


def watched_taps(taps: OutputTaps, tape: tf.GradientTape) -> tuple[list, list]:
    """Start `taps` so each output gets a watched zero perturbation; (perturbations, outputs)."""
    perturbations, outputs = [None] * len(taps.layers), [None] * len(taps.layers)

    def tap(index, output):
        perturbation = tf.zeros_like(output)
        tape.watch(perturbation)
        perturbations[index], outputs[index] = perturbation, output
        return output + perturbation

    taps.start(tap)
    return perturbations, outputs


def tapped_gradients(tape: tf.GradientTape, scaled, perturbations: list, scale) -> list:
    """Unscaled gradients w.r.t. the perturbations; None where a layer was not tapped."""
    tapped = [p for p in perturbations if p is not None]
    grads = iter(_unscaled(tape.gradient(scaled, tapped), scale))
    return [None if p is None else next(grads) for p in perturbations]
