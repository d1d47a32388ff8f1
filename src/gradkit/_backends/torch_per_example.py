"""Per-example gradients on Keras 3 with PyTorch (gradkit.per_example_gradients, _norms).

Two routes to the same rows:

- batched (inference through Keras' own layers only, every selected variable in a plain
  Dense/Embedding/Conv layer): ONE forward pass over the batch with zero perturbations at the
  pre-activations, and ONE backward pass of the sum of the examples' own objectives. Example
  i's objective depends on row i alone, so the gradient at row i of each perturbation is
  example i's own δ (the factor of its weight gradient; see `_layer_factors`).
- vectorized (everything else): `torch.func.vmap` of `torch.func.grad` of each example's
  objective over `stateless_call`, with respect to the perturbations and the other selected
  variables.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
import torch

from gradkit._backends import _cache
from gradkit._backends import _keras3 as k3
from gradkit._backends.torch import _to_tensor, kept_rng
from gradkit._data import Batch, leaves, map_structure
from gradkit._factors import LayerTaps, Ops, assemble, factor_arrays, rest
from gradkit._objective import Objective
from gradkit._select import walk_layers

_PERTURBATION_SPECS: "weakref.WeakKeyDictionary[Any, _cache.BoundedCache]" = (
    weakref.WeakKeyDictionary())
_USER_CODE = ("Lambda", "TorchModuleWrapper")


def _cast(x: Any, dtype: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(getattr(torch, dtype))
    return torch.tensor(x, dtype=getattr(torch, dtype))


#: Plain torch calls for `factor_arrays` (keras.ops adds a conversion check to each).
_TORCH_OPS = Ops(torch.reshape, _cast,
                 lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


def per_example_parts(model, variables, objective: Objective, batch: Batch, training: bool):
    """Per selected variable: a `Factor` (plain Dense/Embedding/Conv) or an (n, *shape) tensor."""
    k3.check_built(model)
    objective, planned = k3.prepare_objective(objective), k3.factor_plan(model, variables)
    data = [map_structure(_to_tensor, v) for v in (batch.x, batch.y, batch.sample_weight)]
    if not rest(planned, len(variables)) and rows_independent(model, training):
        parts = _batched(model, planned, objective, data, len(variables))
        if parts is not None:
            return parts
    return _vectorized(model, variables, planned, objective, data, batch.size, training)


def kernel_rows(inputs: Any, deltas: Any, out: np.ndarray) -> None:
    """``out[i] = Σ_t a_it δ_itᵀ`` (see `gradkit._rows.write_rows`), written by torch's own
    threads straight into the NumPy result: torch's OpenMP threads busy-wait after each
    operation, so NumPy threads of gradkit's would share the cores with them."""
    a, d, target = torch.as_tensor(inputs), torch.as_tensor(deltas), torch.from_numpy(out)
    if a.shape[1] == 1:
        torch.mul(a[:, 0, :, None], d[:, 0, None, :], out=target)
    else:
        torch.matmul(a.transpose(1, 2), d, out=target)


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


def _batched(model, planned, objective: Objective, data: list, count: int) -> list | None:
    """The factors from one forward and one backward pass over the whole batch, or None if
    a forward-pass loss depends on the activations (then the objectives do not add up)."""
    taps, scale = LayerTaps(planned), k3.loss_scale(model)
    perturbations: list[list] = [[] for _ in planned]

    def perturb(layer: int, call: int, z: Any) -> Any:
        zero = torch.zeros_like(z, requires_grad=True)
        perturbations[layer].append(zero)
        return z + zero

    trainable, non_trainable, metrics = (
        [v.detach() for v in values] for values in k3.variable_values(model))
    x, y, sample_weight = data

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
        found = iter(torch.autograd.grad(total.float().sum() * scale, flat,
                                         allow_unused=True, materialize_grads=True))
    deltas = [[next(found).unsqueeze(1) for _ in calls] for calls in perturbations]
    inputs = [[a.detach().unsqueeze(1) for a in calls] for calls in taps.inputs]
    arrays = factor_arrays(planned, inputs, deltas, _TORCH_OPS,
                           None if scale == 1.0 else scale)
    return assemble(count, planned, [(a.cpu(), d.cpu()) for a, d in arrays], [])


def _vectorized(model, variables, planned, objective, data, size: int, training) -> list:
    """`torch.func.vmap` of `torch.func.grad` of each example's objective."""
    selected = k3.selected_indices(model, [variables[j] for j in rest(planned, len(variables))])
    taps, scale = LayerTaps(planned), k3.loss_scale(model)
    trainable, non_trainable, metrics = (
        [v.detach() for v in values] for values in k3.variable_values(model))
    others = [v for i, v in enumerate(trainable) if i not in set(selected)]

    def forward(perturb, chosen, x, y, sample_weight):
        taps.start(perturb)
        with taps.installed():
            loss = k3.example_objective(model, objective, training,
                                        k3.merge_trainable(selected, chosen, others),
                                        non_trainable, metrics, x, y, sample_weight)
        return loss.float() * scale, taps.inputs

    def example(eps, chosen, x, y, sample_weight):
        return forward(lambda layer, call, z: z + eps[layer][call], chosen, x, y, sample_weight)

    chosen = [trainable[i] for i in selected]
    in_dims = (0, None) + tuple(None if d is None else 0 for d in data)
    per_example = torch.func.vmap(torch.func.grad(example, argnums=(0, 1), has_aux=True),
                                  in_dims=in_dims, randomness="same")
    with torch.enable_grad(), kept_rng():
        zeros = _zero_perturbations(model, (tuple(id(v) for v in variables),
                                            objective.cache_key(), bool(training)),
                                    forward, planned, chosen, data, size)
        (deltas, grads), inputs = per_example(zeros, chosen, *data)
    unscale = (lambda g: g.detach()) if scale == 1.0 else (lambda g: (g / scale).detach())
    arrays = factor_arrays(planned, [[a.detach() for a in calls] for calls in inputs],
                           [[d.detach() for d in calls] for calls in deltas], _TORCH_OPS,
                           None if scale == 1.0 else scale)
    return assemble(len(variables), planned,
                    [(a.cpu(), d.cpu()) for a, d in arrays], [unscale(g).cpu() for g in grads])
def _zero_perturbations(model, key, forward, planned, chosen, data, size: int) -> list:
    """Zeros shaped like each factored pre-activation, found by a pass on the first example
    (once per model, selection, objective and example shape)."""
    key = (*key, tuple((tuple(a.shape[1:]), str(a.dtype)) for a in leaves(data[0])))
    specs = _cache.per_model(_PERTURBATION_SPECS, model)
    if key not in specs:
        seen: list[list] = [[] for _ in planned]
        if planned:
            with torch.no_grad():
                forward(lambda layer, call, z: seen[layer].append(z) or z, chosen,
                        *[map_structure(lambda a: a[0], d) for d in data])
        specs[key] = [[(z.shape, z.dtype, z.device) for z in calls] for calls in seen]
    return [[torch.zeros((size, *shape), dtype=dtype, device=device)
             for shape, dtype, device in calls] for calls in specs[key]]

