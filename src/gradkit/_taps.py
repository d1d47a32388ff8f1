"""Output taps: route selected layers' outputs through a function, only while installed.

An activation gradient is the gradient with respect to a zero-valued perturbation added to
a layer's output. Keras has no output hook that works on every backend, so `OutputTaps`
temporarily shadows each selected layer's ``call`` with a wrapper that passes the output
through ``tap(index, output)`` (which adds the perturbation and records the output). The
wrapper lives in the layer's instance ``__dict__`` only inside ``installed()``; leaving the
block, normally or by an exception, restores the layer exactly as it was. Framework-free: the
adapters supply the tap.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from gradkit._errors import InvalidArgumentError, received

_MISSING = object()


def shadow(layer: Any, name: str, value: Any, saved: list) -> None:
    """Set an instance attribute, remembering in `saved` what to put back (or that there
    was none: then `restore` deletes it, and the class attribute shows through again)."""
    saved.append((layer, name, vars(layer).get(name, _MISSING)))
    object.__setattr__(layer, name, value)


def restore(saved: list) -> None:
    """Undo the `shadow` calls recorded in `saved`, last first."""
    for layer, name, previous in reversed(saved):
        if previous is _MISSING:
            object.__delattr__(layer, name)
        else:
            object.__setattr__(layer, name, previous)


class OutputTaps:
    """Taps on the outputs of `layers` (reported under `keys`, in the same order)."""

    def __init__(self, layers: list[Any], keys: list[str]):
        self.layers = list(layers)
        self.keys = list(keys)
        self.start(lambda index, output: output)

    def start(self, tap: Callable[[int, Any], Any]) -> None:
        """Use `tap` for the next forward pass and forget the previous pass's record."""
        self.tap = tap
        self.calls = [0] * len(self.layers)
        self.problems: list[str] = []

    def check(self) -> None:
        """Raise, outside any model call, what the last forward pass found wrong."""
        if self.problems:
            raise InvalidArgumentError(self.problems[0])
        missing = [key for key, n in zip(self.keys, self.calls) if n == 0]
        if missing:
            raise InvalidArgumentError(
                f"The selected layer(s) {missing} did not run in the model's forward pass, so "
                "they have no output to differentiate (an InputLayer is never called: use "
                "gradkit.input_gradients for the inputs). Select layers the model calls. "
                + received(layers=missing)
            )

    @contextlib.contextmanager
    def installed(self) -> Iterator[OutputTaps]:
        """Shadow each layer's call with its tap for the duration of the block."""
        saved: list[tuple[Any, str, Any]] = []
        try:
            for index, layer in enumerate(self.layers):
                name = _call_attribute(layer)
                shadow(layer, name, self._wrap(index, getattr(layer, name)), saved)
            yield self
        finally:
            restore(saved)

    def _wrap(self, index: int, call: Callable) -> Callable:
        @functools.wraps(call)
        def tapped(*args: Any, **kwargs: Any) -> Any:
            output = call(*args, **kwargs)
            self.calls[index] += 1
            problem = _problem(self.keys[index], output, self.calls[index])
            if problem:  # raised by check() after the pass: Keras and autograph would wrap it
                self.problems.append(problem)
                return output
            return self.tap(index, output)

        return tapped


def _problem(key: str, output: Any, calls: int) -> str:
    if calls > 1:
        return (
            f"Layer {key!r} is called more than once in one forward pass (a shared layer), "
            "so it has no single output to differentiate. Select the layers that consume "
            "its outputs instead, or a layer called once. " + received(layers=key)
        )
    if not (hasattr(output, "shape") and hasattr(output, "dtype")):
        return (
            f"Layer {key!r} returns {type(output).__name__}, not a single tensor; activation "
            "gradients need a layer with one output tensor. Select the layer that consumes "
            "the part you need. " + received(layers=key)
        )
    if not _is_float(output.dtype):
        return (
            f"Layer {key!r} outputs {output.dtype} values, which have no gradient. Select a "
            "layer with a floating-point output (for token ids, the Embedding layer that "
            "reads them). " + received(layers=key)
        )
    return ""


def _call_attribute(layer: Any) -> str:
    """The method Keras calls in the forward pass: ``quantized_call`` for quantized layers."""
    if getattr(layer, "quantization_mode", None) is not None:
        return "quantized_call"
    return "call"


def _is_float(dtype: Any) -> bool:
    return "float" in str(getattr(dtype, "name", dtype))
