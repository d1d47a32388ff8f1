"""Keras 3 on PyTorch: autograd over `stateless_call` (never `functional_call`, which
silently returns zeros for Keras variables).

Eager, as Keras' own torch trainer runs by default: nothing is traced, so batch sizes never
cause recompilation. Unselected variables are detached so backward stops at the selection.
"""

from __future__ import annotations

from typing import Any

import keras
import torch

from gradkit._backends import _keras3 as k3
from gradkit._backends._taps import OutputTaps
from gradkit._data import Batch, leaves, map_structure
from gradkit._objective import Objective


def compute_gradients(model, variables, objective: Objective, batch: Batch, training: bool):
    k3.check_built(model)
    objective = k3.prepare_objective(objective)
    selected = k3.selected_indices(model, variables)
    x, y, sample_weight = (map_structure(_to_tensor, v)
                           for v in (batch.x, batch.y, batch.sample_weight))
    scale = k3.loss_scale(model)
    trainable, non_trainable, metrics = k3.variable_values(model)
    chosen = set(selected)
    trainable = [v if i in chosen else v.detach() for i, v in enumerate(trainable)]
    watched = [trainable[i] for i in selected]
    with torch.enable_grad(), kept_rng():
        loss = k3.objective_value(
            model, objective, training, trainable, non_trainable, metrics, x, y, sample_weight
        )
        grads = torch.autograd.grad(_scaled(loss, scale), watched, allow_unused=True)
    return float(loss.detach()), [
        None if g is None else _unscaled(g, scale).detach().cpu().numpy() for g in grads
    ]


def _scaled(loss, scale: float):
    return loss.float() if scale == 1.0 else loss.float() * scale


def _unscaled(grad, scale: float):
    return grad if scale == 1.0 else grad / scale  # skipped at 1: x / 1.0 == x exactly


def kept_rng():
    """Restore torch's global RNG afterwards: Keras draws unseeded dropout masks from it, and
    a gradkit call must not shift the random stream of the user's next `fit` step."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [])


def _to_tensor(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else keras.ops.convert_to_tensor(value)


# --- Input and activation gradients (gradkit.input_gradients, gradkit.activation_gradients)


def _detached_forward(model, objective, batch: Batch, training: bool, x: Any) -> Any:
    """The objective at the current weights (detached: no weight gradients) for inputs x."""
    y, sample_weight = (map_structure(_to_tensor, v) for v in (batch.y, batch.sample_weight))
    trainable, non_trainable, metrics = k3.variable_values(model)
    return k3.objective_value(model, objective, training, [v.detach() for v in trainable],
                              non_trainable, metrics, x, y, sample_weight)


def _unscaled_grads(loss, sources: list, scale: float) -> list:
    if not loss.requires_grad:  # nothing selected reaches the objective
        return [None] * len(sources)
    grads = torch.autograd.grad(loss.float() * scale, sources, allow_unused=True)
    return [None if g is None else (g / scale).detach().cpu().numpy() for g in grads]


def compute_input_gradients(model, objective: Objective, batch: Batch, training: bool):
    """(loss, [gradient or None per leaf of batch.x]) of the objective w.r.t. the inputs."""
    k3.check_built(model)
    objective = k3.prepare_objective(objective)
    flat = [_to_tensor(leaf).detach().clone().requires_grad_(True) for leaf in leaves(batch.x)]
    feed = iter(flat)
    x = map_structure(lambda _: next(feed), batch.x)
    with torch.enable_grad():
        loss = _detached_forward(model, objective, batch, training, x)
        grads = _unscaled_grads(loss, flat, k3.loss_scale(model))
    return float(loss.detach()), grads


def compute_activation_gradients(model, layers, keys, objective: Objective, batch: Batch,
                                 training: bool, return_activations: bool):
    """(loss, [gradient or None], [activation or None]) for the outputs of `layers`."""
    k3.check_built(model)
    objective = k3.prepare_objective(objective)
    taps = OutputTaps(layers, keys)
    perturbations, outputs = [None] * len(layers), [None] * len(layers)

    def tap(index, output):
        perturbations[index] = torch.zeros_like(output, requires_grad=True)
        outputs[index] = output
        return output + perturbations[index]

    with taps.installed(), torch.enable_grad():
        taps.start(tap)
        loss = _detached_forward(model, objective, batch, training,
                                 map_structure(_to_tensor, batch.x))
        taps.check()  # a shared, unused or non-float layer
        grads = _unscaled_grads(loss, perturbations, k3.loss_scale(model))
    return float(loss.detach()), grads, [
        o.detach().cpu().numpy() if return_activations else None for o in outputs]
