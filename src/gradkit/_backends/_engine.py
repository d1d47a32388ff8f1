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

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends._accumulator import Accumulator
from gradkit._taps import OutputTaps
from gradkit._data import Batch, leaves, map_structure
from gradkit._objective import data_loss
from gradkit._backends._steps import per_example_fn, tapped_fn, unscaled
from gradkit._factors import Ops, assemble, plan, rest


class Primitives(Protocol):
    """A Keras 3 backend's verbs. `f` below is ``f(perturb, *args) -> (value, aux)``: a
    float32 scalar to differentiate and anything else; ``perturb(z)`` returns ``z`` plus a
    zero the backend differentiates too (a "tap")."""

    #: factor_arrays' reshape/cast/concat in the framework's own calls
    ops: Ops
    #: errors of the vectorizer that mean "cannot vectorize this model" (fall back to a loop)
    vectorize_errors: tuple

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

    def vectorize(self, fn: Callable) -> Callable:
        """`fn` of one example mapped over the leading axis of its one (dict) argument."""

    def all_finite(self, g: Any) -> Any: ...

    def zeros(self, shape: tuple, dtype: Any) -> Any: ...

    def stack(self, values: list) -> Any: ...

    def where(self, condition: Any, x: Any, y: Any) -> Any: ...

    def all(self, x: Any) -> Any: ...

    def to_numpy(self, x: Any) -> np.ndarray: ...

    def asynchronous(self, tensor: Any) -> bool:
        """Whether results may still be in flight (the host should wait in groups)."""

    def guard(self) -> AbstractContextManager:
        """Around a whole pass: restores what a stateless call cannot (a global RNG)."""

    def distributed_sum(self, adapter: Any, request: Any, batches: Any, strategy: Any) -> Any:
        """(Σ_b n_b ∇L_b, N) through the framework's own distribution engine."""


