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
from gradkit._data import Batch, map_structure
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
    with torch.enable_grad():
        loss = k3.objective_value(
            model, objective, training, trainable, non_trainable, metrics, x, y, sample_weight
        )
        grads = torch.autograd.grad(loss.float() * scale, watched, allow_unused=True)
    return float(loss.detach()), [
        None if g is None else (g / scale).detach().cpu().numpy() for g in grads
    ]


def _to_tensor(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else keras.ops.convert_to_tensor(value)
