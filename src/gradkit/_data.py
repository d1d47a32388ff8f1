"""One batch of data, checked against the model before any work is done.

NumPy floating arrays are cast to the Keras float type (``floatx``, float32 by default), as
``fit`` does; backend tensors are passed through untouched. x may be an array, a list/tuple
(multi-input) or a dict keyed by input name; y likewise for multi-output models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradkit._errors import DataShapeError, InvalidArgumentError, received


@dataclass(frozen=True)
class Batch:
    """A checked batch: structures of arrays/tensors with one shared leading size."""

    x: Any
    y: Any
    sample_weight: Any
    size: int


def leaves(structure: Any) -> list[Any]:
    """The arrays of a (possibly nested) list/tuple/dict structure, in order."""
    if isinstance(structure, dict):
        return [leaf for key in structure for leaf in leaves(structure[key])]
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in leaves(item)]
    return [] if structure is None else [structure]


def map_structure(fn: Any, structure: Any) -> Any:
    """Apply `fn` to every array of `structure`, keeping its list/tuple/dict shape."""
    if isinstance(structure, dict):
        return {key: map_structure(fn, value) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(map_structure(fn, item) for item in structure)
    return None if structure is None else fn(structure)


def slice_batch(batch: Batch, start: int, stop: int, pad_to: int | None = None) -> Batch:
    """Examples ``start:stop`` of `batch`; padded with copies of the first to `pad_to`."""

    def cut(array: Any) -> Any:
        part = array[start:stop]
        if pad_to is None or stop - start == pad_to:
            return part
        return np.concatenate([part, np.repeat(part[:1], pad_to - (stop - start), axis=0)])

    return Batch(
        map_structure(cut, batch.x), map_structure(cut, batch.y),
        None if batch.sample_weight is None else cut(batch.sample_weight), stop - start,
    )


def prepare_batch(model: Any, x: Any, y: Any, sample_weight: Any, floatx: str) -> Batch:
    """Normalize x/y/sample_weight and check them against each other and the model."""
    if x is None:
        raise InvalidArgumentError(
            "x is required: the model's input batch. " + received(x=None)
        )
    x = map_structure(lambda a: _as_array(a, floatx), _as_structure(x))
    y = map_structure(lambda a: _as_array(a, floatx), _as_structure(y))
    if sample_weight is not None:
        sample_weight = _as_array(sample_weight, floatx)
    size = common_size(x, y, sample_weight)
    check_inputs_fit(model, x)
    return Batch(x, y, sample_weight, size)


def _as_structure(data: Any) -> Any:
    """A list/tuple of arrays stays a structure; a plain nested list of numbers (NumPy
    scalars included) is one array."""
    def array(item):
        return hasattr(item, "shape") and tuple(item.shape) != ()

    if isinstance(data, (list, tuple)) and data and all(
        array(item) or isinstance(item, (list, tuple, dict)) for item in data
    ) and any(array(item) or isinstance(item, dict) for item in data):
        return list(data)
    if isinstance(data, (list, tuple)):
        return np.asarray(data)
    return data


def _as_array(value: Any, floatx: str) -> Any:
    if isinstance(value, np.ndarray) or np.isscalar(value):
        array = np.asarray(value)
        if array.dtype.kind == "f" and array.dtype != np.dtype(floatx):
            array = array.astype(floatx)
        return array
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value  # a backend tensor: leave device placement and dtype to its owner
    return _as_array(np.asarray(value), floatx)


def _shape(value: Any) -> tuple:
    return tuple(None if d is None else int(d) for d in value.shape)


def common_size(x: Any, y: Any, sample_weight: Any) -> int:
    named = [("x", leaf) for leaf in leaves(x)] + [("y", leaf) for leaf in leaves(y)]
    if sample_weight is not None:
        named.append(("sample_weight", sample_weight))
    sizes = {}
    for name, leaf in named:
        shape = _shape(leaf)
        if not shape:
            raise DataShapeError(
                f"{name} holds a scalar, but every array needs a leading batch axis. Add one "
                f"(np.expand_dims({name}, 0)) for a batch of one. " + received(**{name: leaf})
            )
        sizes.setdefault(name, set()).add(shape[0])
    all_sizes = set().union(*sizes.values())
    if len(all_sizes) != 1:
        detail = ", ".join(f"{n}: {sorted(s)}" for n, s in sizes.items())
        raise DataShapeError(
            "x, y and sample_weight must share one batch size (their first axis), but they "
            f"disagree ({detail}). Slice them to the same examples. "
            + received(**{n: sorted(s) for n, s in sizes.items()})
        )
    return all_sizes.pop()


def check_inputs_fit(model: Any, x: Any) -> None:
    """Raise DataShapeError if x cannot be fed to the model's declared inputs."""
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        return  # a subclassed or unbuilt model declares no inputs; the call will tell
    if not inputs:
        return
    names = [getattr(t, "name", f"input_{i}") for i, t in enumerate(inputs)]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise DataShapeError(
                f"x is a dict, but it lacks the model input(s) {missing}; the model's inputs "
                f"are {names}. Key x by input name. " + received(x_keys=sorted(x))
            )
        arrays = [x[n] for n in names]
    else:
        arrays = leaves(x)
    if len(arrays) != len(inputs):
        raise DataShapeError(
            f"The model takes {len(inputs)} input(s) {names}, but x holds {len(arrays)} "
            "array(s). Pass one array per input, as a list in input order or a dict by name. "
            + received(x=[_shape(a) for a in arrays])
        )
    for name, spec, array in zip(names, inputs, arrays):
        expected = tuple(spec.shape)
        got = _shape(array)
        fits = len(got) == len(expected) and all(
            e is None or e == g for e, g in zip(expected[1:], got[1:])
        )
        if not fits:
            raise DataShapeError(
                f"x for input {name!r} has shape {got}, but the model expects "
                f"{expected} (None = any size). Reshape the data to match the model's "
                "input. " + received(x_shape=got)
            )
