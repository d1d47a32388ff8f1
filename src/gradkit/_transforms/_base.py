"""The contract of a gradient transformation, `chain`, and the checks the transforms share.

A gradient set is ``{variable path: np.ndarray or None}``. A transformation is a pair of pure
functions: ``init(grads) -> state`` and ``update(grads, state) -> (new_grads, new_state)``.
Neither modifies its arguments; ``None`` values pass through unchanged. ``update`` is written
over `gradkit._transforms._ops` so that it also runs on framework tensors inside the compiled
step of a `wrap`-ped optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from gradkit._errors import InvalidArgumentError, received
from gradkit._transforms._ops import ops_for

Grads = dict[str, Any]  # {variable path: np.ndarray | None}
State = Any


class GradientTransformation(NamedTuple):
    """``init(grads) -> state``; ``update(grads, state) -> (new_grads, new_state)``."""

    init: Callable[[Grads], State]
    update: Callable[[Grads, State], tuple[Grads, State]]


class HostOnlyTransformation(GradientTransformation):
    """A transformation that runs on NumPy gradient sets only, never inside a compiled step
    (``add_noise``: its generator state lives on the host); so is any built from one."""


def host_only(*transforms: GradientTransformation) -> bool:
    return any(isinstance(t, HostOnlyTransformation) for t in transforms)


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


def stateless(fn: Callable[[Grads], Grads],
              check: Callable[[Grads], Any] | None = None) -> GradientTransformation:
    """A transformation with no state from a function of a (checked) gradient set; `init`
    also runs `check` on the gradient set, to report a bad option before the first update."""

    def init(grads: Grads) -> EmptyState:
        grads = check_grads(grads)
        if check is not None:
            check(grads)
        return EmptyState()

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        return fn(check_grads(grads)), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply `transforms` one after the other; the state is the tuple of their states."""
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise InvalidArgumentError(
                f"chain() takes gradient transformations, but argument {i} is not one. Build "
                "each with a gradkit.transforms function such as clip_by_global_norm(1.0). "
                + received(transform=t))

    def init(grads: Grads) -> tuple:
        return tuple(t.init(grads) for t in transforms)

    def update(grads: Grads, state: tuple) -> tuple[Grads, tuple]:
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s)
            new_state.append(s)
        return grads, tuple(new_state)

    kind = HostOnlyTransformation if host_only(*transforms) else GradientTransformation
    return kind(init, update)


def check_grads(grads: Any) -> Grads:
    """`grads` as a new dict after checking it is a gradient set of floating-point arrays."""
    if not isinstance(grads, Mapping):
        raise InvalidArgumentError(
            "A gradient set is a dict {variable path: NumPy array}, as gradkit.gradients "
            "returns, but this is not a dict. Pass the dict itself, not its values. "
            + received(grads=grads))
    ops = ops_for(grads)
    for key, g in grads.items():
        if g is None:
            continue
        if not ops.is_array(g):
            raise InvalidArgumentError(
                f"The gradient of {key!r} is not a floating-point NumPy array; gradient sets "
                "hold float arrays (or None). Convert it with np.asarray(value, np.float32). "
                + received(**{f"grads[{key!r}]": g}))
    return dict(grads)


def map_grads(fn: Callable[[str, Any], Any], grads: Grads) -> Grads:
    """``{key: fn(key, g)}`` with ``None`` passed through (`fn` keeps each dtype)."""
    return {k: None if g is None else fn(k, g) for k, g in grads.items()}


def number(value: Any, name: str, *, low: float = -math.inf, strict: bool = False,
           infinite: bool = False) -> float:
    """`value` as a float >= `low` (> `low` if `strict`), finite unless `infinite`; else
    an InvalidArgumentError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and not math.isnan(value) and (infinite or math.isfinite(value)) and (
            value > low if strict else value >= low):
        return float(value)
    bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low:g}"
    raise InvalidArgumentError(
        f"{name} must be a {'' if infinite else 'finite '}number{bound}, but it is not. "
        "Pass a plain number such as 1.0. " + received(**{name: value}))
