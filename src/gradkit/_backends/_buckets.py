"""Batch-size buckets: one compiled program serves many batch sizes, exactly (used on JAX).

XLA compiles one program per input shape, so on JAX every new batch size costs a compilation
(about a second for a small MLP on a CPU), where TensorFlow reuses one graph. When it is
provably exact, the batch is instead padded to a size already compiled and the padded rows
are masked out of the objective:

- padded rows are copies of the first example, so they add no NaN/Inf the batch lacks;
- they get weight 0: for an int ``target=`` through the sample weights, for a Keras loss
  through a Keras mask on each output, which every Keras reduction honours exactly (Keras'
  own masking rule: "sum_over_batch_size" divides by the number of unmasked entries);
- only where no example can affect another's output or loss: ``training=False``; a
  Sequential or Functional model made only of Keras' own layers (no Lambda, no custom
  layer, no activity regularizer, no stateful RNN); losses that are Keras' per-example
  built-ins reducing the last axis. Weight regularizers do not see the data: unchanged.

Anything else (``training=True``, a callable ``target=`` or loss, a subclassed model, an input
that is not a NumPy array) keeps one program per shape. Which size serves ``n`` examples:
``n`` itself if compiled; else the smallest larger compiled size; else a new program (``n``
the first time, then the next power of two, so a growing batch costs O(log n) programs). A
size padded ``REUSE`` times gets its own program, so a repeated size soon runs unpadded.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
import numpy as np
from keras.src.backend import get_keras_mask, set_keras_mask

from gradkit._data import leaves, map_structure
from gradkit._objective import Objective

REUSE = 8  # padded calls at one batch size before that size gets its own program

_PER_EXAMPLE_LOSSES = (
    "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error", "huber", "log_cosh", "hinge", "squared_hinge",
    "categorical_hinge", "kl_divergence", "poisson", "binary_crossentropy",
    "binary_focal_crossentropy", "categorical_crossentropy", "categorical_focal_crossentropy",
    "sparse_categorical_crossentropy", "cosine_similarity",
)
_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight")
_OWN_MODULES = ("keras.src.layers.", "keras.src.models.sequential",
                "keras.src.models.functional")


class PaddingNotExact(Exception):
    """Raised while tracing when padding turns out not to be exact; the caller falls back."""


class Buckets:
    """Which compiled batch size serves a batch of n examples (see the module docstring)."""

    def __init__(self) -> None:
        self.sizes: set[int] = set()
        self._padded: dict[int, int] = {}

    def size_for(self, n: int) -> int:
        if n in self.sizes:
            return n
        larger = [s for s in self.sizes if s > n]
        if not larger:
            size = n if not self.sizes else 1 << (n - 1).bit_length()
        else:
            self._padded[n] = self._padded.get(n, 0) + 1
            size = n if self._padded[n] > REUSE else min(larger)
        self.sizes.add(size)
        return size


def padding_is_exact(model: Any, objective: Objective, training: bool) -> bool:
    """True if padded rows with weight 0 leave the objective and its gradient unchanged."""
    if training:
        return False
    if objective.kind == "target":
        exact_objective = isinstance(objective.spec, int) and not isinstance(objective.spec, bool)
    elif objective.kind == "loss":
        exact_objective = _per_example_loss(objective.spec)
    else:
        exact_objective = all(_per_example_loss(s) for s in leaves(getattr(model, "loss", None)))
    return exact_objective and _rows_independent(model)


@functools.cache
def _per_example_functions() -> frozenset:
    return frozenset(getattr(keras.losses, name) for name in _PER_EXAMPLE_LOSSES)


def _per_example_loss(spec: Any) -> bool:
    if spec is None or (isinstance(spec, str) and spec.lower() in ("crossentropy", "ce")):
        return True
    if isinstance(spec, str):
        try:
            spec = keras.losses.get(spec)
        except ValueError:
            return False
    if isinstance(spec, keras.losses.Loss):
        return (type(spec).__module__ == "keras.src.losses.losses"
                and getattr(spec, "fn", None) in _per_example_functions()
                and getattr(spec, "_fn_kwargs", {}).get("axis", -1) == -1
                and spec.reduction in _REDUCTIONS)
    return callable(spec) and spec in _per_example_functions()


def _rows_independent(model: Any) -> bool:
    """Every layer is Keras' own and computes each example from that example alone."""
    nodes = [model, *model._flatten_layers(include_self=False, recursive=True)]
    # A Functional graph may also hold bare keras.ops calls (ops.mean(h, axis=0)): refused.
    nodes += [op for node in list(nodes) for op in getattr(node, "operations", ())]
    return all(
        type(node).__module__.startswith(_OWN_MODULES)
        and type(node).__module__ != "keras.src.layers.core.lambda_layer"
        and getattr(node, "activity_regularizer", None) is None
        and not getattr(node, "stateful", False)
        for node in nodes
    )


def paddable(data: dict) -> bool:
    """Padding happens on the host: only for NumPy data with at least one example."""
    arrays = leaves(list(data.values()))
    return len(arrays[0]) > 0 and all(isinstance(a, np.ndarray) for a in arrays)


def pad(data: dict, size: int) -> dict:
    """The batch `data` grown to `size` rows (copies of its first example; sample weight 0),
    with ``valid_rows``, the boolean vector of its real rows."""
    n = len(leaves(data["x"])[0])
    extra = size - n

    def grow(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) if extra else a

    padded = {key: map_structure(grow, value) for key, value in data.items()}
    if "sample_weight" in data and extra:
        weights = data["sample_weight"]
        zeros = np.zeros((extra, *weights.shape[1:]), weights.dtype)
        padded["sample_weight"] = np.concatenate([weights, zeros])
    padded["valid_rows"] = np.arange(size) < n
    return padded


def exclude_padding(objective: Objective, y_pred: Any, sample_weight: Any,
                    valid_rows: Any) -> Any:
    """Weight 0 for padded rows (traced): the sample weights of a target, else a Keras mask
    on each output (combined with any mask the model set). Returns the sample weight."""
    ops = keras.ops
    if objective.kind == "target":
        return ops.cast(valid_rows, "float32") if sample_weight is None else sample_weight
    for output in leaves(y_pred):
        shape = tuple(output.shape)
        if len(shape) < 2:  # the loss would reduce over the batch axis itself
            raise PaddingNotExact(f"output of shape {shape}")
        rows = ops.reshape(valid_rows, (shape[0],) + (1,) * (len(shape) - 2))
        mask = ops.broadcast_to(rows, shape[:-1])
        existing = get_keras_mask(output)
        if existing is not None:
            if tuple(existing.shape) != shape[:-1]:
                raise PaddingNotExact(f"output mask of shape {tuple(existing.shape)}")
            mask = ops.logical_and(mask, ops.cast(existing, "bool"))
        set_keras_mask(output, mask)
    return sample_weight
