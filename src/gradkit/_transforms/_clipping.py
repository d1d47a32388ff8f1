"""Clipping: by the global L2 norm, by each variable's L2 norm, and elementwise by value.

    clip_by_global_norm(c):  g_i ← g_i · min(1, c / ‖(g_1, …, g_n)‖₂)   one factor for all
    clip_by_norm(c):         g_i ← g_i · min(1, c / ‖g_i‖₂)             one per variable
    clip_by_value(lo, hi):   g ← min(max(g, lo), hi)                    elementwise

Norms are accumulated in float64; each array keeps its dtype. A zero norm leaves g unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from gradkit._errors import InvalidArgumentError, received
from gradkit._transforms._base import (
    GradientTransformation,
    Grads,
    map_grads,
    number,
    squared_norm,
    stateless,
)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale every gradient by one factor so that their global L2 norm is at most `max_norm`
    (as ``optax.clip_by_global_norm`` and Keras' ``global_clipnorm``)."""
    max_norm = number(max_norm, "max_norm", low=0.0, strict=True)

    def clip(grads: Grads) -> Grads:
        norm = math.sqrt(sum(squared_norm(g) for g in grads.values() if g is not None))
        factor = _factor(norm, max_norm)
        return map_grads(lambda _, g: g * factor, grads)

    return stateless(clip)


def clip_by_norm(max_norm: float) -> GradientTransformation:
    """Scale each variable's gradient so that its own L2 norm is at most `max_norm` (as Keras'
    ``clipnorm``)."""
    max_norm = number(max_norm, "max_norm", low=0.0, strict=True)
    return stateless(lambda grads: map_grads(
        lambda _, g: g * _factor(math.sqrt(squared_norm(g)), max_norm), grads))


def clip_by_value(lo: float, hi: float) -> GradientTransformation:
    """Clip every element to ``[lo, hi]`` (as ``optax.clip(max_delta)`` with lo = -hi, and
    Keras' ``clipvalue``). Infinite bounds are allowed."""
    lo = number(lo, "lo", infinite=True)
    hi = number(hi, "hi", infinite=True)
    if lo > hi:
        raise InvalidArgumentError(
            f"clip_by_value needs lo <= hi, but lo={lo:g} is above hi={hi:g}. Swap them, or "
            "use clip_by_value(-c, c) for a symmetric range. " + received(lo=lo, hi=hi))
    return stateless(lambda grads: map_grads(lambda _, g: np.clip(g, lo, hi), grads))


def _factor(norm: float, max_norm: float) -> float:
    return max_norm / norm if norm > max_norm else 1.0
