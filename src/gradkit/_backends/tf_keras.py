"""tf-keras (Keras 2): its own adapter over the TensorFlow primitives; never imports Keras 3.

tf-keras has no `stateless_call`: its layers read their variables and assign their state during
the call (BatchNorm moving statistics, loss metrics). So every compiled function here is wrapped
once (`TfKerasPrimitives.compile`) to read that state first and write the same values back
after: the model leaves each call bitwise as it entered. Gradients are taken with respect to
the variables themselves. Graph mode (after `disable_eager_execution()`) runs the gradient in
the Keras session (`tf_keras_graph`).
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from gradkit._backends._steps import (
    Operations,
    planned_layers,
    run_gradients,
    run_per_example,
)
from gradkit._backends.tensorflow import TensorFlowPrimitives
from gradkit._backends.tf_keras_state import loss_metrics_idle, state_variables
from gradkit._data import map_structure
from gradkit._errors import InvalidArgumentError, UnsupportedModelError, received
from gradkit._factors import rest
from gradkit._objective import Objective, data_loss, target_scores
from gradkit._seeds import split_seed, with_rows


def adapter():
    return TfKerasAdapter()


class TfKerasPrimitives(TensorFlowPrimitives):
    """TensorFlow's primitives, each compiled function restoring the model's state."""

    def __init__(self) -> None:
        super().__init__(values=lambda model: (), seeding=(seed_data, seeded))

    def compile(self, fn, model, *, donate: tuple = (), pad: Any = None):
        if not tf.executing_eagerly():  # tf.compat.v1.disable_eager_execution() was called
            raise _needs_eager()
        state = state_variables(model)

        def restoring(values, *args):
            saved = [tf.identity(v) for v in state]
            outputs = fn(values, *args)
            done = [t for t in tf.nest.flatten(outputs) if isinstance(t, tf.Tensor)]
            with tf.control_dependencies(done):
                for v, value in zip(state, saved):
                    v.assign(value)
            return tf.nest.map_structure(
                lambda t: tf.identity(t) if isinstance(t, tf.Tensor) else t, outputs)

        restoring.__name__ = fn.__name__
        return super().compile(restoring, model)


class TfKerasAdapter(Operations):
    """gradkit._backends.Adapter for tf-keras models."""

    def __init__(self) -> None:
        self.p = TfKerasPrimitives()
        self.layers_module = tf_keras.layers

    @staticmethod
    def scale_of(model) -> np.float32:
        optimizer = getattr(model, "optimizer", None)
        scale = getattr(optimizer, "loss_scale", None) if optimizer is not None else None
        return np.float32(1.0 if scale is None else float(scale))

    # --- operations

    def gradients(self, request):
        if not tf.executing_eagerly():  # tf.compat.v1.disable_eager_execution() was called
            from gradkit._backends import tf_keras_graph

            return tf_keras_graph.compute_gradients(request)
        return run_gradients(self, request)

    def objective(self, request, scaled: bool):
        """(objective_of, chosen_of) as gradkit._backends._steps wants them: differentiated
        with respect to the variables themselves, which the model reads."""
        f, variables = self._objective(request, scaled), list(request.variables)
        return (lambda values, data, scale: lambda perturb, chosen: f(data, scale),
                lambda values: variables)

    def output_objective(self, request, scaled: bool):
        """(forward_of, loss_of, chosen_of) as `run_ggn` wants them, on the variables."""
        model_ref, training = weakref.ref(request.model), request.training
        objective, variables = prepare_objective(request.objective), list(request.variables)

        def forward_of(values, data):
            return lambda chosen: (model_ref()(data["x"], training=training), None)

        def loss_of(values, data, scale, losses):
            def f(y_pred):
                loss = objective_value(model_ref(), objective, data["x"], data.get("y"),
                                       data.get("sample_weight"), y_pred)
                value = tf.cast(loss, tf.float32)
                return (value * scale if scaled else value), loss

            return f

        return forward_of, loss_of, lambda values: variables

    def tapped_objective(self, request):
        f = self._objective(request, True)
        return lambda values, data, scale, x: f(data, scale, x)

    def _objective(self, request, scaled: bool):
        """f(data, scale, x=None) -> (scaled value, loss) on the model's own variables."""
        model_ref, training = weakref.ref(request.model), request.training
        objective = prepare_objective(request.objective)

        def f(data, scale, x=None):
            x = data["x"] if x is None else x
            y, sw = data.get("y"), data.get("sample_weight")
            model = model_ref()
            loss = objective_value(model, objective, x, y, sw, model(x, training=training))
            value = tf.cast(loss, tf.float32)
            return (value * scale if scaled else value), loss

        return f

    def parts(self, request, mapped: bool):
        planned = planned_layers(self, request, mapped)
        direct = [request.variables[j] for j in rest(planned, len(request.variables))]

        def make(scaled):
            f = self._objective(request, scaled)
            return (lambda values, example, scale: lambda perturb, _: f(
                map_structure(lambda a: a[None], example), scale)), lambda values: direct

        return run_per_example(self, request, planned, make, mapped)

    def distributed_sum(self, request, batches, strategy):
        from gradkit._backends import tf_distribute

        return tf_distribute.distributed_sum(self, request, batches, strategy)

    def replica_gradient(self, request):
        """fn(values, data, scale, replicas) -> gradients of the replica's SCALED objective:
        tf-keras divides neither the compiled loss nor loss= by the replica count itself."""
        objective = request.objective
        if objective.kind == "loss":
            loss = copy.copy(resolve_loss(objective.spec))
            loss._allow_sum_over_batch_size = True  # reduced per replica; rescaled after
            request = request.replace(objective=Objective("loss", loss))
        objective_of, chosen_of = self.objective(request, True)

        def gradient(values, data, scale, replicas):  # of the scaled objective: not unscaled
            _, (grads,), _ = self.p.grad(objective_of(values, data, scale))(chosen_of(values))
            return grads

        return gradient


