"""Errors and warnings raised by gradkit.

Every error says what happened, what was expected and how to fix it, and ends in
``Received: name=value``. Each subclass also subclasses the builtin a caller would catch
without knowing gradkit::

    GradkitError (Exception)
    ├── UnsupportedModelError (TypeError)     not a Keras model, or a flavour gradkit lacks
    ├── InvalidArgumentError (ValueError)     a bad option value or combination
    │   ├── DataShapeError                    data that does not fit the model's inputs
    │   └── UnknownLayerError (KeyError)      layers= names nothing in the model
    ├── UnconnectedGradientError (ValueError) a selected variable does not affect the loss
    ├── NonFiniteGradientError (FloatingPointError)  a batch's gradient holds NaN/Inf
    ├── ResultTooLargeError (MemoryError)     a result would not fit in the available memory
    ├── NotConvergedError (ArithmeticError)   an iterative method ran out of its budget
    ├── ProcessGroupError (RuntimeError)      another process of a collective call failed
    └── GradkitFileError (OSError)            a gradient or model file is missing or corrupt

    NonFiniteGradientWarning (RuntimeWarning) NaN/Inf in a gradient, naming the variables
    CustomTrainStepWarning (UserWarning)      a custom train_step: compute_loss is differentiated
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator


class GradkitError(Exception):
    """Base class of every error gradkit raises on purpose."""


class UnsupportedModelError(GradkitError, TypeError):
    """The object is not a model gradkit can differentiate."""


class InvalidArgumentError(GradkitError, ValueError):
    """An option has a bad value, or two options contradict each other."""


class DataShapeError(InvalidArgumentError):
    """The data does not fit the model's inputs, or x, y and sample_weight disagree."""


class UnknownLayerError(InvalidArgumentError, KeyError):
    """A `layers=` entry matches no layer of the model."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written.
        return str(self.args[0]) if self.args else ""


class UnconnectedGradientError(GradkitError, ValueError):
    """A selected variable has no path to the loss (its gradient is undefined, not zero)."""


class NonFiniteGradientError(GradkitError, FloatingPointError):
    """A gradient holds NaN or Inf where the caller asked for an error (on_nonfinite="raise")."""


class ResultTooLargeError(GradkitError, MemoryError):
    """A result (per-example gradients: B x parameters) would not fit in available memory."""


class NotConvergedError(GradkitError, ArithmeticError):
    """An iterative method (the Lanczos eigensolver) did not converge within its budget."""


class ProcessGroupError(GradkitError, RuntimeError):
    """Another process of a torch.distributed group failed in the same collective call."""


class GradkitFileError(GradkitError, OSError):
    """A file could not be read or written, or is not what it claims to be."""


class NonFiniteGradientWarning(RuntimeWarning):
    """A gradient holds NaN or Inf; the message names the variables."""


class GradientNormWarning(RuntimeWarning):
    """A layer's gradient norm crossed a `GradientMonitor` threshold (exploding, a sudden
    rise, or vanishing)."""


class CustomTrainStepWarning(UserWarning):
    """The model overrides ``train_step``: gradkit differentiates ``compute_loss`` instead."""


def received(**values: object) -> str:
    """Format the closing ``Received: name=value`` part of an error message."""
    return "Received: " + ", ".join(f"{name}={_short_repr(v)}" for name, v in values.items())


def _short_repr(value: object, limit: int = 120) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes)):
        dtype = getattr(value, "dtype", "?")
        return f"<{type(value).__name__} shape={tuple(shape)} dtype={dtype}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def original_errors() -> Iterator[None]:
    """Re-raise a gradkit error that a framework wrapped on its way out.

    A gradkit check that fails while `tf.function` traces (e.g. ``target=5`` on a model with
    two classes) comes out as autograph's ``StagingError``, with the gradkit error as its
    context; the caller should see the gradkit error itself.
    """
    try:
        yield
    except GradkitError:
        raise
    except Exception as exc:
        inner, seen = exc.__context__ or exc.__cause__, set()
        while inner is not None and id(inner) not in seen:
            if isinstance(inner, GradkitError):
                raise inner from None
            seen.add(id(inner))
            inner = inner.__context__ or inner.__cause__
        raise


def check_count(name: str, value: object, least: int) -> None:
    """Raise unless `value` is an int (not a bool) of at least `least`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise InvalidArgumentError(
            f"{name}= must be an int of at least {least}. " + received(**{name: value}))
