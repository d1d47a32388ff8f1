"""The differentiation steps every adapter shares, written once over `Primitives`.

Each builder returns a pure ``fn(values, data, scale)`` for `Primitives.compile`, given the
adapter's own objective, which returns ``(scaled value, loss)``: Keras 3 builds it on
``stateless_call``, tf-keras on its own variables. The steps never import a framework: they
differentiate through `p`, the adapter's primitives.
"""

from __future__ import annotations

from typing import Any, Callable

from gradkit._data import leaves, map_structure
from gradkit._factors import LayerTaps, factor_arrays, rest
from gradkit._taps import OutputTaps


def unscaled(p, grads: list, scale: Any, scaled: bool = True) -> list:
    """Gradients of the scaled objective divided by the loss scale (None kept)."""
    if not scaled:
        return list(grads)
    return [None if g is None else g / p.ops.cast(scale, g.dtype) for g in grads]


def tapped_fn(p, taps: OutputTaps | None, template: Any, objective_of: Callable) -> Callable:
    """fn -> (loss, [gradient or None], [output]): w.r.t. the flat inputs (``taps=None``;
    ``data["x"]`` is then the list of input leaves) or the tapped layers' outputs.
    ``objective_of(values, data, scale, x) -> (scaled value, loss)``."""
    def fn(values, data, scale):
        def f(perturb, *inputs):  # inputs: the flat x when differentiated, else none
            feed = iter(inputs[0] if inputs else data["x"])
            x = map_structure(lambda _: next(feed), template)
            outputs, order = ([None] * len(taps.layers), []) if taps else ([], [])
            if taps is not None:
                taps.start(lambda i, out: order.append(i) or outputs.__setitem__(i, out)
                           or perturb(out))
            value, loss = objective_of(values, data, scale, x)
            return value, (loss, outputs, order)

        if taps is None:
            (loss, _, _), (grads,), _ = p.grad(f)(list(data["x"]))
            return loss, unscaled(p, grads, scale), []
        (loss, outputs, order), _, tap_grads = p.grad(f, taps=True)()
        grads = [None] * len(taps.layers)
        for i, grad in zip(order, tap_grads):
            grads[i] = grad
        return loss, unscaled(p, grads, scale), outputs

    return fn


def per_example_fn(p, planned: list, count: int, objective_of: Callable, chosen_of: Callable,
                   connected: list, scaled: bool, key: Any) -> Callable:
    """fn -> (factor arrays per planned layer, per-example gradients of the other selected
    variables): the framework's vectorizer over each example's own objective, differentiated
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

        deltas, grads, inputs = p.vectorize(one)(data)
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
