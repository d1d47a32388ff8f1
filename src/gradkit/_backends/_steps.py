"""The differentiation steps every adapter shares, written once over `Primitives`.

Each builder returns a pure ``fn(values, data, scale)`` for `Primitives.compile`, given the
adapter's own objective, which returns ``(scaled value, loss)``: Keras 3 builds it on
``stateless_call``, tf-keras on its own variables (and, for Gauss-Newton products, the same
objective split at the model's outputs). The steps never import a framework: they
differentiate through `p`, the adapter's primitives.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

from gradkit._backends import _cache
from gradkit._data import leaves
from gradkit._factors import (
    KINDS,
    LayerTaps,
    assemble,
    factor_arrays,
    plan,
    rest,
    unfactored_convolution,
    with_regularizers,
)
from gradkit._taps import OutputTaps


class Operations:
    """The operations every adapter shares, over what the adapter supplies: ``p`` (its
    primitives), ``objective(request, scaled)`` (see `gradient_fn`),
    ``output_objective(request, scaled)`` (see `_second_order.run_ggn` and
    `_batched.batched_fn`), ``tapped_objective(request)`` (see `_tapped.tapped_fn`),
    ``parts(request, mapped)`` (see `run_per_example`) and ``scale_of(model)``."""

    pad_chunks = False
    kernel_rows = None
    layers_module: Any = None  # keras.layers or tf_keras.layers (gradkit._factors.plan)

    def values_held(self, model) -> AbstractContextManager:  # see `Adapter`: each call
        return nullcontext()                                   # reads the variables itself

    def hvp(self, request, vectors: list):
        from gradkit._backends._second_order import run_hvp

        return run_hvp(self, request, vectors)

    def ggn_vp(self, request, vectors: list):
        from gradkit._backends._second_order import run_ggn

        return run_ggn(self, request, vectors)

    def input_gradients(self, request):
        from gradkit._backends._tapped import run_tapped

        loss, grads, _ = run_tapped(self, request, None, self.tapped_objective(request))
        return loss, grads

    def activation_gradients(self, request, layers, keys, return_activations: bool):
        from gradkit._backends._tapped import run_tapped

        return run_tapped(self, request, OutputTaps(layers, keys),
                          self.tapped_objective(request), keep_outputs=return_activations)

    def vectorize_hazard(self, request):
        """Why the vectorizer must not run this model, or None: a convolution it would make
        slow (`unfactored_convolution`), or an op it is known to crash on, seen in the
        compiled gradient (which this traces and caches). None where the one-pass route
        applies: it vectorizes no layer."""
        if self._one_pass(request) is not None:
            return None
        slow = unfactored_convolution(request.model, request.variables, self.layers_module) \
            if self.p.slow_vectorized_convolutions else None
        if slow is not None or not self.p.hazardous_ops:
            return slow
        self.gradients(request)
        cache = _cache.for_model(request.model)  # no entry: not compiled (tf-keras graph mode)
        key = ("gradients", request.cache_key(), self.scale_of(request.model) != 1.0)
        return self.p.hazard(cache[key]) if key in cache else None

    def regularizer_gradients(self, request, regularizers: dict) -> dict:
        """``{j: ∇R_j(W_j)}`` (float64 NumPy) for ``regularizers = {j: R_j}`` of selected
        variables j, by the framework's own autodiff at the current values, compiled once per
        model and selection."""
        from gradkit._backends._weight_regularizers import run_regularizer_gradients

        return run_regularizer_gradients(self, request, regularizers)

    @property
    def maps_examples(self) -> bool:
        """Whether `mapped_parts` compiles the loop over examples (else it is not called)."""
        return getattr(self.p, "map_examples", None) is not None

    def per_example_parts(self, request):
        """Per selected variable: a Factor, an (n, *shape) array, or None if unconnected: from
        one pass over the batch where that applies (gradkit._backends._batched), else from
        the adapter's ``parts(request, mapped=False)`` (the vectorizer)."""
        planned = self._one_pass(request)
        if planned is not None:
            from gradkit._backends import _batched

            parts = _batched.run_batched(self, request, planned)
            if parts is not None:
                return parts
            hazard = self.vectorize_hazard(request)  # not looked for while one pass applied
            if hazard is not None:
                raise RuntimeError(hazard)
        return self.parts(request, mapped=False)

    def _one_pass(self, request) -> list | None:
        """The planned layers if the one-pass route applies to `request`, else None."""
        from gradkit._backends import _batched

        planned = planned_layers(self, request, False)
        return planned if _batched.applies(request, planned) else None

    def mapped_parts(self, request):
        """`per_example_parts`' result from a loop over the examples compiled into one
        function (``p.map_examples``: ``tf.map_fn``, ``jax.lax.map``; torch: a Python loop inside
        one eager call), not the vectorizer."""
        return self.parts(request, mapped=True)

    def accumulator(self, request, skip_nonfinite: bool):
        from gradkit._backends._accumulator import Accumulator

        return Accumulator(self, request, bool(skip_nonfinite))


