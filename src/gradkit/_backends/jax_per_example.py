"""Per-example gradients on Keras 3 with JAX (gradkit.per_example_gradients, _norms).

One `jax.jit` program per model, selection and objective: `jax.vmap` of `jax.grad` of each
example's objective over `stateless_call`, with respect to zero perturbations at the factored
Dense/Embedding/Conv pre-activations (see `_layer_factors`) and to the other selected variables.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends.jax import split_values
from gradkit._data import Batch, map_structure
from gradkit._factors import LayerTaps, assemble, factor_arrays, rest
from gradkit._objective import Objective

#: The front door pads a short last chunk to the chunk size: XLA compiles per shape.
PAD_CHUNKS = True
_PER_EXAMPLE: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = weakref.WeakKeyDictionary()


def per_example_parts(model, variables, objective: Objective, batch: Batch, training: bool):
    """Per selected variable: a `Factor` (plain Dense/Embedding/Conv) or an (n, *shape) array.

    One `jax.jit` program: `jax.vmap` of `jax.grad` of each example's objective, with respect
    to zero perturbations at the factored layers' pre-activations (their shapes found by
    `jax.eval_shape` while tracing) and to the other selected variables.
    """
    k3.check_built(model)
    key = ("parts", tuple(id(v) for v in variables), objective.cache_key(), bool(training))
    per_model = _cache.per_model(_PER_EXAMPLE, model)
    if key not in per_model:
        per_model[key] = _build_parts(model, variables, objective, training)
    planned, selected, fn = per_model[key]
    arrays, grads = fn(*split_values(model, selected), batch.x, batch.y, batch.sample_weight,
                       np.float32(k3.loss_scale(model)))
    return assemble(len(variables), planned, arrays, grads)


def _build_parts(model, variables, objective, training):
    model_ref, objective = weakref.ref(model), k3.prepare_objective(objective)
    planned = k3.factor_plan(model, variables)
    selected = k3.selected_indices(model, [variables[j] for j in rest(planned, len(variables))])
    taps = LayerTaps(planned)

    def forward(perturb, chosen, others, non_trainable, metrics, x, y, sw):
        taps.start(perturb)
        with taps.installed():
            loss = k3.example_objective(
                model_ref(), objective, training, k3.merge_trainable(selected, chosen, others),
                non_trainable, metrics, x, y, sw)
        return loss.astype("float32"), taps.inputs

    def record(*args):
        seen = [[] for _ in planned]
        forward(lambda layer, call, z: seen[layer].append(z) or z, *args)
        return seen

    def example(eps, chosen, others, non_trainable, metrics, x, y, sw, scale):
        loss, inputs = forward(lambda layer, call, z: z + eps[layer][call],
                               chosen, others, non_trainable, metrics, x, y, sw)
        return loss * scale, inputs

    def parts(chosen, others, non_trainable, metrics, x, y, sw, scale):
        first = [map_structure(lambda a: a[0], part) for part in (x, y, sw)]
        shapes = jax.eval_shape(record, chosen, others, non_trainable, metrics, *first)
        size = jax.tree_util.tree_leaves(x)[0].shape[0]
        zeros = [[jnp.zeros((size, *s.shape), s.dtype) for s in calls] for calls in shapes]
        per_example = jax.vmap(jax.grad(example, argnums=(0, 1), has_aux=True),
                               in_axes=(0, None, None, None, None, 0, 0, 0, None))
        (deltas, grads), inputs = per_example(zeros, chosen, others, non_trainable, metrics,
                                              x, y, sw, scale)
        arrays = factor_arrays(planned, inputs, deltas, k3.factor_ops(), scale)
        return arrays, [g / scale.astype(g.dtype) for g in grads]

    return planned, selected, jax.jit(parts)


