"""The one-pass factor route for per-example gradients, written once over `Primitives`.

When every selected variable sits in a plain layer of a factored kind (gradkit._factors) and
the forward pass treats each row exactly as a batch of one would (`rows_independent`), ONE
forward pass over the batch with zero taps at the planned layers' pre-activations and ONE
backward pass of the sum of the examples' own objectives give every example's factors:
example i's objective depends on row i alone, so the gradient at row i of each tap is
example i's own δ. The framework's vectorizer maps only the loss over the examples (each
example's objective is its loss on a batch of one, as on the other routes), never the model,
so none of its gaps or hazards apply, and the cost is about one batch gradient. The adapter
supplies the objective split at the model's outputs (its ``output_objective``, as for
Gauss-Newton products), so Keras 3 and tf-keras share this module.
"""

from __future__ import annotations

from typing import Any, Callable

from gradkit._backends import _cache
from gradkit._backends._steps import compiled, data_of
from gradkit._data import leaves, map_structure
from gradkit._factors import LayerTaps, assemble, factor_arrays, rest, with_regularizers
from gradkit._select import walk_layers

#: Keras layers that run the user's own code, which may mix the rows of a batch
_USER_CODE = ("Lambda", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "TFSMLayer")


def rows_independent(model: Any, training: bool) -> bool:
    """Whether the batch's forward pass treats each row exactly as a batch of one would:
    inference through Keras' own layers only, none running user code (Lambda, wrapped torch
    or JAX modules), keeping state across batches (stateful RNN) or adding an activity loss
    (Keras divides it by the batch size)."""
    if training:
        return False
    for obj in [model, *(layer for _, layer in walk_layers(model))]:
        cls = type(obj)
        if cls.__module__.split(".")[0] not in ("keras", "tf_keras") \
                or cls.__name__ in _USER_CODE:
            return False
        if getattr(obj, "stateful", False) or getattr(obj, "activity_regularizer", None):
            return False
    return True


def applies(request: Any, planned: list) -> bool:
    """Whether `run_batched` gives `request`'s rows: every selected variable planned, rows
    independent (decided once per model and mode), and no planned layer found to see more
    rows than the batch has (`run_batched`)."""
    model, training = request.model, request.training
    return not rest(planned, len(request.variables)) and _cache.cached(
        model, ("rows_independent", training), lambda: rows_independent(model, training)) \
        and ("folds_rows", request.cache_key()) not in _cache.for_model(model)


def run_batched(adapter: Any, request: Any, planned: list) -> list | None:
    """Per selected variable: its Factor, or None if unconnected, from `batched_fn` compiled
    and cached; None (and the route not tried again for this selection) if a planned layer's
    leading axis is not the batch's: a layer that folds another axis into the batch before
    calling it (tf-keras' TimeDistributed reshapes (n, T, ...) to (n·T, ...)), so its rows
    are not the examples'."""
    def build(scaled):
        reached: list = []
        return reached, adapter.p.compile(
            batched_fn(adapter, request, planned, reached, scaled), request.model)

    scale = adapter.scale_of(request.model)
    reached, run = compiled(request, scale, "batched", build)
    arrays, rows = run(data_of(request.batch), scale)
    if any(deltas.shape[0] != rows.shape[0] for _, deltas in arrays):
        _cache.for_model(request.model)[("folds_rows", request.cache_key())] = True
        return None
    parts = assemble(len(request.variables), [e for e, ok in zip(planned, reached) if ok],
                     arrays, [])
    return with_regularizers(request, planned, parts)


def batched_fn(adapter: Any, request: Any, planned: list, reached: list,
               scaled: bool) -> Callable:
    """fn(values, data, scale) -> (factor arrays of each planned layer whose output reaches
    the objective (gradkit._factors), from one pass over the batch; an empty (batch rows, 0)
    array); which layers reach it is written into `reached` while tracing."""
    p, taps = adapter.p, LayerTaps(planned)
    forward_of, loss_of, chosen_of = adapter.output_objective(request, scaled)

    def fn(values, data, scale):
        seen: list = []  # the planned layer of each tap, in call order

        def own(example):  # one example's objective: its loss on a batch of one
            one = map_structure(lambda a: a[None], example)
            return loss_of(values, one, scale, [])(one.pop("y_pred"))[0]

        def f(perturb):
            seen.clear()
            taps.start(lambda layer, call, z: seen.append(layer) or perturb(z))
            with taps.installed():
                y_pred, _ = forward_of(values, data)(chosen_of(values))
            return p.sum(p.vectorize(own)({**data, "y_pred": y_pred})), taps.inputs

        inputs, _, found = p.grad(f, taps=True)()
        deltas: list[list] = [[] for _ in planned]
        for layer, delta in zip(seen, found):
            deltas[layer].append(delta)
        reached[:] = [all(d is not None for d in calls) for calls in deltas]
        for (layer, _, _), calls, ok in zip(planned, deltas, reached):
            if not ok and any(d is not None for d in calls):
                raise RuntimeError(f"the one-pass route: some calls of shared layer "
                                   f"{layer.name!r} reach the objective, others do not")
        kept = [i for i, ok in enumerate(reached) if ok]
        inputs, deltas = ([[p.detached(t)[:, None] for t in group[i]] for i in kept]
                          for group in (inputs, deltas))
        # (batch rows, 0): the batch's leading size, read on the host after the run
        rows = leaves(data["x"])[0][:, None][:, :0]
        return factor_arrays([planned[i] for i in kept], inputs, deltas, p.ops,
                             scale if scaled else None), rows

    return fn
