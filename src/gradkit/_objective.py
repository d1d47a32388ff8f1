"""What is differentiated: the compiled loss, an explicit loss, or a target score.

- ``compiled`` (``loss=None, target=None``): exactly what ``fit`` differentiates: the compiled
  loss (per output, with loss weights), sample weights, and every loss in ``model.losses``
  (kernel/bias/activity regularizers, ``add_loss``). Reduction as compiled: by default the
  mean over the batch ("sum_over_batch_size").
- ``loss`` (a Keras loss name, a ``keras.losses.Loss`` or a callable ``(y_true, y_pred)``):
  replaces the compiled loss; a per-example result is reduced as Keras does (weighted sum over
  the number of elements); ``model.losses`` are still added, as ``fit`` would add them had the
  model been compiled with that loss. A single loss on a multi-output model applies to each
  output and the results are summed, as in ``compile``.
- ``target`` (an int class index, or a callable ``outputs -> per-example scores``): the SUM over
  the batch of the score (``outputs[:, k]``), optionally weighted by ``sample_weight``; no
  ``y``, no regularizers. Summing keeps each example's own gradient unscaled.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

from gradkit._errors import CustomTrainStepWarning, InvalidArgumentError, received


@dataclass(frozen=True, eq=False)
class Objective:
    """The resolved choice of what to differentiate (see the module docstring)."""

    kind: str  # "compiled" | "loss" | "target"
    spec: Any = None  # the loss name/object/callable, or the target index/callable
    compiled_with: Any = None  # "compiled": the model's compiled-loss object at resolve time

    def cache_key(self) -> tuple:
        """A hashable key that identifies this objective for compiled-function caches.

        Objects are keyed by identity and held by the key, so a cached trace is never reused
        for another callable that happens to get a freed one's id, nor after `compile()`
        replaced the loss a trace baked in.
        """
        simple = isinstance(self.spec, (str, int)) or self.spec is None
        return (self.kind, self.spec if simple else _Same(self.spec), _Same(self.compiled_with))


class _Same:
    """Hashes and compares by identity; keeps the object alive while a cache key exists."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def compiled_loss_object(model: Any) -> Any:
    """What `compile()` replaces when it changes the loss: Keras 3's CompileLoss, tf-keras'
    LossesContainer (None if uncompiled)."""
    found = getattr(model, "_compile_loss", None)
    return found if found is not None else getattr(model, "compiled_loss", None)


def resolve_objective(model: Any, loss: Any, target: Any, y: Any, scores: bool = True
                      ) -> Objective:
    """Check the loss/target/y combination and return the Objective it names. `scores`:
    whether the caller takes ``target=`` (its messages suggest it only then)."""
    if loss is not None and target is not None:
        raise InvalidArgumentError(
            "loss= and target= are alternatives: loss= differentiates a loss of (y, y_pred), "
            "target= differentiates a score of the outputs. Pass only one. "
            + received(loss=loss, target=target)
        )
    if target is not None:
        return _target_objective(target, y)
    if loss is not None:
        if not (isinstance(loss, str) or callable(loss)):
            raise InvalidArgumentError(
                "loss= must be a Keras loss name ('mse', 'categorical_crossentropy'), a "
                "keras.losses.Loss instance or a callable (y_true, y_pred) -> loss. "
                + received(loss=loss)
            )
        _require_y(y, "loss=" + (loss if isinstance(loss, str) else type(loss).__name__),
                   scores)
        return Objective("loss", loss)
    if not _is_compiled(model):
        raise InvalidArgumentError(
            f"Model {model.name!r} is not compiled, so there is no loss to differentiate. "
            "Compile it (model.compile(loss=...)), or pass loss='mse' (any Keras loss)"
            + (", or target=k to differentiate the output score of class k. "
               + received(loss=None, target=None) if scores else ". " + received(loss=None))
        )
    if has_compiled_loss(model):
        _require_y(y, "the compiled loss", scores)
    warn_custom_train_step(model)
    return Objective("compiled", compiled_with=compiled_loss_object(model))


def custom_train_step(model: Any) -> str | None:
    """The name of the user class that overrides ``train_step``, or None (Keras' own)."""
    for cls in type(model).__mro__:
        if "train_step" in vars(cls):
            own = cls.__module__.startswith(("keras.", "tf_keras.", "keras_core."))
            return None if own else cls.__qualname__
    return None


def warn_custom_train_step(model: Any) -> None:
    """Warn once per model that overrides train_step: its objective is compute_loss's."""
    name = custom_train_step(model)
    if name is None or model in _WARNED:
        return
    _WARNED.add(model)
    warnings.warn(
        f"{name} overrides train_step, which gradkit does not run: it differentiates "
        "compute_loss (the compiled loss plus model.losses), what Keras' own train_step "
        "differentiates. If your train_step minimizes something else, pass it as loss= "
        "(a callable (y_true, y_pred)) or target=, or override compute_loss instead. "
        "This warning is shown once per model.",
        CustomTrainStepWarning,
        stacklevel=4,
    )