class Engine:
    """The `Adapter` of a Keras 3 backend (see gradkit._backends.Adapter)."""

    pad_chunks = False

    def __init__(self, primitives: Primitives, pad_chunks: bool = False) -> None:
        self.p = primitives
        self.pad_chunks = pad_chunks
        self.kernel_rows = getattr(primitives, "kernel_rows", None)
        self.data_of, self.scale_of = data_of, scale_of

    # --- the batch gradient and the Hessian-vector product

    def gradients(self, request):
        run = self.compiled(request, "gradients", lambda s: self.p.compile(
            self.gradient_fn(request, s), request.model, pad=(request.objective, request.training)))
        loss, grads = run(data_of(request.batch), scale_of(request.model))
        return float(self.p.to_numpy(loss)), [None if g is None else self.p.to_numpy(g) for g in grads]

    def gradient_fn(self, request, scaled: bool) -> Callable:
        """The pure ``fn(values, data, scale) -> (loss, unscaled gradients or None)``."""
        objective_of, selected = self._objective(request, scaled)

        def fn(values, data, scale):
            loss, (grads,), _ = self.p.grad(objective_of(values, data, scale))(
                [values[0][i] for i in selected])
            return loss, unscaled(self.p, grads, scale, scaled)

        return fn

    def hvp(self, request, vectors: list):
        def build(scaled):
            objective_of, selected = self._objective(request, scaled)

            def fn(values, data, scale, tangents):
                f = objective_of(values, data, scale)
                loss, products = self.p.hvp(f)([values[0][i] for i in selected], tangents)
                return loss, unscaled(self.p, products, scale, scaled)

            return self.p.compile(fn, request.model)

        run = self.compiled(request, "hvp", build)
        loss, products = run(data_of(request.batch), scale_of(request.model), list(vectors))
        return float(self.p.to_numpy(loss)), [None if h is None else self.p.to_numpy(h) for h in products]

    def _objective(self, request, scaled: bool):
        """(objective_of(values, data, scale) -> f(perturb, chosen), selected indices)."""
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

        return objective_of, selected

    def compiled(self, request, name: str, build: Callable, *extra_key) -> Any:
        scaled = scale_of(request.model) != 1.0
        key = (name, request.cache_key(), scaled, *extra_key)
        return _cache.cached(request.model, key, lambda: build(scaled))

    # --- gradients with respect to the inputs and to layer outputs (taps)

    def input_gradients(self, request):
        template = map_structure(lambda _: 0, request.batch.x)
        run = self.compiled(request, "inputs", lambda s: self.p.compile(
            self._tapped_fn(request, template, None), request.model), repr(template))
        data = dict(data_of(request.batch), x=leaves(request.batch.x))
        loss, grads, _ = run(data, np.float32(k3.loss_scale(request.model)))
        return float(self.p.to_numpy(loss)), [None if g is None else self.p.to_numpy(g) for g in grads]

    def activation_gradients(self, request, layers, keys, return_activations: bool):
        template = map_structure(lambda _: 0, request.batch.x)
        taps = OutputTaps(layers, keys)
        entry = self.compiled(request, "activations", lambda s: (taps, self.p.compile(
            self._tapped_fn(request, template, taps), request.model)),
            tuple(id(layer) for layer in layers), repr(template))
        taps, run = entry
        data = dict(data_of(request.batch), x=leaves(request.batch.x))
        with taps.installed():
            loss, grads, outputs = run(data, np.float32(k3.loss_scale(request.model)))
        taps.check()  # what the pass recorded: a shared, unused or non-float layer
        return float(self.p.to_numpy(loss)), [None if g is None else self.p.to_numpy(g) for g in grads], [
            None if o is None or not return_activations else self.p.to_numpy(o)
            for o in outputs]

    def _tapped_fn(self, request, template, taps: OutputTaps | None) -> Callable:
        """Gradients w.r.t. the input leaves (taps=None) or the tapped layer outputs."""
        model_ref, training = weakref.ref(request.model), request.training
        objective = k3.prepare_objective(request.objective)

        def objective_of(values, data, scale, x):
            loss = k3.objective_value(model_ref(), objective, training, *values, x,
                                      data.get("y"), data.get("sample_weight"))
            return scaled_value(loss, scale, True), loss

        return tapped_fn(self.p, taps, template, objective_of)

    # --- per-example gradients (gradkit.per_example_gradients, per_example_norms)

    def per_example_parts(self, request):
        """Per selected variable: a Factor, an (n, *shape) array, or None if unconnected."""
        model, variables = request.model, request.variables
        planned = plan(model, variables, keras.layers)
        batched = getattr(self.p, "batched_factors", None)
        if batched is not None and not rest(planned, len(variables)):
            parts = batched(self, request, planned)
            if parts is not None:
                return parts
        connected: list = []  # filled while tracing (or on every eager call)
        run = self.compiled(request, "per_example", lambda s: (connected, self.p.compile(
            self._per_example_fn(request, planned, s, connected), model)))
        connected, run = run
        try:
            arrays, grads = run(data_of(request.batch), scale_of(model))
        except self.p.vectorize_errors as error:  # a vectorizer's gap: the caller loops
            raise NotImplementedError(f"vectorizing failed: {error}") from error
        parts = assemble(len(variables), planned, arrays, grads)
        return [part if ok else None for part, ok in zip(parts, connected)]

    def _per_example_fn(self, request, planned, scaled: bool, connected: list) -> Callable:
        count = len(request.variables)
        direct = [request.variables[j] for j in rest(planned, count)]
        objective_of, selected = self._objective(request.replace(variables=direct), scaled)
        return per_example_fn(
            self.p, planned, count,
            lambda values, example, scale: objective_of(values, one_example(example), scale),
            lambda values: [values[0][i] for i in selected], connected, scaled,
            request.cache_key())

    # --- streaming sums (gradkit.accumulate) and distribution

    def accumulator(self, request, skip_nonfinite: bool):
        return Accumulator(self, request, bool(skip_nonfinite))

    def distributed_sum(self, request, batches, strategy):
        """Through the backend's own engine: tf.distribute or a JAX mesh."""
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


def data_of(batch: Batch) -> dict:
    """The batch as the operations' `data` dict (absent parts left out)."""
    data = {"x": batch.x}
    if batch.y is not None:
        data["y"] = batch.y
    if batch.sample_weight is not None:
        data["sample_weight"] = batch.sample_weight
    return data


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
