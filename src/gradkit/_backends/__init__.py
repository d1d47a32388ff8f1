"""Backend adapters: the only modules that import a framework.

Each flavour (tensorflow, jax, torch, tf_keras) has a family of modules, loaded by name:

- ``<flavour>``: ``compute_gradients(model, variables, objective, batch, training) ->
  (loss, [np.ndarray | None])`` and the input and activation gradients;
- ``<flavour>_per_example``: ``per_example_parts(...)`` (a `Factor` or an array of rows per
  variable), optionally ``PAD_CHUNKS`` and ``kernel_rows``;
- ``<flavour>_accumulate``: ``gradient_accumulator(...)`` for gradkit.accumulate;
- ``tensorflow_distributed`` (also for tf_keras) and ``jax_distributed``: ``accumulate(...)``
  under a tf.distribute strategy or a JAX mesh.

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
