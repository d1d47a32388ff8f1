"""Any data source as a stream of checked batches, the first one checked before any work.

Accepted sources, each yielding batches ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``
(unpacked as Keras' ``unpack_x_y_sample_weight`` does: a list counts as a tuple)::

    tf.data.Dataset          batched; any flavour where TensorFlow is installed
    keras.utils.PyDataset    (tf-keras: keras.utils.Sequence) read by index, 0 .. len - 1
    torch DataLoader         or any other iterable / generator of batches
    tuple of arrays          (x,), (x, y) or (x, y, sample_weight), or x alone (an array or a
                             dict of arrays), cut into batches of ``batch_size`` (default 32)

Tensors that belong to the model's framework pass through untouched (they may already be on
the device); any other tensor (a TF tensor on JAX, a torch tensor on TF) becomes NumPy.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from gradkit._data import Batch, common_size, leaves, map_structure, prepare_batch
from gradkit._errors import DataShapeError, InvalidArgumentError, received

ACCEPTED = (
    "a batched tf.data.Dataset, a keras.utils.PyDataset, a torch DataLoader, an iterable or "
    "generator of (x, y) / (x, y, sample_weight) batches (x alone for target=), or a tuple "
    "of arrays (x, y[, sample_weight]) with batch_size="
)
DEFAULT_BATCH_SIZE = 32
_NATIVE = {
    "tensorflow": ("tensorflow",), "tf_keras": ("tensorflow",),
    "jax": ("jax", "jaxlib"), "torch": ("torch",),
}


class BatchStream:
    """``for index, batch in BatchStream(...)``: checked `Batch`es of a data source.

    The first non-empty batch is read and checked against the model when the stream is
    made, so bad data fails before any gradient is computed. ``total`` is the number of
    batches when the source knows it, else None. Empty batches are passed over.
    """

    def __init__(self, model: Any, data: Any, batch_size: int | None, flavour: str,
                 floatx: str) -> None:
        self._model, self._flavour, self._floatx = model, flavour, floatx
        raw, self.total = _open(data, batch_size)
        self._raw = enumerate(raw)
        first = self._next()
        if first is None:
            raise InvalidArgumentError(
                "The data yielded no examples, so there is no gradient to compute. Pass "
                f"{ACCEPTED}. " + received(data=data)
            )
        self.first: tuple[int, Batch] = first

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        yield self.first
        while (item := self._next()) is not None:
            yield item

    def _next(self) -> tuple[int, Batch] | None:
        for index, element in self._raw:
            batch = self._check(index, element)
            if batch.size:
                return index, batch
        return None

    def _check(self, index: int, element: Any) -> Batch:
        x, y, sample_weight = unpack(element)
        x, y, sample_weight = (map_structure(self._native, v) for v in (x, y, sample_weight))
        try:
            batch = prepare_batch(self._model, x, y, sample_weight, self._floatx)
        except DataShapeError as error:
            raise DataShapeError(f"Batch {index} of the data does not fit: {error}") from None
        first = getattr(self, "first", None)
        if first is not None and (batch.y is None) != (first[1].y is None):
            has = "has no y" if batch.y is None else "has a y"
            raise DataShapeError(
                f"Batch {index} of the data {has}, but batch {first[0]} did not: every batch "
                "must be (x, y[, sample_weight]) for a loss, or x alone for target=. "
                + received(batch_index=index)
            )
        return batch

    def _native(self, leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) or not hasattr(leaf, "shape"):
            return leaf
        module = type(leaf).__module__.split(".")[0]
        if module in _NATIVE[self._flavour]:
            return leaf
        if module == "torch":
            return leaf.detach().cpu().numpy()
        return leaf.numpy() if hasattr(leaf, "numpy") else np.asarray(leaf)


def unpack(element: Any) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` of one batch, as Keras unpacks it."""
    if isinstance(element, list):
        element = tuple(element)
    if not isinstance(element, tuple):
        return element, None, None
    if not 1 <= len(element) <= 3:
        raise InvalidArgumentError(
            "A batch must be x, (x,), (x, y) or (x, y, sample_weight), but one batch is a "
            f"tuple of {len(element)} items. Yield at most three items per batch; put several "
            "inputs in one list or dict as x. " + received(batch_items=len(element))
        )
    return (tuple(element) + (None, None))[:3]


