"""What a tf-keras call writes to, and how gradkit leaves the model as it was.

tf-keras layers and losses assign state during the call (BatchNorm moving statistics, the
compiled loss's Mean metrics). `state_variables` lists what is read before each compiled
call and written back after it; `loss_metrics_idle` leaves the loss metrics out of the call
altogether (a model built in a distribution strategy's scope cannot add to them outside its
replicas).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any


def state_variables(model: Any) -> list:
    """Everything a forward pass or a loss may assign: non-trainable and metric variables."""
    seen, state = set(), []
    candidates = list(model.non_trainable_variables)
    # The compiled loss hides its "loss" (and per-output) Mean metrics from model.metrics
    # until first used, and creates the per-output ones then: build it now (functional
    # models), and take its total-loss mean in any case, so that they are restored too.
    container = getattr(model, "compiled_loss", None)
    if container is not None and not container.built \
            and getattr(model, "_nested_outputs", None) is not None:
        container.build(model._nested_outputs)
    total_mean = getattr(container, "_total_loss_mean", None)
    for metric in [*model.metrics, *([total_mean] if total_mean is not None else [])]:
        candidates.extend(metric.variables)
    for v in candidates:
        if id(v) not in seen:
            seen.add(id(v))
            state.append(v)
    return state


class _Idle:
    """A loss metric that records nothing."""

    @staticmethod
    def update_state(*args, **kwargs) -> None:
        return None


@contextmanager
def loss_metrics_idle(model: Any):
    """The compiled loss without its loss Mean metrics' updates. They would be restored
    afterwards anyway, and the variables of a model built in a distribution strategy's scope
    are sync-on-read there: outside the strategy's replicas they cannot be added to (a
    gradient of such a model is taken on this device, as for a model built without it)."""
    container = getattr(model, "compiled_loss", None)
    if container is None or not getattr(container, "built", False):
        yield  # (built on its first call, its metrics with it: updated then, restored)
        return
    saved = container._total_loss_mean, container._per_output_metrics
    container._total_loss_mean = _Idle()
    container._per_output_metrics = None if saved[1] is None else [None] * len(saved[1])
    try:
        yield
    finally:
        container._total_loss_mean, container._per_output_metrics = saved