def data_of(batch, seed: int | None = None) -> dict:
    """A Batch as the steps' `data` dict: x, and y, sample_weight and the dropout seed
    (gradkit._seeds) where given."""
    data = {"x": batch.x, "y": batch.y, "sample_weight": batch.sample_weight, "seed": seed}
    return {key: value for key, value in data.items() if value is not None}


def compiled(request, scale: Any, name: str, build: Callable, *key: Any) -> Any:
    """The cached entry ``build(scaled)`` of operation `name` for `request` (per model, its
    selection, objective and mode, and whether the loss `scale`, read once per call by the
    caller, differs from 1)."""
    scaled = scale != 1.0
    return _cache.cached(request.model, (name, request.cache_key(), scaled, *key),
                         lambda: build(scaled))


def host(p, loss: Any, *groups: list) -> tuple:
    """(loss as a float, each group's arrays as NumPy, None kept)."""
    return (float(p.to_numpy(loss)),
            *([None if a is None else p.to_numpy(a) for a in group] for group in groups))


def planned_layers(adapter, request, mapped: bool) -> list:
    """The factored layers of `request` (gradkit._factors.plan). In the compiled loop
    (`mapped`) only the kinds marked `compiled_loop` are factored: there the framework's own
    gradient of a convolution or a normalization is faster than forming it from the factors
    on the host. Planned once per model and selection (kept with its compiled functions)."""
    def build():
        planned = plan(request.model, request.variables, adapter.layers_module)
        return [entry for entry in planned if not mapped or KINDS[entry.kind].compiled_loop]

    return _cache.cached(request.model, ("planned", request.cache_key(), mapped), build)


def run_per_example(adapter, request, planned: list, make: Callable,
                    mapped: bool = False) -> list:
    """Per selected variable: a Factor, an (n, *shape) array, or None if unconnected, from
    `per_example_fn` compiled and cached; ``make(scaled) -> (objective_of, chosen_of)``.
    `mapped`: a loop over the examples compiled into the function (``p.map_examples``)
    instead of the vectorizer."""
    count = len(request.variables)

    def build(scaled):
        (objective_of, chosen_of), connected = make(scaled), []
        return connected, adapter.p.compile(per_example_fn(
            adapter.p, planned, count, objective_of, chosen_of, connected, scaled,
            request.cache_key(), mapped), request.model)

    scale = adapter.scale_of(request.model)
    connected, run = compiled(request, scale, "per_example", build, mapped)
    arrays, grads = run(data_of(request.batch, request.seed), scale)  # a vectorizer's gap raises
    parts = assemble(count, planned, arrays, grads)
    return with_regularizers(request, planned,
                             [part if ok else None for part, ok in zip(parts, connected)])


