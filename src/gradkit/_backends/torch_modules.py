"""Keras' TorchModuleWrapper under gradkit's stateless calls.

The wrapper calls its torch module, which reads its own parameters: the values a stateless
call hands the wrapper's variables never reach it, and their gradient would be "not
connected" (or zeros). Around gradkit's calls (`read_values`) each wrapper's module runs
through `torch.func.functional_call` on those values instead, matched to its parameters by
storage, with copies of its buffers, so a torch BatchNorm in training mode leaves the
module's running statistics as they were. The wrapper's own call, which taps may shadow, is
left as it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch

from gradkit._select import walk_layers
from gradkit._taps import restore, shadow


def wrappers_of(model: Any) -> list:
    """The TorchModuleWrapper layers inside `model`."""
    return [layer for _, layer in walk_layers(model)
            if type(layer).__name__ == "TorchModuleWrapper" and hasattr(layer, "module")]


@contextmanager
def read_values(wrappers: list):
    """Within the block each of `wrappers` runs its module on its variables' current values
    (the values under differentiation inside a stateless call)."""
    patched: list = []
    try:
        for layer in wrappers:
            module = _reading_values(layer)
            if module is not None:
                shadow(layer, "module", module, patched)
        yield
    finally:
        restore(patched)


def _reading_values(layer: Any) -> Callable | None:
    """The wrapper's module as a function of its variables' values; None if its parameters
    are not all the wrapper's variables (the module changed after wrapping)."""
    module = layer.module
    at = {v.value.data_ptr(): v for v in layer.variables}  # they share the parameters' memory
    named = [(name, at.get(p.data_ptr())) for name, p in module.named_parameters()]
    if any(variable is None for _, variable in named):
        return None
    buffers = dict(module.named_buffers())

    def run(*args: Any, **kwargs: Any) -> Any:
        values = {name: variable.value for name, variable in named}
        values.update((name, b.clone()) for name, b in buffers.items())
        return torch.func.functional_call(module, values, args, kwargs)

    return run
