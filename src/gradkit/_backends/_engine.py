"""The Keras 3 engine: every operation written once, over `stateless_call`, on `Primitives`.

Each operation is a pure function ``fn(values, data, scale, *extra)`` of the variable values
``(trainable, non_trainable, metrics)``, the batch ``{"x", "y", "sample_weight"}`` (absent keys
are None) and the optimizer's loss scale (mixed precision: the loss is multiplied by it before
differentiation and every gradient divided by it after, as `fit` does). The objective inside
is `gradkit._backends._keras3.objective_value`, Keras' own stateless recipe, so no state
changes. A backend supplies only the verbs below (module ``gradkit._backends.<backend>``).
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol

import keras
import numpy as np

from gradkit._backends import _keras3 as k3
from gradkit._data import map_structure
from gradkit._objective import data_loss
from gradkit._backends._steps import (
    Operations,
    planned_layers,
    run_gradients,
    run_per_example,
)
from gradkit._factors import Ops, rest


class Primitives(Protocol):
    """A Keras 3 backend's verbs. `f` below is ``f(perturb, *args) -> (value, aux)``: a
    float32 scalar to differentiate and anything else; ``perturb(z)`` returns ``z`` plus a
    zero the backend differentiates too (a "tap")."""

    #: factor_arrays' reshape/cast/concat in the framework's own calls
    ops: Ops
    #: op type -> why the vectorizer must not run it (empty: `hazard` is never called)
    hazardous_ops: dict
    #: whether the vectorizer's per-example convolution kernels (grouped convolutions) are
    #: many times slower than a loop, so a model with an unfactored one is not vectorized
    slow_vectorized_convolutions: bool

    def compile(self, fn: Callable, model: Any, *, donate: tuple = (),
                pad: Any = None) -> Callable:
        """``run(data, scale, *extra) = fn(current values, data, scale, *extra)``, compiled
        and cached per input signature; values are read afresh on every call. `pad`: an
        (objective, training) pair under which batches may be padded to a compiled size."""

    def grad(self, f: Callable, *, taps: bool = False, shape_key: Any = None) -> Callable:
        """``g(*args) -> (aux, [[grad or None per array] per arg], [grad or None per tap])``
        of f's value; None where the value does not depend on it at all."""

    def hvp(self, f: Callable) -> Callable:
        """``h(primals, tangents) -> (aux, [H·tangents or None per primal])``."""

    def linearize(self, f: Callable) -> Callable:
        """``lin(primals, tangents) -> (outputs, [J·tangents per output], aux, pullback)`` of
        ``f(primals) -> ([output arrays], aux)``, J its Jacobian, from one forward pass;
        ``pullback(cotangents) -> [Jᵀ·cotangents or None per primal]`` (None: no path)."""

    def vectorize(self, fn: Callable) -> Callable:
        """`fn` of one example mapped over the leading axis of its one (dict) argument."""

    # optional: map_examples(fn), like `vectorize` but a loop over the examples in one
    # compiled (torch: eager) call (absent: only the loop of single-example gradients)

    def hazard(self, run: Any) -> str | None:
        """The first of `hazardous_ops` in the traced compiled function `run`, named (the
        layer and op), or None."""

    def all_finite(self, g: Any) -> Any: ...

    def zeros(self, shape: tuple, dtype: Any) -> Any: ...

    def stack(self, values: list) -> Any: ...

    def where(self, condition: Any, x: Any, y: Any) -> Any: ...

    def all(self, x: Any) -> Any: ...

    def sum(self, x: Any) -> Any: ...

    def detached(self, x: Any) -> Any:
        """`x` cut from the differentiation (no gradient flows back through it)."""

    def to_numpy(self, x: Any) -> np.ndarray: ...

    def asynchronous(self, tensor: Any) -> bool:
        """Whether results may still be in flight (the host should wait in groups)."""

    def guard(self) -> AbstractContextManager:
        """Around a whole pass: restores what a stateless call cannot (a global RNG)."""

    def distributed_sum(self, adapter: Any, request: Any, batches: Any, strategy: Any) -> Any:
        """(Σ_b n_b ∇L_b, N) through the framework's own distribution engine."""


