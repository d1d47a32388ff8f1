"""Per-example gradients on Keras 3 with TensorFlow (gradkit.per_example_gradients, _norms).

One cached `tf.function` per model, selection, objective and input signature:
`tf.vectorized_map` over a per-example GradientTape that watches zero perturbations at the
factored Dense/Embedding/Conv pre-activations (see `_layer_factors`) and the other selected
variables. The tf-keras adapter reuses `cached_parts` and `watched_perturbations`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import tensorflow as tf

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends.tensorflow import _inputs, _relaxed_spec, _scale_tensor, _signature_key
from gradkit._data import Batch, map_structure
from gradkit._factors import LayerTaps, assemble, factor_arrays, rest
from gradkit._objective import Objective

_PER_EXAMPLE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def per_example_parts(model, variables, objective: Objective, batch: Batch, training: bool):
    """Per selected variable: a `Factor` (plain Dense/Embedding/Conv) or an (n, *shape) tensor."""
    k3.check_built(model)
    return cached_parts(model, variables, objective, batch, training, k3.loss_scale(model),
                        k3.factor_plan, _build_parts)


def cached_parts(model, variables, objective: Objective, batch: Batch, training: bool,
                 scale: float, plan: Callable, build: Callable) -> list:
    """Run the cached step ``build(model, variables, objective, training, signature,
    planned, scaled)`` on `batch` (built once per selection, objective and signature;
    `scaled=False` skips the loss scale of 1.0, which would copy every gradient)."""
    inputs = _inputs(batch)
    signature = map_structure(_relaxed_spec, inputs)
    key = ("parts", tuple(id(v) for v in variables), objective.cache_key(), bool(training),
           _signature_key(signature), scale != 1.0)
    per_model = _cache.per_model(_PER_EXAMPLE, model)
    if key not in per_model:
        planned = plan(model, variables)
        per_model[key] = planned, build(model, variables, objective, training, signature,
                                        planned, scale != 1.0)
    planned, step = per_model[key]
    try:
        arrays, grads = step(inputs, _scale_tensor(scale))
    except tf.errors.InvalidArgumentError as error:  # pfor's converters have gaps (grouped
        # convolutions): the front door falls back to a loop of compute_gradients
        raise NotImplementedError(f"tf.vectorized_map failed: {error.message}") from error
    return assemble(len(variables), planned, arrays, grads)


def _build_parts(model, variables, objective, training, signature, planned, scaled):
    """step(inputs, scale) -> (factor arrays, other gradients)."""
    model_ref, objective = weakref.ref(model), k3.prepare_objective(objective)
    selected = k3.selected_indices(model, [variables[j] for j in rest(planned, len(variables))])
    taps = LayerTaps(planned)

    @tf.function(input_signature=[signature, tf.TensorSpec([], tf.float32)])
    def step(inputs, scale):
        model = model_ref()
        values, non_trainable, metrics = k3.variable_values(model)

        def one(example):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                trainable = list(values)
                for i in selected:
                    trainable[i] = tf.identity(trainable[i])
                watched = [trainable[i] for i in selected]
                tape.watch(watched)
                perturbations, perturb = watched_perturbations(tape, len(planned))
                taps.start(perturb)
                with taps.installed():
                    loss = k3.example_objective(
                        model, objective, training, trainable, non_trainable, metrics,
                        example["x"], example.get("y"), example.get("sample_weight"))
                target = tf.cast(loss, tf.float32)
                target = target * scale if scaled else target
            deltas, grads = tape.gradient(target, (perturbations, watched),
                                          unconnected_gradients="zero")
            return deltas, unscaled(grads, scale, scaled), taps.inputs

        deltas, grads, layer_inputs = tf.vectorized_map(one, inputs)
        arrays = factor_arrays(planned, layer_inputs, deltas, k3.factor_ops(),
                               scale if scaled else None)
        return arrays, grads

    return step


def unscaled(grads: list, scale: Any, scaled: bool) -> list:
    """Dense tensors divided by the loss scale (when the loss was scaled)."""
    grads = [tf.convert_to_tensor(g) for g in grads]
    return [g / tf.cast(scale, g.dtype) for g in grads] if scaled else grads


def watched_perturbations(tape: tf.GradientTape, count: int) -> tuple[list, Any]:
    """([[perturbation per call] per layer], perturb): zero perturbations the tape watches."""
    perturbations: list[list] = [[] for _ in range(count)]

    def perturb(layer: int, call: int, z: Any) -> Any:
        zero = tf.zeros_like(z)
        tape.watch(zero)
        perturbations[layer].append(zero)
        return z + zero

    return perturbations, perturb
