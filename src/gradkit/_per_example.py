"""Per-example gradients: row i is the gradient of example i's OWN objective.

Example i's objective is the objective evaluated on the batch of one
``(x[i:i+1], y[i:i+1], sample_weight[i:i+1])``: for the compiled mean loss that is example
i's loss times its sample weight, plus ``model.losses`` (regularizers) in full. So for a
mean-reduced compiled loss the mean over rows equals ``gradients()`` of the whole batch
(regularizers included once), and for ``target=`` the sum over rows does.

Each adapter vectorizes the single-example gradient with its framework's own vectorizer
inside its compiled function (``jax.vmap`` in ``jax.jit``, ``tf.vectorized_map`` in
``tf.function``, ``torch.func.vmap``). Plain Dense, Embedding and Conv layers come back as
small factors (layer input, pre-activation gradient; see ``gradkit._factors``) whose
product is written once, straight into the preallocated NumPy result (in parallel blocks, by
each kind's rows writer); other variables come back as arrays and are copied in. The batch is
processed in chunks, so peak memory is the result plus one chunk. Where the vectorizer must not
or cannot run, or is slower, a loop over the examples compiled into the same function
(``tf.map_fn``, ``jax.lax.map``, a loop inside one torch call) or a Python loop of the compiled single-example gradient gives
the same rows (``gradkit._routes`` chooses once per model and selection).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from gradkit._data import Batch, leaves, slice_batch
from gradkit._errors import InvalidArgumentError, received
from gradkit._factors import write_rows
from gradkit._memory import check_fits
from gradkit._request import (Request, check_connected, prepare, report_nonfinite,
                              result_dtype)
from gradkit._routes import run_chunk
from gradkit._select import walk_layers

#: Bytes of per-example result one chunk may hold when chunk_size=None (256 MiB).
CHUNK_BUDGET_BYTES = 256 * 2**20
_COUPLING_LAYERS = ("BatchNormalization", "SyncBatchNormalization")


def per_example_gradients(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    target: Any = None,
    layers: Any = None,
    sample_weight: Any = None,
    chunk_size: int | None = None,
    training: bool = False,
    seed: int | None = None,
    out: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Gradient of each example's own objective: ``{variable path: (B, *variable.shape)}``.

    Row i is the gradient of the objective evaluated on the batch of one ``x[i:i+1]`` (with
    ``y[i:i+1]``, ``sample_weight[i:i+1]``). Scale: with the compiled loss (mean over the
    batch, as ``fit``) row i is the gradient of example i's loss times its sample weight
    ``w_i``, plus the gradient of ``model.losses`` (regularizers) in full, so the MEAN over
    rows equals ``gradients()`` of the batch (for the default "sum_over_batch_size"
    reduction). With ``target=k`` row i is the gradient of the score ``outputs[i, k]``, so the
    SUM over rows equals ``gradients()``. Loss scaling is undone; float32 (float64 for
    float64 variables); keys and order as ``gradients()``.

    Vectorized with the backend's own vectorizer inside its compiled function; plain Dense,
    Embedding and Conv layers come back as (layer input, output gradient) factors whose rows are
    written once, straight into the result. The batch runs in chunks of ``chunk_size``
    examples (default: as many as fit ``CHUNK_BUDGET_BYTES`` = 256 MiB of result), so peak
    memory is the B-row result plus at most one chunk; if that cannot fit in the memory
    available now, ResultTooLargeError (a MemoryError) says so before anything is allocated.
    Where the vectorizer is known to crash or fails, or is timed slower than a loop on this
    model, a loop compiled into the function (TensorFlow, JAX; on torch a loop inside one call) or a loop of the compiled
    single-example gradient is used (same values; chosen once per model and selection, a
    fallback logged once on the ``"gradkit"`` logger: see gradkit._routes).

    ``out=``: a dict with the result's keys of writeable C-contiguous arrays of the result's
    shapes and dtypes (e.g. this function's earlier result, reused): the rows are written into
    them and ``out`` itself is returned, so repeated calls allocate no new B × P memory (NumPy's
    ``out=`` convention). They are checked before anything is written.

    Layers that couple examples (BatchNormalization with ``training=True``) raise
    InvalidArgumentError naming the layer. A selected variable that does not affect the
    objective raises UnconnectedGradientError; select other ``layers=``. No model state
    changes (weights, moving statistics, seed generators, metrics).
    """
    request = prepare(model, x, y, loss=loss, target=target, sample_weight=sample_weight,
                      layers=layers, training=training, seed=seed, rows=True)
    check_independent(model, request.training)
    variables, batch, keys = request.variables, request.batch, request.keys
    shapes = {key: ((batch.size, *tuple(v.shape)), dtype)
              for key, v, dtype in zip(keys, variables, request.dtypes)}
    row_bytes = sum(math.prod(shape[1:]) * dtype.itemsize for shape, dtype in shapes.values())
    chunk = resolve_chunk_size(chunk_size, row_bytes, batch.size)
    check_fits(0 if out is not None else row_bytes * batch.size, row_bytes * chunk, batch.size)
    result = checked_out(out, shapes) if out is not None else {
        key: np.empty(shape, dtype) for key, (shape, dtype) in shapes.items()}
    bad: set[str] = set()
    adapter = request.adapter

    def store(start: int, stop: int, parts: list) -> None:
        for j, key in enumerate(keys):
            part, parts[j] = parts[j], None  # drop the backend's buffer once copied
            if not write_rows(part, result[key][start:stop], adapter.kernel_rows):
                bad.add(key)

    for_each_chunk(request, chunk, store, "rows")
    warn_nonfinite(result, bad, batch)
    return result


