"""Keras 3 on TensorFlow: a GradientTape inside a cached `tf.function`.

The function is traced once per model, variable selection, objective and input signature,
with the batch axis left open (None), so a new batch size does not retrace.
"""

from __future__ import annotations

import weakref
from typing import Any

import tensorflow as tf

from gradkit._backends import _keras3 as k3
from gradkit._data import Batch, map_structure
from gradkit._objective import Objective

_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def compute_gradients(model, variables, objective: Objective, batch: Batch, training: bool):
    k3.check_built(model)
    inputs = _inputs(batch)
    signature = map_structure(_relaxed_spec, inputs)
    key = (tuple(id(v) for v in variables), objective.cache_key(), bool(training),
           _signature_key(signature))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _build(model, variables, objective, training, signature)
    step = per_model[key]
    scale = tf.constant(k3.loss_scale(model), tf.float32)
    loss, grads = step(inputs, scale)
    return float(loss), [None if g is None else g.numpy() for g in grads]


def _inputs(batch: Batch) -> dict:
    inputs = {"x": batch.x}
    if batch.y is not None:
        inputs["y"] = batch.y
    if batch.sample_weight is not None:
        inputs["sample_weight"] = batch.sample_weight
    return inputs


def _relaxed_spec(value: Any) -> tf.TensorSpec:
    tensor = tf.convert_to_tensor(value)
    shape = [None] + list(tensor.shape[1:]) if tensor.shape.rank else []
    return tf.TensorSpec(shape, tensor.dtype)


def _signature_key(signature: Any) -> str:
    return repr(signature)


def _build(model, variables, objective, training, signature):
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
            scaled = tf.cast(loss, tf.float32) * scale
        grads = tape.gradient(scaled, watched)
        return loss, [None if g is None else tf.convert_to_tensor(g) / tf.cast(scale, g.dtype)
                      for g in grads]

    return step