def gradient_fn(adapter, request, scaled: bool) -> Callable:
    """fn -> (loss, [gradient or None per selected variable]), unscaled; the adapter's
    ``objective(request, scaled)`` gives ``(objective_of(values, data, scale) -> f(perturb,
    chosen), chosen_of(values) -> the selected variables' values)``."""
    p, (objective_of, chosen_of) = adapter.p, adapter.objective(request, scaled)

    def fn(values, data, scale):
        loss, (grads,), _ = p.grad(objective_of(values, data, scale))(chosen_of(values))
        return loss, unscaled(p, grads, scale, scaled)

    return fn


def run_gradients(adapter, request, pad: Any = None) -> tuple:
    """(loss, gradients) as NumPy from `gradient_fn`, compiled and cached."""
    scale = adapter.scale_of(request.model)
    run = compiled(request, scale, "gradients", lambda s: adapter.p.compile(
        gradient_fn(adapter, request, s), request.model, pad=pad))
    return host(adapter.p, *run(data_of(request.batch, request.seed), scale))


def unscaled(p, grads: list, scale: Any, scaled: bool = True) -> list:
    """Gradients of the scaled objective divided by the loss scale (None kept)."""
    if not scaled:
        return list(grads)
    return [None if g is None else g / p.ops.cast(scale, g.dtype) for g in grads]


def per_example_fn(p, planned: list, count: int, objective_of: Callable, chosen_of: Callable,
                   connected: list, scaled: bool, key: Any, mapped: bool = False) -> Callable:
    """fn -> (factor arrays per planned layer, per-example gradients of the other selected
    variables): the framework's vectorizer (or, `mapped`, its compiled loop) over each
    example's own objective, differentiated
    w.r.t. zero perturbations at the planned layers' pre-activations (gradkit._factors) and
    the unplanned variables ``chosen_of(values)``. ``objective_of(values, example, scale)``
    gives ``f(perturb, chosen)`` for one example (no batch axis). Per selected variable,
    whether it reaches the objective is written into `connected` (found while tracing)."""
    taps = LayerTaps(planned)

    def fn(values, data, scale):
        def one(example):
            base, chosen, seen = objective_of(values, example, scale), chosen_of(values), []

            def f(perturb, chosen):
                seen.clear()  # (layer, shape, dtype) per tap, in call order, of this pass
                taps.start(lambda layer, call, z: seen.append(
                    (layer, tuple(z.shape), z.dtype)) or perturb(z))
                with taps.installed():
                    value, _ = base(perturb, chosen)
                return value, taps.inputs

            shapes = tuple((tuple(a.shape), str(a.dtype)) for a in leaves(list(example.values())))
            inputs, (grads,), deltas = p.grad(f, taps=True, shape_key=(key, shapes))(chosen)
            by_layer: list[list] = [[] for _ in planned]
            reached = [False] * len(planned)
            for (layer, shape, dtype), delta in zip(seen, deltas):
                reached[layer] = reached[layer] or delta is not None
                by_layer[layer].append(p.zeros(shape, dtype) if delta is None else delta)
            connected[:] = _reaching(planned, reached, grads, count)
            return by_layer, [p.zeros(tuple(c.shape), c.dtype) if g is None else g
                              for g, c in zip(grads, chosen)], inputs

        deltas, grads, inputs = (p.map_examples if mapped else p.vectorize)(one)(data)
        arrays = factor_arrays(planned, inputs, deltas, p.ops, scale if scaled else None)
        return arrays, unscaled(p, grads, scale, scaled)

    return fn


def _reaching(planned: list, reached: list[bool], direct: list, count: int) -> list[bool]:
    """Per selected variable: its factored layer's output, or itself, reaches the objective."""
    found = [True] * count
    for entry, ok in zip(planned, reached):
        for j in entry.roles.values():
            found[j] = ok
    for j, grad in zip(rest(planned, count), direct):
        found[j] = grad is not None
    return found