def checked_out(out: Any, shapes: dict) -> dict[str, np.ndarray]:
    """`out` if it holds exactly the result's arrays (keys, shapes, dtypes), else raise."""
    if not isinstance(out, dict) or list(out) != list(shapes):
        got = list(out) if isinstance(out, dict) else type(out).__name__
        raise InvalidArgumentError(
            "out= must be a dict with exactly the result's keys, in order (e.g. an earlier "
            f"result of the same call): {list(shapes)[:4]}... " + received(out=got)
        )
    for key, (shape, dtype) in shapes.items():
        array = out[key]
        if not (isinstance(array, np.ndarray) and array.shape == shape and array.dtype == dtype
                and array.flags.c_contiguous and array.flags.writeable):
            raise InvalidArgumentError(
                f"out[{key!r}] must be a writeable C-contiguous {dtype} array of shape {shape} "
                "(allocate it with np.empty, or pass an earlier result). "
                + received(key=key, shape=getattr(array, "shape", None),
                           dtype=str(getattr(array, "dtype", type(array).__name__)))
            )
    return out


def check_independent(model: Any, training: bool) -> None:
    """Raise if a layer mixes the examples of a batch (BatchNorm statistics in training)."""
    if not training:
        return
    for path, layer in walk_layers(model):
        names = {cls.__name__ for cls in type(layer).__mro__}
        if names.intersection(_COUPLING_LAYERS) and layer.trainable:
            raise InvalidArgumentError(
                f"Layer {path!r} ({type(layer).__name__}) couples the examples of a batch "
                "when training=True: it normalizes with the batch's mean and variance, so "
                "one example's gradient depends on the others and has no per-example value. "
                "Pass training=False (moving statistics, the default), or freeze the layer "
                f"(model.get_layer({layer.name!r}).trainable = False). "
                + received(training=training, layer=path)
            )


def example_bytes(variables: list) -> int:
    """Bytes of one example's gradient of `variables` (one row of each), in result dtypes."""
    return sum(math.prod(v.shape) * result_dtype(v).itemsize for v in variables)


def resolve_chunk_size(chunk_size: Any, row_bytes: int, size: int) -> int:
    """The number of examples per chunk: `chunk_size`, or as many rows of `row_bytes`
    (`example_bytes`) as fit the memory budget."""
    if chunk_size is None:
        return max(1, min(size, CHUNK_BUDGET_BYTES // max(row_bytes, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or (
        chunk_size < 1
    ):
        raise InvalidArgumentError(
            "chunk_size= must be a positive int (examples per vectorized chunk), or None "
            "to fit each chunk's result in 256 MiB. " + received(chunk_size=chunk_size)
        )
    return int(min(chunk_size, size))


def for_each_chunk(request: Request, chunk: int, store: Callable, operation: str) -> None:
    """Compute each chunk's parts on the route chosen for `operation` of this model
    (gradkit._routes) and hand them to ``store(start, stop, parts)``.

    Where the adapter compiles per shape (``pad_chunks``), a short last chunk is padded to the
    chunk size when every array is NumPy, so no new program is compiled for it.
    """
    batch = request.batch
    arrays = leaves(batch.x) + leaves(batch.y) + leaves(batch.sample_weight)
    pad = request.adapter.pad_chunks and batch.size > chunk and all(
        isinstance(a, np.ndarray) for a in arrays)
    for start in range(0, batch.size, chunk):
        stop = min(start + chunk, batch.size)
        part = request.replace(batch=slice_batch(batch, start, stop, chunk if pad else None))
        run_chunk(part, operation, store, start, stop, loop_over_examples,
                  lambda parts: check_connected(request.keys, [p is not None for p in parts],
                                                what="per-example gradient",
                                                layers=request.layers))


def loop_over_examples(part: Request) -> list:
    """The loop route: the compiled single-example gradient per example; per variable a
    list of one array per example (the writers copy each into the result: stacking them
    first would copy every gradient once more), or None if unconnected. Rows of padding
    (``part.batch.size`` < the arrays' length) are skipped."""
    with part.adapter.values_held(part.model):  # the weights are the same for every example
        rows = [part.adapter.gradients(part.replace(batch=slice_batch(part.batch, i, i + 1)))[1]
                for i in range(part.batch.size)]
    return [None if rows[0][j] is None else [row[j] for row in rows]
            for j in range(len(part.variables))]


def warn_nonfinite(result: dict[str, np.ndarray], bad: set, batch: Batch) -> None:
    """Report NaN/Inf by variable name."""
    if bad:
        report_nonfinite({key: result[key] for key in result if key in bad}, batch)
