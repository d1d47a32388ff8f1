"""Gradients with respect to the model's inputs or chosen layers' outputs, written once over
`Primitives`: one compiled function per model, selection and input structure that
differentiates the adapter's ``tapped_objective`` with respect to the float input leaves
(``taps=None``; token ids get None) or to zero perturbations added to the tapped layers'
outputs (`gradkit._taps.OutputTaps`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

from gradkit._backends._steps import compiled, data_of, host, unscaled
from gradkit._data import leaves, map_structure
from gradkit._taps import OutputTaps


def run_tapped(adapter, request, taps: OutputTaps | None, objective_of: Callable,
               keep_outputs: bool = False) -> tuple:
    """(loss, grads, outputs) of `tapped_fn`, compiled and cached, as NumPy (the outputs only
    with `keep_outputs`, else None each); the taps are installed around the call and checked
    after it."""
    template = map_structure(lambda _: 0, request.batch.x)
    key = (None if taps is None else tuple(id(la) for la in taps.layers), repr(template))
    scale = adapter.scale_of(request.model)
    taps, run = compiled(request, scale, "tapped", lambda s: (taps, adapter.p.compile(
        tapped_fn(adapter.p, taps, template, objective_of), request.model)), key)
    data = dict(data_of(request.batch, request.seed), x=leaves(request.batch.x))
    with taps.installed() if taps is not None else nullcontext():
        loss, grads, outputs = run(data, scale)
    if taps is not None:
        taps.check()  # what the pass recorded: a shared, unused or non-float layer
    if not keep_outputs:  # no copy to the host of what the caller will not read
        outputs = [None] * len(outputs)
    return host(adapter.p, loss, grads, outputs)


def _placed(items: list, at: list, values: list) -> list:
    """A copy of `items` with ``values[k]`` at position ``at[k]``."""
    out = list(items)
    for i, value in zip(at, values):
        out[i] = value
    return out


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

        if taps is None:  # the float inputs only (token ids have no gradient: None)
            xs = list(data["x"])
            at = [i for i, a in enumerate(xs) if "float" in str(a.dtype)]
            (loss, _, _), (grads,), _ = p.grad(lambda perturb, chosen: f(
                perturb, _placed(xs, at, chosen)))([xs[i] for i in at])
            return loss, unscaled(p, _placed([None] * len(xs), at, grads), scale), []
        (loss, outputs, order), _, tap_grads = p.grad(f, taps=True)()
        grads = _placed([None] * len(taps.layers), order, tap_grads)
        return loss, unscaled(p, grads, scale), outputs

    return fn