def _open(data: Any, batch_size: Any) -> tuple[Any, int | None]:
    """An iterable of raw batches and its length (None if unknown)."""
    if _is_arrays(data):
        return _array_batches(data, batch_size)
    if batch_size is not None:
        raise InvalidArgumentError(
            "batch_size= applies only to a tuple of arrays; this data source makes its own "
            "batches. Drop batch_size=, or pass the arrays as (x, y) with batch_size=. "
            + received(batch_size=batch_size, data=type(data).__name__)
        )
    if _is_tf_dataset(data):
        return data, _dataset_length(data)
    if _is_keras_sequence(data):
        length = data.num_batches if hasattr(data, "num_batches") else len(data)
        if length is None:
            raise InvalidArgumentError(
                "This PyDataset is infinite (num_batches is None), so a pass over it never "
                "ends. Give it a finite num_batches / __len__. " + received(num_batches=None)
            )
        return (data[i] for i in range(length)), length
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise InvalidArgumentError(
            f"data must be {ACCEPTED}. " + received(data=type(data).__name__)
        )
    return data, _length(data)


def _is_arrays(data: Any) -> bool:
    if isinstance(data, dict) or (hasattr(data, "shape") and hasattr(data, "dtype")):
        return True
    return isinstance(data, tuple) and bool(data) and all(
        item is None or isinstance(item, dict) or hasattr(item, "shape")
        or (isinstance(item, list) and all(hasattr(a, "shape") for a in item))
        for item in data
    )


def _array_batches(data: Any, batch_size: Any) -> tuple[Iterator[Any], int]:
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise InvalidArgumentError(
            "batch_size= must be a positive int (examples per batch). "
            + received(batch_size=batch_size)
        )
    x, y, sample_weight = unpack(data)
    if not leaves(x):
        raise InvalidArgumentError("x is required: the model's input arrays. " + received(x=x))
    count = common_size(x, y, sample_weight)
    starts = range(0, count, int(batch_size))

    def cut(start: int) -> tuple:
        part = (lambda a: a[start:start + batch_size])
        return tuple(map_structure(part, v) for v in (x, y, sample_weight))

    return (cut(start) for start in starts), len(starts)


def check_one_batch(x: Any) -> None:
    """Raise if `x`, given where one batch of arrays belongs, is a whole data source (a
    tf.data.Dataset, a PyDataset, a DataLoader or another iterator of batches)."""
    source = _is_tf_dataset(x) or _is_keras_sequence(x) or (
        (hasattr(x, "__iter__") or hasattr(x, "__next__"))
        and not isinstance(x, (list, tuple, dict, str, bytes))
        and not any(hasattr(x, a) for a in ("shape", "__array__", "__array_interface__")))
    if source:
        raise InvalidArgumentError(
            f"x is a data source ({type(x).__name__}), but this call takes one batch of "
            "arrays. Pass a batch (x, y), or give the source to a call over a whole dataset: "
            "accumulate(), gradient_stats(), fisher_diagonal(), hvp_over(), ggn_vp_over(), "
            "hessian_eigenvalues(), hessian_trace(), hessian_density(). "
            + received(x=type(x).__name__)
        )


def _is_tf_dataset(data: Any) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def _dataset_length(dataset: Any) -> int | None:
    import tensorflow as tf

    cardinality = int(dataset.cardinality())
    if cardinality == int(tf.data.INFINITE_CARDINALITY):
        raise InvalidArgumentError(
            "The tf.data.Dataset is infinite (it repeats), so a pass over it never ends. "
            "Drop .repeat() or take a finite part: dataset.take(n_batches). "
            + received(cardinality="INFINITE")
        )
    return cardinality if cardinality >= 0 else None


def _is_keras_sequence(data: Any) -> bool:
    return any(
        cls.__name__ in ("PyDataset", "Sequence")
        and cls.__module__.split(".")[0] in ("keras", "tf_keras")
        for cls in type(data).__mro__
    )


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