def _needs_eager() -> UnsupportedModelError:
    return UnsupportedModelError(
        "gradkit runs this on tf-keras models in eager mode, but eager execution is disabled "
        "(tf.compat.v1.disable_eager_execution() was called); in graph mode only "
        "gradkit.gradients is available. Remove that call. " + received(executing_eagerly=False)
    )


def resolve_loss(spec: Any) -> Any:
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


def prepare_objective(objective: Objective) -> Objective:
    if objective.kind == "loss":
        return Objective("loss", resolve_loss(objective.spec))
    return objective


def objective_value(model, objective, x, y, sample_weight, y_pred):
    """The unscaled objective of tf-keras (see gradkit._objective) from the predictions."""
    if objective.kind == "compiled":
        with loss_metrics_idle(model):
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


# --- dropout seeds (gradkit._seeds): each RandomGenerator stateless, on a row of the seed


def random_generators(model: Any) -> list:
    """The tf-keras RandomGenerators of the model's layers (dropout, noise), in layer order."""
    from tf_keras.src.backend import RandomGenerator

    found = [getattr(layer, "_random_generator", None) for layer in model._flatten_layers()]
    return [g for g in found if isinstance(g, RandomGenerator)]


def seed_data(model: Any, data: dict) -> dict:
    return with_rows(data, len(random_generators(model)) + 1) if "seed" in data else data


def seeded(fn: Any, model_ref: Any) -> Any:
    """``fn(values, data, ...)`` whose random generators draw, while it is traced, from the
    rows of ``data["seed"]`` (an input of the compiled function) with stateless ops."""
    def with_seed(values, data, *rest):
        data, rows = split_seed(data)
        if rows is None:
            return fn(values, data, *rest)
        with stateless_generators(random_generators(model_ref()), rows):
            return fn(values, data, *rest)

    with_seed.__name__ = getattr(fn, "__name__", "fn")
    return with_seed


@contextmanager
def stateless_generators(generators: list, rows: Any):
    saved = []
    for i, generator in enumerate(generators):
        generator._maybe_init()  # what the layer's first draw does anyway
        saved.append((generator, generator._rng_type))
        generator._rng_type = generator.RNG_STATELESS
        generator.make_seed_for_stateless_op = lambda row=rows[i]: row
    try:
        yield
    finally:
        for generator, rng_type in saved:
            generator._rng_type = rng_type
            del generator.make_seed_for_stateless_op
