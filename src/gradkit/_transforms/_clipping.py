"""Clipping: by the global L2 norm, by each variable's L2 norm, and elementwise by value.

    clip_by_global_norm(c):  g_i ← g_i · min(1, c / ‖(g_1, …, g_n)‖₂)   one factor for all
    clip_by_norm(c):         g_i ← g_i · min(1, c / ‖g_i‖₂)             one per variable
    clip_by_value(lo, hi):   g ← min(max(g, lo), hi)                    elementwise

Norms are accumulated in float64 (float32 inside a wrapped optimizer's step); each array keeps
its dtype. A norm within the bound (zero included) leaves g unchanged.
"""

from __future__ import annotations

from typing import Any

from gradkit._errors import InvalidArgumentError, received
from gradkit._transforms._base import GradientTransformation, Grads, map_grads, number, stateless
from gradkit._transforms._ops import ops_for


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale every gradient by one factor so that their global L2 norm is at most `max_norm`
    (as ``optax.clip_by_global_norm`` and Keras' ``global_clipnorm``)."""
    max_norm = number(max_norm, "max_norm", low=0.0, strict=True)

    def clip(grads: Grads) -> Grads:
        ops = ops_for(grads)
        norm = ops.sqrt(sum(ops.squared_norm(g) for g in grads.values() if g is not None))
        factor = _factor(ops, norm, max_norm)
        return map_grads(lambda _, g: ops.scaled(g, factor), grads)

    return stateless(clip)


def clip_by_norm(max_norm: float) -> GradientTransformation:
    """Scale each variable's gradient so that its own L2 norm is at most `max_norm` (as Keras'
    ``clipnorm``)."""
    max_norm = number(max_norm, "max_norm", low=0.0, strict=True)
    def clip(grads: Grads) -> Grads:
        ops = ops_for(grads)
        return map_grads(
            lambda _, g: ops.scaled(g, _factor(ops, ops.sqrt(ops.squared_norm(g)), max_norm)),
            grads)

    return stateless(clip)


def clip_by_value(lo: float, hi: float) -> GradientTransformation:
    """Clip every element to ``[lo, hi]`` (as ``optax.clip(max_delta)`` with lo = -hi, and
    Keras' ``clipvalue``). Infinite bounds are allowed."""
    lo = number(lo, "lo", infinite=True)
    hi = number(hi, "hi", infinite=True)
    if lo > hi:
        raise InvalidArgumentError(
            f"clip_by_value needs lo <= hi, but lo={lo:g} is above hi={hi:g}. Swap them, or "
            "use clip_by_value(-c, c) for a symmetric range. " + received(lo=lo, hi=hi))
    return stateless(lambda grads: map_grads(lambda _, g: ops_for(grads).clip(g, lo, hi), grads))


def _factor(ops: Any, norm: Any, max_norm: float) -> Any:
    """``min(1, max_norm / norm)`` without a branch (1 for a zero norm)."""
    return max_norm / ops.maximum(norm, max_norm)