class Engine(Operations):
    """The `Adapter` of a Keras 3 backend (see gradkit._backends.Adapter)."""

    def __init__(self, primitives: Primitives, pad_chunks: bool = False) -> None:
        self.p = primitives
        self.pad_chunks = pad_chunks
        self.kernel_rows = getattr(primitives, "kernel_rows", None)
        self.scale_of = scale_of
        self.layers_module = keras.layers

    def values_held(self, model):
        return k3.values_held(model)

    # --- the batch gradient (hvp, taps and accumulation: `Operations`)

    def gradients(self, request):
        return run_gradients(self, request, pad=(request.objective, request.training))

    def objective(self, request, scaled: bool):
        """(objective_of(values, data, scale) -> f(perturb, chosen), chosen_of(values)): the
        objective on `stateless_call`, with the selected trainable values replaced."""
        model_ref, training = weakref.ref(request.model), request.training
        objective = k3.prepare_objective(request.objective)
        selected = k3.selected_indices(request.model, request.variables)

        def objective_of(values, data, scale):
            trainable, non_trainable, metrics = values

            def f(perturb, chosen):
                loss = k3.objective_value(
                    model_ref(), objective, training, replaced(trainable, selected, chosen),
                    non_trainable, metrics, data["x"], data.get("y"), data.get("sample_weight"),
                    valid_rows=data.get("valid_rows"))
                return scaled_value(loss, scale, scaled), loss

            return f

        return objective_of, lambda values: [values[0][i] for i in selected]

    def output_objective(self, request, scaled: bool):
        """(forward_of, loss_of, chosen_of) for `run_ggn`: the objective split at the model's
        outputs, ``forward_of(values, data)(chosen) -> (y_pred, forward-pass losses)`` and
        ``loss_of(values, data, scale, losses)(y_pred) -> (scaled value, loss)``."""
        model_ref, training = weakref.ref(request.model), request.training
        objective = k3.prepare_objective(request.objective)
        selected = k3.selected_indices(request.model, request.variables)

        def forward_of(values, data):
            trainable, non_trainable, _ = values
            return lambda chosen: k3.forward(model_ref(), training,
                                             replaced(trainable, selected, chosen),
                                             non_trainable, data["x"])

        def loss_of(values, data, scale, losses):
            def f(y_pred):
                loss = k3.objective_of_predictions(
                    model_ref(), objective, training, *values, data["x"], data.get("y"),
                    y_pred, data.get("sample_weight"), losses)
                return scaled_value(loss, scale, scaled), loss

            return f

        return forward_of, loss_of, lambda values: [values[0][i] for i in selected]

    # --- gradients with respect to the inputs and to layer outputs (taps)

    def tapped_objective(self, request) -> Callable:
        """objective_of(values, data, scale, x) -> (scaled value, loss) for `_tapped.run_tapped`."""
        model_ref, training = weakref.ref(request.model), request.training
        objective = k3.prepare_objective(request.objective)

        def objective_of(values, data, scale, x):
            loss = k3.objective_value(model_ref(), objective, training, *values, x,
                                      data.get("y"), data.get("sample_weight"))
            return scaled_value(loss, scale, True), loss

        return objective_of

    # --- per-example gradients (gradkit.per_example_gradients, per_example_norms)

    def parts(self, request, mapped: bool):
        """`per_example_parts` from the vectorizer or (`mapped`) the compiled loop."""
        planned = planned_layers(self, request, mapped)
        count = len(request.variables)
        direct = request.replace(variables=[request.variables[j] for j in rest(planned, count)])

        def make(scaled):
            objective_of, chosen_of = self.objective(direct, scaled)
            return (lambda values, example, scale: objective_of(values, one_example(example),
                                                                scale), chosen_of)

        return run_per_example(self, request, planned, make, mapped)

    # --- streaming sums (gradkit.accumulate) and distribution

    def distributed_sum(self, request, batches, strategy):
        """Through the backend's own engine: tf.distribute, a JAX mesh, torch.distributed."""
        return self.p.distributed_sum(self, request, batches, strategy)

    def replica_gradient(self, request) -> Callable:
        """fn(values, data, scale, replicas) -> gradients of one tf.distribute replica's
        scaled objective, as Keras defines it in a replica context: the compiled loss is
        divided by the replica count; with loss= only the data loss is, so it is multiplied
        back here and the objective is on the global scale (gradkit._backends.tf_distribute)."""
        model_ref, training = weakref.ref(request.model), request.training
        objective = k3.prepare_objective(request.objective)
        selected = k3.selected_indices(request.model, request.variables)
        ops = keras.ops

        def gradient(values, data, scale, replicas):
            trainable, non_trainable, metrics = values
            x, y, sw = data["x"], data.get("y"), data.get("sample_weight")

            def f(perturb, chosen):
                model, now = model_ref(), replaced(trainable, selected, chosen)
                if objective.kind != "loss":
                    value = ops.cast(k3.objective_value(model, objective, training, now,
                                                        non_trainable, metrics, x, y, sw),
                                     "float32")
                    return value * scale, value
                y_pred, extra = k3.forward(model, training, now, non_trainable, x)
                value = ops.cast(data_loss(objective.spec, y, y_pred, sw), "float32") * replicas
                for loss in extra:
                    value = value + ops.cast(k3.aggregate(loss), "float32")
                return value * scale, value

            _, (grads,), _ = self.p.grad(f)([trainable[i] for i in selected])
            return grads

        return gradient


# --- small pure helpers, on keras.ops (they run inside every backend's compiled function)


def replaced(values: list, positions: list[int], new: list) -> list:
    """`values` with ``values[positions[i]]`` replaced by ``new[i]``."""
    values = list(values)
    for i, value in zip(positions, new):
        values[i] = value
    return values


def one_example(example: dict) -> dict:
    """An example without its batch axis as a batch of one."""
    return {k: map_structure(lambda a: keras.ops.expand_dims(a, 0), v) for k, v in example.items()}


def scale_of(model) -> np.float32:
    return np.float32(k3.loss_scale(model))


def scaled_value(loss, scale, scaled: bool):
    loss = keras.ops.cast(loss, "float32")
    return loss * scale if scaled else loss
