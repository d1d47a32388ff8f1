"""The in-step half of the monitor: hooks that write statistics into state variables.

On every applied update the hook checks the gradients for NaN/Inf (one pass); on recorded
updates (``index % every == 0``) and on the first non-finite one it computes the full rows
(`_ingraph.full_row`) under a ``cond``, so that other steps pay only the check. State:

- ``rows`` (n, len(COLUMNS) + bins) and, when the optimizer clips, ``clipped`` (n, 2);
- ``meta`` int32 [last recorded update + 1, first non-finite batch counter + 1,
  its update + 1] (0 = none yet);
- ``alarm`` (n, len(COLUMNS) + bins): the rows of that first non-finite update.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._backends import _step_hook as step_hook
from gradkit._monitor._ingraph import COLUMNS, clipped_row, full_row, namespace, ordered


class Recorder:
    """Hooks and state for `chosen` variables on `model.optimizer`; `remove()` undoes all."""

    def __init__(self, model: Any, chosen: list, every: int, bins: int) -> None:
        self.model, self.chosen, self.every, self.bins = model, chosen, every, bins
        opt = model.optimizer
        self.kind = step_hook.kind(step_hook.target(opt))
        self.clips = any(getattr(step_hook.target(opt), name, None) for name in
                         ("clipnorm", "global_clipnorm", "clipvalue", "_clipnorm",
                          "_global_clipnorm", "_clipvalue"))
        width, n = len(COLUMNS) + bins, len(chosen)
        add = lambda shape, name, dtype="float32": step_hook.add_state(  # noqa: E731
            model, opt, shape, f"gradkit_monitor_{name}", dtype)
        self.rows, self.alarm = add((n, width), "rows"), add((n, width), "alarm")
        self.meta = add((3,), "meta", "int32")
        self.clipped = add((n, 2), "clipped") if self.clips else None
        self.hooks = [step_hook.install(opt, self._before, stage="before_clip")]
        if self.clips:
            self.hooks.append(step_hook.install(opt, self._after, stage="after_clip"))
        step_hook.refresh(model)

    def _before(self, grads: list, variables: list, step: Any) -> None:
        xp = namespace(self.kind)
        grads = ordered(grads, variables, self.chosen)
        present = [g for g in grads if g is not None]
        finite = xp.all(xp.stack([xp.all(xp.isfinite(g)) for g in present]))
        meta = xp.value(self.meta)
        index = xp.cast(step.index, "int32")
        first = xp.logical_and(xp.logical_not(finite), xp.equal(meta[1], 0))
        first = xp.logical_and(first, step.is_update)
        record = xp.logical_or(self._due(xp, step, index), first)
        rows = xp.cond(record, lambda: self._rows(xp, grads),
                       lambda: xp.value(self.rows))
        self.rows.assign(rows)
        micro = xp.cast(step.micro, "int32")
        self.alarm.assign(xp.where(first, rows, xp.value(self.alarm)))
        self.meta.assign(xp.stack([xp.where(record, index + 1, meta[0]),
                                   xp.where(first, micro + 1, meta[1]),
                                   xp.where(first, index + 1, meta[2])]))
        return None

    def _after(self, grads: list, variables: list, step: Any) -> None:
        xp = namespace(self.kind)
        grads = ordered(grads, variables, self.chosen)
        index = xp.cast(step.index, "int32")
        rows = xp.cond(self._due(xp, step, index), lambda: xp.stack(
            [clipped_row(xp, g) if g is not None else xp.zeros((2,)) for g in grads]),
            lambda: xp.value(self.clipped))
        self.clipped.assign(rows)
        return None

    def _due(self, xp: Any, step: Any, index: Any) -> Any:
        return xp.logical_and(step.is_update, xp.equal(xp.mod(index, self.every), 0))

    def _rows(self, xp: Any, grads: list) -> Any:
        width = len(COLUMNS) + self.bins
        return xp.stack([full_row(xp, g, self.bins) if g is not None else xp.zeros((width,))
                         for g in grads])

    def read_meta(self) -> np.ndarray:
        return step_hook.read_state(self.model, [self.meta])[0] - 1

    def read_rows(self) -> tuple[np.ndarray, np.ndarray | None]:
        states = [self.rows] + ([self.clipped] if self.clips else [])
        values = step_hook.read_state(self.model, states)
        return values[0], (values[1] if self.clips else None)

    def read_alarm(self) -> np.ndarray:
        return step_hook.read_state(self.model, [self.alarm])[0]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        states = [s for s in (self.rows, self.alarm, self.meta, self.clipped) if s is not None]
        step_hook.remove_state(self.model.optimizer, states)
        step_hook.refresh(self.model)
