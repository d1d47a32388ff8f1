"""torch's batched factor route for per-example gradients (a speciality of the torch backend).

When every selected variable sits in a plain layer of a factored kind (Dense, Embedding, Conv,
DepthwiseConv, EinsumDense, Layer-, Group- and BatchNormalization; ``gradkit._factors``) and the
forward pass treats each row exactly as a batch of one would (`rows_independent`), ONE
forward pass over the batch with zero perturbations at the pre-activations and ONE backward
pass of the sum of the examples' own objectives give every example's factors: example i's
objective depends on row i alone, so the gradient at row i of each perturbation is example
i's own δ. This is several times faster on torch than `torch.func.vmap` of
`torch.func.grad`.
"""

from __future__ import annotations

from typing import Any

import keras
import torch

from gradkit._backends import _keras3 as k3
from gradkit._backends.torch import TorchPrimitives, to_tensor
from gradkit._data import map_structure
from gradkit._factors import LayerTaps, assemble, factor_arrays
from gradkit._select import walk_layers

_USER_CODE = ("Lambda", "TorchModuleWrapper")


def rows_independent(model: Any, training: bool) -> bool:
    """Whether the batch's forward pass treats each row exactly as a batch of one would:
    inference through Keras' own layers only, none running user code (Lambda,
    TorchModuleWrapper), keeping state across batches (stateful RNN) or adding an activity
    loss (Keras divides it by the batch size)."""
    if training:
        return False
    for obj in [model, *(layer for _, layer in walk_layers(model))]:
        cls = type(obj)
        if cls.__module__.split(".")[0] != "keras" or cls.__name__ in _USER_CODE:
            return False
        if getattr(obj, "stateful", False) or getattr(obj, "activity_regularizer", None):
            return False
    return True


def batched_factors(request, planned: list) -> list | None:
    """The parts from one forward and one backward pass over the whole batch (rows must be
    independent), or None if a forward-pass loss depends on the activations (then the
    objectives do not add up, and the engine vectorizes)."""
    model = request.model
    objective, batch = k3.prepare_objective(request.objective), request.batch
    taps, scale = LayerTaps(planned), k3.loss_scale(model)
    perturbations: list[list] = [[] for _ in planned]

    def perturb(layer: int, call: int, z: Any) -> Any:
        zero = torch.zeros_like(z, requires_grad=True)
        perturbations[layer].append(zero)
        return z + zero

    trainable, non_trainable, metrics = (
        [v.detach() for v in values] for values in k3.variable_values(model))
    x, y, sample_weight = (map_structure(to_tensor, v)
                           for v in (batch.x, batch.y, batch.sample_weight))

    def own_objective(y_pred, y, sample_weight):  # one example's, on its batch of one
        one = [map_structure(lambda a: keras.ops.expand_dims(a, 0), t)
               for t in (y_pred, y, sample_weight)]
        return k3.objective_of_predictions(model, objective, False, trainable, non_trainable,
                                           metrics, None, one[1], one[0], one[2], [])

    with torch.enable_grad():
        taps.start(perturb)
        with taps.installed():
            y_pred, losses = k3.forward(model, False, trainable, non_trainable, x)
        if any(getattr(loss, "requires_grad", False) for loss in losses):
            return None
        in_dims = (0, None if y is None else 0, None if sample_weight is None else 0)
        total = torch.func.vmap(own_objective, in_dims=in_dims)(y_pred, y, sample_weight)
        flat = [p for calls in perturbations for p in calls]
        found = iter(torch.autograd.grad(total.float().sum() * scale, flat, allow_unused=True)
                     if total.requires_grad else [None] * len(flat))
    raw = [[next(found) for _ in calls] for calls in perturbations]
    reached = [any(d is not None for d in calls) for calls in raw]
    deltas = [[(torch.zeros_like(p) if d is None else d).unsqueeze(1)
               for d, p in zip(calls, zeros)] for calls, zeros in zip(raw, perturbations)]
    inputs = [[a.detach().unsqueeze(1) for a in calls] for calls in taps.inputs]
    arrays = factor_arrays(planned, inputs, deltas, TorchPrimitives.ops,
                           None if scale == 1.0 else scale)
    parts = assemble(len(request.variables), planned,
                     [(a.cpu(), d.cpu()) for a, d in arrays], [])
    for entry, ok in zip(planned, reached):
        for j in entry.roles.values():
            parts[j] = parts[j] if ok else None
    return parts
