"""Backends: the only modules that import a framework, behind two written contracts.

`for_flavour(flavour)` gives the flavour's `Adapter`, the one object the front door calls:

- Keras 3 (``tensorflow``, ``jax``, ``torch``): `gradkit._backends._engine.Engine`, every
  operation written once over ``stateless_call`` and the backend's `Primitives`
  (`gradkit._backends._engine`), found in the module named after the backend;
- tf-keras (``tf_keras``): its own adapter on the TensorFlow primitives (tapes on the
  variables themselves, one state save/restore per compiled call; graph mode in
  ``tf_keras_graph``), which never imports Keras 3.

What both share (the batch gradient, Hessian-vector products, taps, per-example factors,
accumulation) is written once in `gradkit._backends._steps`, over each adapter's objective.

Every operation takes a prepared `gradkit._request.Request` and returns the TRUE gradient
(loss scaling undone) of the request's objective, without changing any model state. A
gradient of None means the variable (or input, or layer output) has no path to the
objective; that answer comes from the differentiation itself.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

_ADAPTERS: dict[str, Any] = {}


@runtime_checkable
class Accumulator(Protocol):
    """A running sum ``Σ_b w_b ∇L_b`` kept on the device (gradkit.accumulate)."""

    #: Per selected variable, whether it reaches the objective (known after the first add).
    connected: list[bool] | None
    #: Batches whose flags may stay outstanding (0 where the backend is synchronous).
    flag_lag: int

    def add(self, batch: Any, weight: float) -> Any:
        """Add ``weight * gradient(batch)``; returns per-variable "all finite" flags."""

    def running(self) -> AbstractContextManager:
        """Wraps the whole pass (e.g. restores a global RNG afterwards)."""

    def finite(self, flags: list) -> list:
        """The flags of several `add` calls as NumPy bool arrays (one wait)."""

    def total(self) -> list:
        """The sums as NumPy arrays (None for unconnected variables)."""


@runtime_checkable
class Adapter(Protocol):
    """What the front door needs from a flavour. `request`: gradkit._request.Request."""

    #: Pad a short last chunk of per-example work to the chunk size (compiles per shape).
    pad_chunks: bool
    #: ``(inputs, deltas, out)``: writes Dense kernel rows with the framework's own threads
    #: (gradkit._factors.write_rows' `product`), or None for NumPy's.
    kernel_rows: Any

    def gradients(self, request: Any) -> tuple[float, list]:
        """(loss, [gradient or None per selected variable])."""

    def input_gradients(self, request: Any) -> tuple[float, list]:
        """(loss, [gradient or None per leaf of request.batch.x])."""

    def activation_gradients(self, request: Any, layers: list, keys: list[str],
                             return_activations: bool) -> tuple[float, list, list]:
        """(loss, [gradient or None per layer output], [output or None])."""

    def hvp(self, request: Any, vectors: list) -> tuple[float, list]:
        """(loss, [Hessian-vector product block or None per selected variable])."""

    def ggn_vp(self, request: Any, vectors: list) -> tuple[float, list]:
        """(loss, [generalized Gauss-Newton product Jᵀ H_L J v or None per selected
        variable]): J of the model's outputs, H_L of the loss with respect to them."""

    def values_held(self, model: Any) -> AbstractContextManager:
        """A block of calls at the same weights (the loop over a batch's examples): the
        calls inside may read `model`'s variables once instead of on every call."""

    #: Whether `mapped_parts` has a loop over examples compiled into one function.
    maps_examples: bool

    def regularizer_gradients(self, request: Any, regularizers: dict) -> dict:
        """``{j: ∇R_j(W_j)}`` (float64 NumPy) for ``regularizers = {j: R_j}`` of selected
        variables j, by the framework's own autodiff at the current values."""

    def per_example_parts(self, request: Any) -> list:
        """Per selected variable: a gradkit._factors.Factor or an (n, *shape) array."""

    def mapped_parts(self, request: Any) -> list:
        """`per_example_parts`' result from a compiled loop over the examples (no vectorizer)."""

    def accumulator(self, request: Any, skip_nonfinite: bool) -> Accumulator:
        """A fresh running sum (request.batch is None)."""

    def distributed_sum(self, request: Any, batches: Any, strategy: Any) -> tuple[list, int]:
        """(Σ_b n_b ∇L_b over every replica and worker, N) under `strategy`."""


def for_flavour(flavour: str) -> Adapter:
    """The adapter of `flavour` (imports its framework on first use)."""
    if flavour not in _ADAPTERS:
        module = importlib.import_module(f"gradkit._backends.{flavour}")
        _ADAPTERS[flavour] = module.adapter()
    return _ADAPTERS[flavour]
