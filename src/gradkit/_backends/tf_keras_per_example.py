"""Per-example gradients on tf-keras (gradkit.per_example_gradients, gradkit.per_example_norms).

As on Keras 3 with TensorFlow (`tensorflow_per_example`): `tf.vectorized_map` over a
per-example GradientTape in a cached `tf.function`. tf-keras layers assign their state during
the call, so the step reads that state first and writes it back after the gradients. The
front door has run `compute_gradients` on the model first (its eager and built checks).
"""

from __future__ import annotations

import weakref

import tensorflow as tf
import tf_keras

from gradkit._backends.tensorflow_per_example import cached_parts, unscaled, watched_perturbations
from gradkit._backends.tf_keras import (
    _loss_scale,
    _objective_value,
    _resolve_loss,
    _state_variables,
)
from gradkit._data import Batch, map_structure
from gradkit._factors import LayerTaps, Ops, factor_arrays, plan, rest
from gradkit._objective import Objective

_TF_OPS = Ops(tf.reshape, tf.cast,
              lambda parts: parts[0] if len(parts) == 1 else tf.concat(parts, axis=1))


def per_example_parts(model, variables, objective: Objective, batch: Batch, training: bool):
    """Per selected variable: a `Factor` (plain Dense/Embedding/Conv) or an (n, *shape) tensor."""
    return cached_parts(model, variables, objective, batch, training, _loss_scale(model),
                        _plan, _build_parts)


def _plan(model, variables) -> list:
    return plan(model, variables, tf_keras.layers)


def _build_parts(model, variables, objective, training, signature, planned, scaled):
    """step(inputs, scale) -> (factor arrays, other gradients); the state is restored."""
    model_ref, taps, state = weakref.ref(model), LayerTaps(planned), _state_variables(model)
    direct = [variables[j] for j in rest(planned, len(variables))]
    if objective.kind == "loss":
        objective = Objective("loss", _resolve_loss(objective.spec))

    @tf.function(input_signature=[signature, tf.TensorSpec([], tf.float32)])
    def step(inputs, scale):
        model = model_ref()
        saved = [tf.identity(v) for v in state]

        def one(example):
            x, y, sw = (map_structure(lambda a: a[None], example.get(name))
                        for name in ("x", "y", "sample_weight"))
            with tf.GradientTape() as tape:
                perturbations, perturb = watched_perturbations(tape, len(planned))
                taps.start(perturb)
                with taps.installed():
                    y_pred = model(x, training=training)
                loss = _objective_value(model, objective, x, y, sw, y_pred)
                target = tf.cast(loss, tf.float32)
                target = target * scale if scaled else target
            deltas, grads = tape.gradient(target, (perturbations, direct),
                                          unconnected_gradients="zero")
            return deltas, unscaled(grads, scale, scaled), taps.inputs

        deltas, grads, layer_inputs = tf.vectorized_map(one, inputs)
        arrays = factor_arrays(planned, layer_inputs, deltas, _TF_OPS, scale if scaled else None)
        outputs = [t for pair in arrays for t in pair] + list(grads)
        with tf.control_dependencies(outputs):
            for v, value in zip(state, saved):
                v.assign(value)
        return [tuple(tf.identity(t) for t in pair) for pair in arrays], [
            tf.identity(g) for g in grads]

    return step