_WARNED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _target_objective(target: Any, y: Any) -> Objective:
    if isinstance(target, bool) or not (isinstance(target, int) or callable(target)):
        raise InvalidArgumentError(
            "target= must be an int class index k (the score outputs[:, k]) or a callable "
            "outputs -> per-example scores. " + received(target=target)
        )
    if y is not None:
        raise InvalidArgumentError(
            "y is not used with target=: the target score depends on the outputs alone. "
            "Drop y, or pass loss= instead of target= to differentiate a loss of (y, y_pred). "
            + received(y=y, target=target)
        )
    return Objective("target", target)


def _require_y(y: Any, what: str, scores: bool) -> None:
    if y is None:
        raise InvalidArgumentError(
            f"{what} compares predictions with targets, so y is required. Pass y (the labels)"
            + (", or use target=k to differentiate an output score without labels. "
               if scores else ". ") + received(y=None)
        )


def _is_compiled(model: Any) -> bool:
    if getattr(model, "compiled", False):  # Keras 3
        return True
    return bool(getattr(model, "_is_compiled", False))  # tf-keras


def has_compiled_loss(model: Any) -> bool:
    """Was a loss on the outputs compiled? (tf-keras stores "no loss" as an empty dict.)"""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        return any(v is not None for v in loss.values())
    if isinstance(loss, (list, tuple)):
        return any(v is not None for v in loss)
    return loss is not None


def data_loss(loss: Any, y: Any, y_pred: Any, sample_weight: Any) -> Any:
    """A resolved Loss applied per output and summed (one loss for all outputs, as compile)."""
    if isinstance(y_pred, dict):
        return sum(loss(y[k], y_pred[k], sample_weight=sample_weight) for k in y_pred)
    if isinstance(y_pred, (list, tuple)):
        ys = list(y.values()) if isinstance(y, dict) else (
            list(y) if isinstance(y, (list, tuple)) else [y])
        if len(ys) != len(y_pred):
            raise InvalidArgumentError(
                f"The model has {len(y_pred)} outputs but y holds {len(ys)} array(s). Pass "
                "one target array per output (a list in output order or a dict by name). "
                + received(y_count=len(ys))
            )
        return sum(loss(t, p, sample_weight=sample_weight) for t, p in zip(ys, y_pred))
    return loss(y, y_pred, sample_weight=sample_weight)


def target_scores(target: Any, y_pred: Any) -> Any:
    """Per-example scores: column `target` of the output, or `target(outputs)`."""
    if not isinstance(target, int):
        return target(y_pred)
    if isinstance(y_pred, (list, tuple, dict)):
        if isinstance(y_pred, dict):
            keys = list(y_pred)
            example, names = f"outputs[{keys[0]!r}][:, {target}]", f" (keys {keys})"
        else:
            example, names = f"outputs[0][:, {target}]", f" ({len(y_pred)}, a list)"
        raise InvalidArgumentError(
            f"target={target} picks column {target} of the output, but this model has "
            f"several outputs{names}, so it is ambiguous. Pick one output with a callable "
            f"that returns per-example scores, e.g. target=lambda outputs: {example}. "
            + received(target=target)
        )
    shape = tuple(y_pred.shape)
    if len(shape) < 2 or shape[1] is None or not -shape[1] <= target < shape[1]:
        raise InvalidArgumentError(
            f"target={target} is not a valid index into the output of shape {shape}: "
            "target=k needs outputs of shape (batch, classes) with more than k classes. "
            + received(target=target)
        )
    return y_pred[:, target]


MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "auto")


def check_mean_reduction(model: Any, objective: Objective, needed_by: str) -> None:
    """Raise unless every loss of `objective` averages over the batch.

    Weighting batch b's loss by its example count n_b (accumulation, or a batch split over
    replicas) gives the dataset loss only for losses that average over the batch.
    """
    if objective.kind == "target":
        return
    from gradkit._data import leaves

    specs = leaves(model.loss if objective.kind == "compiled" else objective.spec)
    for spec in specs:
        reduction = getattr(spec, "reduction", None)
        if reduction is None or str(reduction).lower() in MEAN_REDUCTIONS:
            continue
        raise InvalidArgumentError(
            f"The loss {getattr(spec, 'name', spec)!r} uses reduction={reduction!r}, but "
            f"{needed_by} weights each batch's loss by its example count, which gives the "
            "dataset loss only for a loss that averages over the batch. Use "
            "reduction='sum_over_batch_size' (the Keras default). " + received(reduction=reduction)
        )
