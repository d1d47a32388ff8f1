"""Backend adapters: the only modules that import a framework.

Each flavour module exposes the same function::

    compute_gradients(model, variables, objective, batch, training)
        -> (loss: float, grads: list[np.ndarray | None])

`variables` are the selected trainable variables in model order; a None gradient means the
variable has no path to the loss. The value is the true, unscaled gradient of the objective
(see gradkit._objective), computed without changing any model state.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def load(flavour: str) -> ModuleType:
    """Import the adapter module of `flavour` (imports its framework on first use)."""
    return importlib.import_module(f"gradkit._backends.{flavour}")
