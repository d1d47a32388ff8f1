"""`GradientMonitor`: statistics of the gradients `fit` applies, recorded inside its train step.

The callback works for Keras 3 (every backend) and tf-keras models alike: it defines every
hook both Keras' callback lists call, so one class serves both.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gradkit._backends import _step_hook as step_hook
from gradkit._backends import _step_state as step_state
from gradkit._detect import flavour_of
from gradkit._errors import (
    CustomTrainStepWarning,
    InvalidArgumentError,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    received,
)
from gradkit._monitor._alarms import DEFAULT_THRESHOLDS, NormAlarms, layer_norms, nonfinite_alarm
from gradkit._monitor._history import (STATS, check_one_history, flat_record, history_of,
                                       variable_stats)
from gradkit._monitor._recorder import Recorder
from gradkit._monitor._writers import open_writers, writer_names
from gradkit._select import select_variables, unique_keys
from gradkit._stats import layer_of

_ACTIONS = ("warn", "stop", "raise")


def _default_noop(*args: Any, **kwargs: Any) -> None:
    return None


_default_noop._is_default = True  # type: ignore[attr-defined]


class GradientMonitor:
    """Record, every `every` updates, statistics of the gradients the optimizer applies in `fit`.

    The gradients are those of the step `fit` takes (its batch, dropout mask and weights),
    captured inside the compiled step without a second backward pass: at true scale (loss
    scaling undone), summed over the replicas of a TF strategy, the averaged gradient of the
    update step under ``gradient_accumulation_steps``, and, when the optimizer clips, also
    after clipping (``clipped_norm``, ``clipped_max_abs``). Statistics per variable, per layer
    and in total (`stats=`, see ``STATS``) end up in ``monitor.history`` (NumPy arrays by
    step), and with `log_dir` in files (`writers=`: "jsonl", "csv", "tensorboard": one name
    or a list).
    ``weight_norm`` is of the weights the gradient was taken at; ``update_ratio`` is
    ||Δw|| / ||w|| of that update (measured around the optimizer's apply).

    Every update is checked for NaN/Inf: the first one is reported with its variables and
    their counts, its update and batch: ``on_nonfinite="warn"`` (a `NonFiniteGradientWarning`
    when the in-step ring of recorded updates is next read, at the latest at the end of the
    epoch), ``"stop"`` (ends `fit` after that step, like TerminateOnNaN) or ``"raise"``
    (`NonFiniteGradientError` after that step); "stop" and "raise" read one flag per step.
    Records are read from the step in batches of up to 32 updates, when asked for at the
    latest. The optimizer is restored at the end of `fit`.
    Exploding, suddenly rising and vanishing layer norms (`thresholds=`, checked on recorded
    updates with "norm" in `stats`; see `gradkit._monitor._alarms`) are warned about once per
    layer with a `GradientNormWarning`. ``monitor.alarms`` lists every alarm as a dict.
    ``monitor.mode`` is "step" (the step's own gradients; on every flavour for `fit`).
    """

    mode = "step"
    # tf-keras turns every batch's logs into NumPy, waiting for the step, unless each callback
    # with batch hooks takes tensors; the monitor never reads logs, so fit keeps running ahead
    _supports_tf_logs = True
    async_safe = False

    def __init__(self, every: int = 100, *, layers: Any = None, log_dir: Any = None,
                 writers: tuple = ("jsonl", "tensorboard"), histogram_bins: int = 30,
                 on_nonfinite: str = "warn", stats: tuple = STATS,
                 thresholds: dict | None = DEFAULT_THRESHOLDS) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise InvalidArgumentError("every= must be a positive int (record every that many "
                                       "updates). " + received(every=every))
        if on_nonfinite not in _ACTIONS:
            raise InvalidArgumentError(f"on_nonfinite= must be one of {_ACTIONS}. "
                                       + received(on_nonfinite=on_nonfinite))
        stats = (stats,) if isinstance(stats, str) else stats  # one name, as writers=
        unknown = [s for s in stats if s not in STATS]
        if unknown or not isinstance(histogram_bins, int) or histogram_bins < 1:
            raise InvalidArgumentError(
                f"stats= takes names from {STATS} and histogram_bins= a positive int. "
                + received(stats=stats, histogram_bins=histogram_bins))
        self.every, self.layers, self.log_dir = every, layers, log_dir
        self.writer_names, self.bins = writer_names(writers), histogram_bins
        self.on_nonfinite, self.stats = on_nonfinite, tuple(stats)
        self._norm_alarms = NormAlarms(thresholds)
        self.model: Any = None
        self.params: dict = {}
        self._records: list[dict] = []
        self._raw: list[tuple] = []  # recorded updates not yet turned into records
        self._pending: list[tuple] = []  # recorded updates still in the in-step ring
        self.alarms: list[dict] = []
        self._recorder: Any = None
        self._current: Any = None
        # Keras 3 keeps async dispatch only for callbacks whose on_train_batch_end is default
        self.on_train_batch_end = _default_noop if on_nonfinite == "warn" else self._step_end

    @property
    def records(self) -> list[dict]:
        """One flat dict per recorded update (see `gradkit._monitor._history`), built from
        the step's sums and counts when first asked for."""
        self._flush()
        if self._raw:
            self._records.extend(self._flat(*raw) for raw in self._raw)
            self._raw.clear()
        return self._records

    @property
    def history(self) -> dict:
        """NumPy arrays by recorded update (see `gradkit._monitor._history`)."""
        return history_of(self.records)

    # Keras' callback protocol ---------------------------------------------------------
    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict) -> None:
        self.params = params

    def _implements_train_batch_hooks(self) -> bool:
        return True

    def _implements_test_batch_hooks(self) -> bool:
        return False

    def _implements_predict_batch_hooks(self) -> bool:
        return False

    def on_train_begin(self, logs: Any = None) -> None:
        model = self.model
        flavour_of(model)
        chosen = select_variables(model, self.layers)
        keys = unique_keys(chosen)  # checked before anything changes: the records stay readable
        held = self._records or self._raw or self._pending
        check_one_history(getattr(self, "keys", None) if held else None, keys, model.name)
        self.chosen, self.keys = chosen, keys
        self._sizes = np.array([int(np.prod(v.shape)) for v in self.chosen], np.float64)
        layers = [layer_of(key) for key in self.keys]
        self._layers = list(dict.fromkeys(layers))
        self._layer_index = np.array([self._layers.index(layer) for layer in layers])
        opt = step_hook.target(model.optimizer)
        self._acc = getattr(opt, "gradient_accumulation_steps", None) or 1
        self._counter = opt._iterations if step_hook.kind(opt) == "keras3" else opt.iterations
        self._writers = open_writers(self.log_dir, self.writer_names) if self.log_dir else []
        self._recorder = Recorder(model, self.chosen, self.every,
                                  self.bins if "histogram" in self.stats else 1,
                                  "update_ratio" in self.stats)
        self._micro = self._updates_before = int(
            step_state.read_state(model, [self._counter])[0])
        # batches run since fit began, and the batch counter the step reports at the first
        self._batches = 0
        self._origin = 0 if self._recorder.counter is not None else self._micro
        self._epoch, self._epoch_start, self._current = 0, self._micro, None
        self._reported = False

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch, self._epoch_start = epoch, self._origin + self._batches

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._settle()  # the previous call, whose state is complete now
        steps = self._steps_in_call(batch)
        recorded = [(micro // self._acc, batch + micro - self._micro)
                    for micro in range(self._micro, self._micro + steps) if self._due(micro)]
        self._recorder.use(bool(recorded))
        self._current = recorded, batch - self._origin - self._batches
        self._micro += steps
        self._batches += steps

    def _step_end(self, batch: int, logs: Any = None) -> None:
        self._settle()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self._recorder is not None:
            self._settle()
            if not self._flush():
                self._check_alarm(self._recorder.read_nonfinite())

    def on_train_end(self, logs: Any = None) -> None:
        self._close()

    def __getattr__(self, name: str) -> Any:  # every other on_* hook: nothing to do, and
        if name.startswith("on_"):  # marked as Keras' default, which keeps async dispatch
            return _default_noop
        raise AttributeError(name)

    # internals ---------------------------------------------------------------------------
    def _due(self, micro: int) -> bool:
        """Whether step `micro` (counting every batch) applies an update that is recorded."""
        update = (micro + 1) % self._acc == 0
        return update and (micro // self._acc) % self.every == 0

    def _steps_in_call(self, batch: int) -> int:
        """The steps the call starting at `batch` takes: ``steps_per_execution``, fewer at
        the end of an epoch of known length (Keras passes each call's first batch)."""
        steps, total = self._recorder.steps_per_call, self.params.get("steps")
        return steps if steps == 1 or not total else max(1, min(steps, total - batch))

    def _settle(self) -> None:
        """Take note of the last call, whose state is complete now: its recorded updates
        join those waiting in the in-step ring, which is read before the next call could
        overwrite one (or at the end of the epoch, or when `records` is asked for); "stop"
        and "raise" read the alarm flag.

        In "warn" mode this runs at the start of the next step, so that `fit` keeps its
        asynchronous dispatch of on_train_batch_end (Keras 3 syncs every step for a
        callback that implements it); "stop" and "raise" must act after the step itself.
        """
        if self._current is None:
            return
        (recorded, shift), self._current = self._current, None
        self._pending.extend((index, self._epoch, batch, shift) for index, batch in recorded)
        if len(self._pending) + self._recorder.per_call > self._recorder.slots:
            self._flush()
        elif self.on_nonfinite != "warn":
            self._check_alarm(self._recorder.read_nonfinite())

    def _flush(self) -> bool:
        """Read the ring and record the updates waiting in it; False if none were."""
        if not self._pending or self._recorder is None:
            return False
        nonfinite, steps, batches, *rings = self._recorder.read()
        pending, self._pending = self._pending, []
        for index, epoch, batch, shift in pending:
            slot = self._recorder.slot(index)
            if steps[slot] == index:
                if batches is not None:  # the batch the step counted (updates may be skipped)
                    batch = int(batches[slot]) + shift
                self._record(index, epoch, batch, [ring[slot] if ring is not None else None
                                                   for ring in rings])
            else:  # the update did not happen (a LossScaleOptimizer skipped it): resync
                self._micro = int(step_state.read_state(self.model, [self._counter])[0])
        self._check_alarm(nonfinite)
        return True

    def _warn_if_unwatched(self) -> None:
        """Batches ran but model.optimizer counted no update: nothing could be recorded."""
        if self._batches and self._updates_before == int(
                step_state.read_state(self.model, [self._counter])[0]):
            warnings.warn(
                f"GradientMonitor recorded nothing: model.optimizer applied no update in "
                f"{self._batches} batches. It watches model.optimizer's updates; a train_step "
                "that changes the weights another way (another optimizer, assignments) is not "
                "seen, nor are updates a LossScaleOptimizer skips. Compile the model with the "
                "optimizer its train_step uses, or call gradkit.gradients from a callback.",
                CustomTrainStepWarning)

    def _record(self, index: int, epoch: int, batch: int, state: list) -> None:
        """Keep the step's arrays; records are built when asked for or written."""
        meta = {"step": index, "epoch": epoch, "batch": batch}
        self._raw.append((meta, state))
        if self._writers:
            record = self.records[-1]
            for writer in self._writers:
                writer.write(record)
        if "norm" in self.stats and self._norm_alarms.active:
            self.alarms.extend(self._norm_alarms.check(layer_norms(
                state, self._sizes, self._layer_index, self._layers), meta))

    def _flat(self, meta: dict, state: list) -> dict:
        rows, counts, updates, clipped = state
        per_variable = variable_stats(rows, counts, updates, clipped, self._sizes.tolist(),
                                      "histogram" in self.stats)
        return flat_record(meta, self.keys, per_variable, self.stats)

    def _check_alarm(self, nonfinite: np.ndarray) -> None:
        """Report the first non-finite update (`nonfinite`: [batch counter, update]) once."""
        if nonfinite[0] < 0 or self._reported:
            return
        self._reported = True
        alarm, text = nonfinite_alarm(self.keys, self._recorder.read_alarm(),
                                      int(nonfinite[1]), int(nonfinite[0]) - self._epoch_start,
                                      self._epoch)
        self.alarms.append(alarm)
        if self.on_nonfinite == "warn":
            warnings.warn(text, NonFiniteGradientWarning, stacklevel=2)
        elif self.on_nonfinite == "stop":
            self.model.stop_training = True
            warnings.warn(text + " fit stops (on_nonfinite='stop').",
                          NonFiniteGradientWarning, stacklevel=2)
        else:
            self._close()
            raise NonFiniteGradientError(text + " " + received(on_nonfinite="raise"))

    def _close(self) -> None:
        if self._recorder is not None:
            self._flush()
            self._warn_if_unwatched()
            self._recorder.remove()
            self._recorder = None
        for writer in getattr(self, "_writers", []):
            writer.close()
        self._writers = []
