"""The in-step half of the monitor: hooks that write into state variables.

Every applied update is checked for NaN/Inf. On recorded updates (``index % every == 0``)
and on the first non-finite one the gradients are copied into ``grads`` (one float32
variable per watched variable) under a ``cond``, so other updates pay only the check. State:

- ``grads``, and when the optimizer clips ``clipped`` (n, 2): norm and max |g| after it;
- ``meta`` int32 [last recorded update + 1, first non-finite batch counter + 1,
  its update + 1] (0 = none yet); ``alarm`` (n, 2): that update's NaN and Inf counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._backends import _step_hook as step_hook
from gradkit._monitor._ingraph import (
    all_finite,
    clipped_rows,
    namespace,
    nonfinite_counts,
    ordered,
)


class Recorder:
    """Hooks and state for `chosen` variables on `model.optimizer`; `remove()` undoes all."""

    def __init__(self, model: Any, chosen: list, every: int) -> None:
        self.model, self.chosen, self.every = model, chosen, every
        opt = model.optimizer
        self.kind = step_hook.kind(step_hook.target(opt))
        self.clips = any(getattr(step_hook.target(opt), name, None) for name in
                         ("clipnorm", "global_clipnorm", "clipvalue", "_clipnorm",
                          "_global_clipnorm", "_clipvalue"))
        n = len(chosen)
        add = lambda shape, name, dtype="float32": step_hook.add_state(  # noqa: E731
            model, opt, shape, f"gradkit_monitor_{name}", dtype)
        self.grads = [add(tuple(v.shape), f"grad_{i}") for i, v in enumerate(chosen)]
        self.alarm, self.meta = add((n, 2), "alarm"), add((3,), "meta", "int32")
        self.clipped = add((n, 2), "clipped") if self.clips else None
        self.hooks = [step_hook.install(opt, self._before, stage="before_clip")]
        if self.clips:
            self.hooks.append(step_hook.install(opt, self._after, stage="after_clip"))
        step_hook.refresh(model)

    def _before(self, grads: list, variables: list, step: Any) -> None:
        xp = namespace(self.kind)
        grads = ordered(grads, variables, self.chosen, xp)
        meta = xp.value(self.meta)
        index = xp.cast(step.index, "int32")
        first = xp.logical_and(xp.logical_not(all_finite(xp, grads)), xp.equal(meta[1], 0))
        first = xp.logical_and(first, step.is_update)
        record = xp.logical_or(self._due(xp, step, index), first)
        kept = xp.cond(record, lambda: list(grads), lambda: [xp.value(b) for b in self.grads])
        for buffer, value in zip(self.grads, kept):
            buffer.assign(value)
        self.alarm.assign(xp.cond(first, lambda: nonfinite_counts(xp, grads),
                                  lambda: xp.value(self.alarm)))
        micro = xp.cast(step.micro, "int32")
        self.meta.assign(xp.stack([xp.where(record, index + 1, meta[0]),
                                   xp.where(first, micro + 1, meta[1]),
                                   xp.where(first, index + 1, meta[2])]))
        return None

    def _after(self, grads: list, variables: list, step: Any) -> None:
        xp = namespace(self.kind)
        grads = ordered(grads, variables, self.chosen, xp)
        due = self._due(xp, step, xp.cast(step.index, "int32"))
        self.clipped.assign(xp.cond(due, lambda: clipped_rows(xp, grads),
                                    lambda: xp.value(self.clipped)))
        return None

    def _due(self, xp: Any, step: Any, index: Any) -> Any:
        return xp.logical_and(step.is_update, xp.equal(xp.mod(index, self.every), 0))

    def read_meta(self) -> np.ndarray:
        return step_hook.read_state(self.model, [self.meta])[0] - 1

    def read_grads(self) -> tuple[list, np.ndarray | None]:
        states = self.grads + ([self.clipped] if self.clips else [])
        values = step_hook.read_state(self.model, states)
        return values[: len(self.grads)], (values[-1] if self.clips else None)

    def read_alarm(self) -> np.ndarray:
        return step_hook.read_state(self.model, [self.alarm])[0]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        states = [*self.grads, self.alarm, self.meta] + ([self.clipped] if self.clips else [])
        step_hook.remove_state(self.model.optimizer, states)
        step_hook.refresh(self.model)
