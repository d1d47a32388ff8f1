"""Skipping non-finite updates, as ``optax.apply_if_finite`` does.

The inner transformation runs; if any array of its output holds NaN or Inf, the output is
replaced by zeros of the same shapes and dtypes and the inner state is kept as it was (not
advanced). The counts of such updates, in a row and in total, live in the state. Inside a
`wrap`-ped optimizer's step the zeros replace the update the same way (the optimizer still
takes its step, with zero gradients), but no counts are kept there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gradkit._errors import InvalidArgumentError, received
from gradkit._transforms._base import (
    GradientTransformation,
    Grads,
    HostOnlyTransformation,
    check_grads,
    host_only,
    map_grads,
)
from gradkit._transforms._ops import NumpyOps, ops_for


class ApplyIfFiniteState(NamedTuple):
    """`notfinite_count`: non-finite updates in a row (0 after a finite one); `last_finite`:
    whether the last update was finite; `total_notfinite`: all of them; `inner_state`."""

    notfinite_count: int
    last_finite: bool
    total_notfinite: int
    inner_state: Any


def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Run `inner`, but give zeros (and keep its state) when its output is not all finite."""
    if not isinstance(inner, GradientTransformation):
        raise InvalidArgumentError(
            "apply_if_finite(inner) wraps a gradient transformation, e.g. "
            "apply_if_finite(chain(clip_by_global_norm(1.0), scale(0.5))). "
            + received(inner=inner))

    def init(grads: Grads) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(0, True, 0, inner.init(grads))

    def update(grads: Grads, state: ApplyIfFiniteState) -> tuple[Grads, ApplyIfFiniteState]:
        updates, inner_state = inner.update(check_grads(grads), state.inner_state)
        ops = ops_for(updates)
        finite = ops.all_finite([g for g in updates.values() if g is not None])
        if ops is not NumpyOps:  # a compiled step: choose by value, keep no counts
            return map_grads(lambda _, g: ops.where(finite, g, ops.zeros_like(g)),
                             updates), state
        if finite:
            return updates, ApplyIfFiniteState(0, True, state.total_notfinite, inner_state)
        zeros = map_grads(lambda _, g: ops.zeros_like(g), updates)
        return zeros, ApplyIfFiniteState(state.notfinite_count + 1, False,
                                         state.total_notfinite + 1, state.inner_state)

    return (HostOnlyTransformation if host_only(inner) else GradientTransformation)(init, update)
