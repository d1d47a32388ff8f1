"""`accumulate()`: the exact gradient over a whole dataset, streamed one batch at a time.

For a loss that is a mean over the batch (Keras' default "sum_over_batch_size"), the loss over
all N examples is ``L = Σ_b (n_b / N) L_b`` (regularizers included, since Σ n_b / N = 1), so

    ∇L = (1 / N) Σ_b n_b ∇L_b.

The adapter keeps the running sum ``Σ_b n_b ∇L_b`` on the device inside its compiled
function, and it is copied to the host once, at the end. Non-finite batches are found from a
per-variable flag each batch returns. Where the backend runs asynchronously (JAX, or an
accelerator) the flags are read in groups (the adapter's ``flag_lag``), so the host waits for
the device once per group and at most ``2 * flag_lag`` batches are in flight.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import numpy as np

from gradkit._data import Batch, leaves
from gradkit._detect import flavour_of
from gradkit._distributed import accumulate_distributed, process_group
from gradkit._errors import (
    InvalidArgumentError,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    received,
)
from gradkit._objective import check_mean_reduction
from gradkit._progress import Progress, check_progress
from gradkit._request import Request, check_connected, finish, floatx, prepare
from gradkit._sources import BatchStream

ON_NONFINITE = ("raise", "skip", "warn")

def accumulate(
    model: Any,
    data: Any,
    *,
    loss: Any = None,
    target: Any = None,
    layers: Any = None,
    training: bool = False,
    seed: int | None = None,
    progress: bool = True,
    strategy: Any = None,
    on_nonfinite: str = "raise",
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """The gradient over every example of `data`, as ``{variable path: np.ndarray}``.

    Scale: with a loss (the compiled one, or ``loss=``) the result is the gradient of the
    MEAN loss over all N examples, exactly what ``gradients()`` would return on the whole
    dataset as one batch: batch b's gradient is weighted by n_b / N, whatever the batch sizes,
    sample weights count as Keras counts them (weighted sum over the example count), and
    ``model.losses`` (regularizers) are included once. The loss must be mean-reduced
    ("sum_over_batch_size", the default; other reductions raise), and its per-example size
    the same in every batch (padded sequences of varying length are weighted by example
    count, not by element count). With ``target=`` it is the SUM over every example of the
    target score. Loss scaling is undone; float32 (float64 for float64 variables); keys and
    order as ``gradients()``.

    `data`: a batched ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a torch
    ``DataLoader``, any iterable or generator of ``(x, y)`` / ``(x, y, sample_weight)``
    batches (``x`` alone for ``target=``), or a tuple of arrays ``(x, y[, sample_weight])``
    cut into batches of ``batch_size`` (default 32). The first batch is checked against the
    model before any work. Memory does not grow with the number of batches (at most a few
    batches are in flight).

    ``on_nonfinite``: a batch whose gradient holds NaN/Inf raises NonFiniteGradientError
    naming its index and variables (``"raise"``), is left out of the mean and reported once
    at the end (``"skip"``), or is kept with a NonFiniteGradientWarning (``"warn"``).
    ``progress=True`` shows a bar (batches, examples/s) when stderr is a terminal.
    ``strategy=``: a ``tf.distribute`` strategy the model was built under (TensorFlow,
    tf-keras), or ``"data_parallel"`` / ``keras.distribution.DataParallel`` / a
    ``jax.sharding.Mesh`` (JAX), or ``"torch.distributed"`` / a torch.distributed process
    group (torch): the result equals the single-device one. Under torch.distributed the call
    is COLLECTIVE: every process must call it, with the same model and options, passing its
    OWN share of the data; every process gets the gradient over the union (mean over all N
    examples of all processes, however unequal the shares).
    ``training`` as in ``gradients()``; no model state changes, even when interrupted.
    ``seed`` as in ``gradients()``: each batch draws its own dropout masks from it (under
    ``strategy=`` the masks come from the model's own, unchanged, seed state instead).
    """
    _check_options(on_nonfinite, progress)
    request, sums, kept, faults = _summed(
        model, strategy, on_nonfinite, progress,
        lambda: prepare_dataset(model, data, loss=loss, target=target, layers=layers,
                                training=training, seed=seed, batch_size=batch_size))
    if kept == 0:
        raise faults.all_skipped()
    divisor = 1.0 if request.objective.kind == "target" else float(kept)
    grads = [None if s is None else np.asarray(s) / np.asarray(divisor, s.dtype) for s in sums]
    with warnings.catch_warnings():
        if faults.hits:  # already reported, batch by batch
            warnings.simplefilter("ignore", NonFiniteGradientWarning)
        result = finish(request, grads)
    faults.report()
    return result


def prepare_dataset(model: Any, data: Any, *, loss: Any = None, target: Any = None,
                    layers: Any = None, training: bool = False, seed: Any = None,
                    batch_size: int | None = None, scores: bool = True
                    ) -> tuple[Request, BatchStream]:
    """(Request without a batch, the checked BatchStream) of a dataset-wide call (`scores`:
    whether the caller takes ``target=``)."""
    flavour = flavour_of(model)
    stream = BatchStream(model, data, batch_size, flavour, floatx(flavour))
    request = prepare(model, y=stream.first[1].y, loss=loss, target=target, layers=layers,
                      training=training, seed=seed, data=False, scores=scores)
    return request, stream


def _summed(model, strategy, on_nonfinite, progress, prepared):
    """(request, Σ_b w_b ∇L_b per variable, examples kept, faults), on one device, under a
    TF/JAX strategy, or over a torch.distributed group (local sums, one all-reduce)."""
    def checked():
        request, stream = prepared()
        check_mean_reduction(model, request.objective, "accumulate()")
        return request, stream

    group = process_group(model, strategy, "accumulate()")
    if group is not None:
        request, stream = group.agree(checked, lambda r: group.signature(r[0].variables))
        sums, kept, faults = group.total(
            lambda: _kept_sum(request, stream, on_nonfinite, progress), request.variables)
        return request, sums, kept, faults
    request, stream = checked()
    if strategy is not None:
        sums, count, faults = _distributed(request, stream, strategy, on_nonfinite)
    else:
        sums, count, faults = _sum_batches(request, stream, on_nonfinite, progress)
    return request, sums, count - faults.skipped_examples, faults


def _check_options(on_nonfinite: Any, progress: Any) -> None:
    if on_nonfinite not in ON_NONFINITE:
        raise InvalidArgumentError(
            f"on_nonfinite= must be one of {ON_NONFINITE}. " + received(on_nonfinite=on_nonfinite)
        )
    check_progress(progress)


def _sum_batches(request: Request, stream, on_nonfinite, progress):
    """(Σ_b w_b ∇L_b per variable, examples seen, faults): the single-device loop."""
    acc = request.adapter.accumulator(request, on_nonfinite == "skip")
    faults = _Faults(on_nonfinite, request.keys)
    weighted = request.objective.kind != "target"
    pending: deque = deque()  # (index, batch, finite flags) not checked yet
    lag = acc.flag_lag
    bar = Progress(stream.total, progress, description="gradkit.accumulate")
    with acc.running(), bar:
        for index, batch in stream:
            pending.append((index, batch, acc.add(batch, float(batch.size) if weighted else 1.0)))
            if bar.batches == 0:  # raise now, not after the whole pass
                check_connected(request.keys, acc.connected, layers=request.layers)
            if len(pending) > 2 * lag:
                _check_oldest(acc, faults, pending, max(lag, 1))
            bar.update(batch.size)
        _check_oldest(acc, faults, pending, len(pending))
    return acc.total(), bar.examples, faults


def _kept_sum(request: Request, stream, on_nonfinite, progress):
    """(sums, examples kept, faults) of this process's share (torch.distributed)."""
    sums, count, faults = _sum_batches(request, stream, on_nonfinite, progress)
    return sums, count - faults.skipped_examples, faults


def _check_oldest(acc, faults, pending: deque, count: int) -> None:
    """Read the flags of the `count` oldest pending batches at once and report faults."""
    entries = [pending.popleft() for _ in range(count)]
    for (index, batch, _), finite in zip(entries, acc.finite([e[2] for e in entries])):
        faults.check(index, batch, finite)


def _distributed(request: Request, stream, strategy, on_nonfinite):
    if on_nonfinite != "raise":
        raise InvalidArgumentError(
            "on_nonfinite='skip' and 'warn' act on single batches, which strategy= sums "
            "on the replicas without looking at them. Use on_nonfinite='raise' (the sum is "
            "checked at the end) or strategy=None. " + received(on_nonfinite=on_nonfinite)
        )
    batches = (batch for _, batch in stream)
    sums, count = accumulate_distributed(request, batches, strategy)
    faults = _Faults("raise", request.keys)
    finite = np.array([s is None or bool(np.all(np.isfinite(s))) for s in sums])
    faults.check(None, None, finite)
    return sums, count, faults


class _Faults:
    """Non-finite batches: raise at once, or collect them (skip / warn)."""

    def __init__(self, mode: str, keys: list[str]) -> None:
        self.mode, self.keys = mode, keys
        self.hits: list[tuple[int, int, list[str]]] = []

    def check(self, index: int | None, batch: Batch | None, finite: np.ndarray) -> None:
        if bool(np.all(finite)):
            return
        names = [k for k, ok in zip(self.keys, finite) if not ok]
        where = "The summed gradient" if index is None else f"Batch {index} of the data"
        text = (f"{where} holds NaN or Inf in {len(names)} variable(s): "
                f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}."
                f"{_data_cause(batch)}")
        if self.mode == "raise":
            raise NonFiniteGradientError(
                f"{text} Check the data and the loss (log(0), division by zero), or pass "
                "on_nonfinite='skip' to leave such batches out of the mean, or 'warn' to "
                "keep them. " + received(batch_index=index, on_nonfinite=self.mode)
            )
        self.hits.append((index, batch.size, names))
        if self.mode == "warn":
            warnings.warn(f"{text} It is included in the result (on_nonfinite='warn').",
                          NonFiniteGradientWarning, stacklevel=4)

    @property
    def skipped_examples(self) -> int:
        return sum(size for _, size, _ in self.hits) if self.mode == "skip" else 0

    def report(self) -> None:
        """Once at the end: which batches "skip" left out."""
        if self.mode == "skip" and self.hits:
            indices = [index for index, _, _ in self.hits]
            names = sorted({n for _, _, hit in self.hits for n in hit})
            warnings.warn(
                f"{len(indices)} batch(es) with NaN/Inf gradients were left out of the mean "
                f"(on_nonfinite='skip'): batch indices {indices}, variables hit: "
                f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}.",
                NonFiniteGradientWarning, stacklevel=3,
            )

    def all_skipped(self) -> NonFiniteGradientError:
        return NonFiniteGradientError(
            "Every batch of the data gave a NaN/Inf gradient, so on_nonfinite='skip' left "
            "nothing to average. Check the data and the loss. "
            + received(skipped_batches=[index for index, _, _ in self.hits])
        )


def _data_cause(batch: Batch | None) -> str:
    if batch is None:
        return ""
    arrays = [a for a in leaves(batch.x) + leaves(batch.y) if isinstance(a, np.ndarray)]
    count = sum(int(np.sum(~np.isfinite(a))) for a in arrays if a.dtype.kind == "f")
    return f" The batch itself holds {count} NaN/Inf value(s)." if count else ""
