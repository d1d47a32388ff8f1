"""Per-example gradient norms, without materializing per-example gradients where possible.

Plain Dense and Embedding layers get closed forms from each example's layer input and
pre-activation gradient (``gradkit._factors``: each kind's squared norm in its registry entry):
their cost and memory grow with the activations, not with B × parameters. Plain convolutions
form each example's (small) kernel gradient from the same factors, one block of examples at a
time. Every other selected variable (normalization, regularized or customized layers) is
materialized by the adapter chunk by chunk, keeping only each chunk's squared norms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._data import Batch
from gradkit._errors import InvalidArgumentError, received
from gradkit._factors import squared_rows
from gradkit._per_example import (
    check_independent,
    example_bytes,
    for_each_chunk,
    resolve_chunk_size,
)
from gradkit._request import prepare, report_nonfinite, result_dtype
from gradkit._select import layer_of, unique_keys

_ALL = "all selected variables"


def per_example_norms(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    target: Any = None,
    layers: Any = None,
    sample_weight: Any = None,
    training: bool = False,
    seed: int | None = None,
    by_layer: bool = False,
) -> np.ndarray | dict[str, np.ndarray]:
    """The L2 norm of each example's gradient: shape ``(B,)``, or ``{layer: (B,)}``.

    Example i's gradient is row i of ``per_example_gradients`` with the same arguments (the
    gradient of the objective on the batch of one ``x[i:i+1]``: for the compiled mean loss,
    example i's loss times its sample weight plus ``model.losses`` in full; for ``target=k``
    the score ``outputs[i, k]``; loss scaling undone). The norm runs over all selected
    variables together, or, with ``by_layer=True``, over each layer's selected variables,
    keyed by the layer's path (the variable key without its last part: ``"dense_1"``), in
    model order. float32 (float64 when every selected variable is float64).

    Dense and Embedding layers use closed forms from the layer input and the pre-activation
    gradient, so per-example gradients are never formed for them; Conv layers form them
    from those factors a block of examples at a time; other layers are
    materialized chunk by chunk (256 MiB of per-example gradients per chunk). Errors as
    ``per_example_gradients``; no model state changes.
    """
    if not isinstance(by_layer, (bool, np.bool_)):
        raise InvalidArgumentError(
            "by_layer= must be True (one norm per layer) or False (one norm over all selected "
            "variables). " + received(by_layer=by_layer)
        )
    request = prepare(model, x, y, loss=loss, target=target, sample_weight=sample_weight,
                      layers=layers, training=training, seed=seed, rows=True)
    check_independent(model, request.training)
    variables, batch = request.variables, request.batch
    squared = [np.zeros(batch.size, np.float64) for _ in variables]

    def store(start: int, stop: int, parts: list) -> None:
        for j in range(len(parts)):
            part, parts[j] = parts[j], None
            squared[j][start:stop] = squared_rows(part, stop - start)

    chunk = resolve_chunk_size(None, example_bytes(variables), batch.size)
    for_each_chunk(request, chunk, store, "norms")
    return _combine(variables, squared, bool(by_layer), batch)


def _combine(variables: list, squared: list, by_layer: bool, batch: Batch) -> Any:
    """Square roots of the summed squares, overall or per layer, in the result dtype."""
    dtype = np.float64 if all(result_dtype(v) == np.float64 for v in variables) else np.float32
    groups: dict[str, np.ndarray] = {}
    for key, sq in zip(unique_keys(variables), squared):
        name = layer_of(key) if by_layer else _ALL
        groups[name] = groups[name] + sq if name in groups else sq
    result = {name: np.sqrt(total).astype(dtype) for name, total in groups.items()}
    bad = {name: value for name, value in result.items() if not np.all(np.isfinite(value))}
    if bad:
        report_nonfinite(bad, batch)
    return result if by_layer else result[_ALL]
