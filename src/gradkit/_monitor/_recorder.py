"""The in-step half of the monitor: hooks that write small arrays into state variables.

Every applied update is checked for NaN/Inf (one sum per gradient). On recorded updates
(``index % every == 0``) the per-variable sums and counts of `_ingraph` are computed, so that
other updates pay only the check: in a train function traced for recorded updates (`use`;
Keras 3 on TensorFlow and JAX), under a ``cond`` in the step (tf-keras, several steps per
call), or behind a Python ``if`` (torch's eager step). State (n = watched variables):

- a ring of ``slots`` recorded updates, update ``index`` in slot ``(index // every) % slots``,
  so that the host reads the state once every `slots` recorded updates (each read of a
  variable costs a framework call, about 0.1-0.5 ms on TensorFlow, as much as the
  statistics of the MLP's step): ``steps`` (slots,) int32 = the update in each slot + 1;
  ``rows`` (slots, n, len(ROW)) float32 and ``counts`` (slots, n, 3 + bins) int32: see
  `_ingraph`; ``updates`` (slots, n): Σ (Δw)² of the recorded update; ``clipped``
  (slots, n, 3) when the optimizer clips: the same after clipping (see
  `_ingraph.clipped_rows`). Where one call of the train function takes several steps
  (``steps_per_execution``) the ring holds at least the recorded updates of one call
  (`per_call`). Where an update can be skipped (a LossScaleOptimizer) it holds no more: the
  host reads it after every call, to stay in step with the optimizer's counter;
- ``nonfinite`` int32 [batch counter + 1, update + 1] of the first update with a NaN or
  Inf (0 = none yet); ``alarm`` (n, 2): that update's NaN and Inf counts;
- with a Keras 3 LossScaleOptimizer, whose inner optimizer counts only the updates it
  applies: ``counter`` () int32, the batches given to it since `fit` began (it adds 1 in its
  own apply: `_step_hook.count_batches`), which is then the batch counter, and ``batches``
  (slots,) int32 = the batch counter of each recorded update + 1, beside ``steps``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from gradkit._backends import _step_hook as step_hook
from gradkit._backends import _step_state as step_state
from gradkit._errors import UnsupportedModelError, received
from gradkit._monitor import _ingraph as ingraph
from gradkit._monitor._ops import namespace
from gradkit._monitor._eager import EagerStats


class Recorder:
    """Hooks and state for `chosen` variables on `model.optimizer`; `remove()` undoes all."""

    def __init__(self, model: Any, chosen: list, every: int, bins: int,
                 updates: bool = True) -> None:
        self.model, self.chosen, self.every, self.bins = model, chosen, every, max(bins, 1)
        opt = model.optimizer
        self.kind = step_hook.kind(step_hook.target(opt))
        if self.kind != "keras3":
            _check_eager()
        xla = bool(getattr(model, "jit_compile", None) or getattr(model, "_jit_compile", None))
        self.xp = namespace(self.kind, xla)  # a step compiled by XLA: XLA's ops only
        self.eager = EagerStats(self.xp, self.bins) if self.xp.backend == "torch" else None
        self.clips = any(getattr(step_hook.target(opt), name, None) for name in
                         ("clipnorm", "global_clipnorm", "clipvalue", "_clipnorm",
                          "_global_clipnorm", "_clipvalue"))
        n = len(chosen)
        #: steps one call of the train function takes, and the most recorded updates in it
        self.steps_per_call = step_state.steps_per_call(model)
        accumulation = getattr(step_hook.target(opt), "gradient_accumulation_steps", None) or 1
        self.per_call = -(-self.steps_per_call // (accumulation * every))
        self.slots = _ring_size(model, n, self.bins, self.clips, self.per_call)
        add = lambda shape, name, dtype="float32": step_state.add_state(  # noqa: E731
            model, opt, shape, f"gradkit_monitor_{name}", dtype)
        self.steps = add((self.slots,), "steps", "int32")
        self.rows = add((self.slots, n, len(ingraph.ROW)), "rows")
        self.counts = add((self.slots, n, 3 + self.bins), "counts", "int32")
        self.updates = add((self.slots, n), "updates")
        self.alarm = add((n, 2), "alarm", "int32")
        self.nonfinite = add((2,), "nonfinite", "int32")
        self.clipped = add((self.slots, n, 3), "clipped") if self.clips else None
        self.state = [self.steps, self.rows, self.counts, self.updates, self.alarm,
                      self.nonfinite]
        self.state += [self.clipped] if self.clips else []
        #: Keras 3's LossScaleOptimizer: batches given to it (its inner one counts only the
        #: updates it applies), and the batch of each recorded update (+ 1), beside `steps`
        self.counter = self.batches = None
        self._uncount = None
        if self.kind == "keras3" and step_hook.target(opt) is not opt:
            self.counter = add((), "batch_counter", "int32")
            self.batches = add((self.slots,), "batches", "int32")
            self.state += [self.counter, self.batches]
            self._uncount = step_hook.count_batches(opt, self.counter)
        stages = [("before_clip", self._before)] + ([("after_clip", self._after)]
                                                    if self.clips else [])
        if updates:  # only for update_ratio: a snapshot of the weights on recorded updates
            stages += [("before_apply", self._before_apply), ("after_apply", self._after_apply)]
        if self.eager is not None and xla:  # torch's jit_compile=True: torch.compile
            stages = [(stage, _outside_torch_compile(fn)) for stage, fn in stages]
        self.hooks = [step_hook.install(opt, fn, stage=stage, first=True)  # before a wrap's
                      for stage, fn in stages]                            # transform acts
        self._local = threading.local()  # MirroredStrategy traces each replica in a thread
        self._saved = model.train_function  # restored as it was: no retrace afterwards
        self.recording: bool | None = None  # what the train function being traced is for
        self._functions = None
        if (every > 1 and self.kind == "keras3" and self.eager is None
                and self.steps_per_call == 1):
            self._functions = [step_state.fresh_train_function(model) for _ in range(2)]
        else:
            step_state.refresh(model)

    def use(self, recording: bool) -> None:
        """Run the next step with the train function traced for a recorded update, or the
        one traced for the others (no statistics, no conditional: just the NaN/Inf check).
        Each is traced on its first call, after this has set `recording` for it. With
        every=1 one function records every update. Without the pair a `cond` in the step
        decides: torch's eager step, several steps per call, and tf-keras, whose random ops
        keep a stream per traced function (two would draw other dropout masks than `fit`)."""
        if self._functions is not None and recording is not self.recording:
            self.recording = recording
            self.model.train_function = self._functions[recording]

    def _before(self, grads: list, variables: list, step: Any) -> None:
        xp = self.xp
        grads = ingraph.ordered(grads, variables, self.chosen, xp)
        sums, finite = ingraph.finite_sums(xp, grads)
        if self.eager and bool(finite):  # torch: Python branches, no state change if not due
            return self._before_eager(grads, sums, step)
        index = xp.cast(step.index, "int32")
        due = self._due(xp, step.is_update, index)
        if due is not False:
            self._put(xp, due, index, self._positions() + [self.rows, self.counts], lambda: (
                self._position(step, index) + self._rows(xp, grads, sums, finite)))
        alarm, nonfinite = xp.cond(  # a finite update (the usual case) leaves both as they are
            finite, lambda: (xp.value(self.alarm), xp.value(self.nonfinite)),
            lambda: self._after_nonfinite(xp, grads, step, index))
        self.alarm.assign(alarm)
        self.nonfinite.assign(nonfinite)

    def _after_nonfinite(self, xp: Any, grads: list, step: Any, index: Any) -> tuple:
        """(alarm, nonfinite) after an update whose gradients' sums are not finite: its NaN
        and Inf counts and position, if it holds any and is the first that does."""
        seen = xp.value(self.nonfinite)
        counts = ingraph.nonfinite_counts(xp, grads)
        bad = xp.logical_not(xp.equal(xp.sum(counts), 0))
        first = xp.logical_and(xp.logical_and(bad, xp.equal(seen[0], 0)), step.is_update)
        micro = self._batch(step)
        return (xp.where(first, counts, xp.value(self.alarm)),
                xp.stack([xp.where(first, micro + 1, seen[0]), xp.where(first, index + 1,
                                                                        seen[1])]))

    def _batch(self, step: Any) -> Any:
        """The batch counter of this update, int32: the LossScaleOptimizer's own count
        (`counter`, from 0 at `fit`'s start) where there is one, else the optimizer's."""
        if self.counter is None:
            return self.xp.cast(step.micro, "int32")
        return self.xp.value(self.counter) - 1

    def _positions(self) -> list:
        return [self.steps] + ([self.batches] if self.batches is not None else [])

    def _position(self, step: Any, index: Any) -> tuple:
        """What `_positions` hold for update `index`: its number + 1 (and its batch + 1)."""
        xp = self.xp
        index = xp.cast(index, "int32")
        if self.batches is None:
            return (index + 1,)
        return (index + 1, self._batch(step) + 1)

    def _rows(self, xp: Any, grads: list, sums: list, finite: Any) -> tuple:
        grads, sums = xp.barrier((grads, sums))
        return ingraph.variable_rows(xp, grads, [xp.value(v) for v in self.chosen], sums,
                                     finite, self.bins)

    def _before_eager(self, grads: list, sums: list, step: Any) -> None:
        """`_before` of a finite torch update: the same state, written only when due."""
        if not self._due_now(step):
            return
        index = int(step.index)
        self._put(self.xp, True, index, self._positions() + [self.rows, self.counts], lambda: (
            self._position(step, index) + tuple(self.eager.rows(
                [g.reshape(-1) for g in grads],
                [self.xp.value(v).reshape(-1) for v in self.chosen], sums))))

    def _due_now(self, step: Any) -> bool:
        return bool(step.is_update) and int(step.index) % self.every == 0

    def _after(self, grads: list, variables: list, step: Any) -> None:
        xp = self.xp
        grads = ingraph.ordered(grads, variables, self.chosen, xp)
        due = self._due(xp, step.is_update, xp.cast(step.index, "int32"))
        if due is not False:
            self._put(xp, due, step.index, [self.clipped], lambda: (ingraph.clipped_rows(
                xp, xp.barrier(grads)),))

    def _before_apply(self, grads: list, variables: list, step: Any) -> None:
        xp = self.xp
        if self.eager:
            index = int(step.index)
            due = self._due_now(step)
            old = self.eager.snapshot([xp.value(v) for v in self.chosen]) if due else None
        else:
            index = xp.cast(step.index, "int32")  # read before the apply counts the update
            due = self._due(xp, step.is_update, index)
            old = None if due is False else ingraph.snapshot(xp, due, self.chosen)
        self._local.kept = due, old, index

    def _after_apply(self, grads: list, variables: list, step: Any) -> None:
        xp = self.xp
        (due, old, index), self._local.kept = self._local.kept, None
        if self.eager:
            if due:
                self._put(xp, True, index, [self.updates], lambda: (
                    self.eager.update_squares(old, [xp.value(v) for v in self.chosen]),))
            return
        if old is None:  # traced for an update that is not recorded
            return
        self._put(xp, due, index, [self.updates], lambda: (ingraph.update_squares(
            xp, old, xp.barrier([xp.value(v) for v in self.chosen])),))

    def _put(self, xp: Any, due: Any, index: Any, rings: list, compute: Any) -> None:
        """Write `compute()` (one value per ring) into the slot of update `index`, if due."""
        def put() -> list:
            if isinstance(index, int):
                slot = self.slot(index)
            else:
                slot = xp.mod(xp.floordiv(xp.cast(index, "int32"), self.every), self.slots)
            return [xp.put(xp.value(ring), slot, value) for ring, value in zip(rings, compute())]

        new = self._when(xp, due, put, lambda: [xp.value(ring) for ring in rings])
        for ring, value in zip(rings, new):
            ring.assign(value)

    def _due(self, xp: Any, is_update: Any, index: Any) -> Any:
        """Whether this update is recorded: a Python bool where the trace is for one kind
        (`use`), else a tensor (then `_when` is a `cond`)."""
        if self.recording is not None:
            return self.recording and is_update
        if self.every == 1:
            return is_update
        return xp.logical_and(is_update, xp.equal(xp.mod(index, self.every), 0))

    @staticmethod
    def _when(xp: Any, due: Any, then: Any, otherwise: Any) -> Any:
        if isinstance(due, bool):
            return then() if due else otherwise()
        return xp.cond(due, then, otherwise)

    def read_nonfinite(self) -> np.ndarray:
        """[batch counter, update] of the first non-finite update (-1: none yet)."""
        return step_state.read_state(self.model, [self.nonfinite])[0] - 1

    def slot(self, index: int) -> int:
        return index // self.every % self.slots

    def read(self) -> tuple:
        """(nonfinite, steps, batches or None, rows, counts, updates, clipped or None): the
        whole ring, in one read; ``steps[slot]`` is the update in that slot (-1: none yet),
        ``batches[slot]`` its batch counter (with a Keras 3 LossScaleOptimizer)."""
        optional = [ring for ring in (self.batches, self.clipped) if ring is not None]
        values = step_state.read_state(self.model, [
            self.nonfinite, self.steps, self.rows, self.counts, self.updates] + optional)
        batches = values[5] - 1 if self.batches is not None else None
        clipped = values[-1] if self.clipped is not None else None
        return (values[0] - 1, values[1] - 1, batches, *values[2:5], clipped)

    def read_alarm(self) -> np.ndarray:
        return step_state.read_state(self.model, [self.alarm])[0]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        if self._uncount is not None:
            self._uncount()
        step_state.remove_state(self.model.optimizer, self.state)
        self.model.train_function = self._saved


def _check_eager() -> None:
    """tf-keras in graph mode trains through a v1 session: no step hooks, no state reads."""
    import tensorflow as tf

    if not tf.executing_eagerly():
        raise UnsupportedModelError(
            "GradientMonitor watches tf-keras models in eager mode (TF2's default), but eager "
            "execution is disabled (tf.compat.v1.disable_eager_execution() was called). "
            "Remove that call; in graph mode gradkit.gradients(model, x, y) is available, "
            "e.g. from a callback every N batches. " + received(executing_eagerly=False))


def _outside_torch_compile(fn: Any) -> Any:
    """`fn` run eagerly in a step compiled by torch.compile (``jit_compile=True`` on torch):
    its host reads would each break the compiled graph, with a warning."""
    import torch

    return torch.compiler.disable(fn)


def _ring_size(model: Any, n: int, bins: int, clips: bool, per_call: int = 1,
               budget: int = 1 << 20) -> int:
    """Slots of the ring: up to 32 recorded updates in about a megabyte of state, and at
    least the `per_call` recorded updates of one call; no more than those where an update
    can be skipped (the host must then see each call's recorded updates to stay in step
    with the optimizer's counter)."""
    if "LossScaleOptimizer" in type(model.optimizer).__name__:
        return per_call
    per_slot = 4 * (1 + n * (len(ingraph.ROW) + 3 + bins + 1 + (3 if clips else 0)))
    return max(per_call, min(32, budget // per_slot))
