"""`clipped_gradients()`: the DP-SGD aggregate of per-example gradients clipped in L2 norm.

    ḡ = ( Σᵢ clip(gᵢ, C) + N(0, σ² C² I) ) / B          clip(g, C) = g · min(1, C / ‖g‖)

Each chunk of examples goes through the per-example machinery once: its per-example parts
(factors for Dense, Embedding and Conv layers, rows for every other variable) give the norms
(`squared_rows`, closed forms where the layer allows) and then, reweighted by
``min(1, C / ‖gᵢ‖)``, the clipped sum (`weighted_sum`: ``Aᵀ (w ⊙ Δ)`` for a Dense kernel).
So no per-example gradient of a factored layer is ever formed, and no second backward pass is
needed; other variables are materialized a chunk at a time, as in `per_example_norms`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._factors import plan, rest, squared_rows, weighted_sum
from gradkit._per_example import (
    check_independent,
    example_bytes,
    for_each_chunk,
    resolve_chunk_size,
)
from gradkit._request import finish, prepare, result_dtype
from gradkit._seeds import check_seed
from gradkit._transforms._base import number


def clipped_gradients(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    l2_norm_clip: float,
    noise_multiplier: float = 0.0,
    seed: int | None = None,
    loss: Any = None,
    layers: Any = None,
    sample_weight: Any = None,
    training: bool = False,
    return_norms: bool = False,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], np.ndarray]:
    """The DP-SGD gradient: each example's gradient clipped to L2 norm `l2_norm_clip`, summed,
    Gaussian noise added, divided by the batch size B.

    Example i's gradient gᵢ is row i of ``per_example_gradients`` with the same arguments
    (the compiled loss, or ``loss=``, on the batch of one ``x[i:i+1]``: example i's loss
    times its sample weight, plus ``model.losses`` (regularizers) in full, so they are
    clipped with it; loss scaling undone). It is clipped by its norm over ALL selected
    variables together (``layers=``: only those), ``gᵢ · min(1, C / ‖gᵢ‖)``. The result is
    ``(Σᵢ clip(gᵢ, C) + N(0, σ²C²·I)) / B`` with σ = ``noise_multiplier``: with σ = 0 the
    MEAN of the clipped gradients, the scale of ``gradients()``. ``sample_weight`` scales
    each example's gradient BEFORE clipping (a weight of 0 removes the example from the sum,
    not from B). The noise is drawn by NumPy from ``seed`` (an int: the same noise on every
    call; None: fresh noise), one standard normal per weight in key order, in the result
    dtype (float32, float64 for float64 variables);
    with ``training=True`` the same ``seed`` also draws the dropout masks.

    ``training=True`` runs dropout (one mask per example) as in ``per_example_gradients``;
    layers that couple examples (BatchNormalization in training) raise. Returns a gradient
    set like ``gradients()``, and with ``return_norms=True`` the pair (that set, the (B,)
    norms ‖gᵢ‖ before clipping, as ``per_example_norms`` gives them). Privacy accounting (ε, δ) is not done here. No model state changes.
    """
    clip = number(l2_norm_clip, "l2_norm_clip", low=0.0, strict=True)
    sigma = number(noise_multiplier, "noise_multiplier", low=0.0)
    check_seed(seed, "noise")
    request = prepare(model, x, y, loss=loss, sample_weight=sample_weight, layers=layers,
                      training=training, seed=seed if training else None, scores=False)
    check_independent(model, request.training)
    shapes = [tuple(v.shape) for v in request.variables]
    sums = [np.zeros(shape, np.float64) for shape in shapes]
    norms = np.zeros(request.batch.size, np.float64)

    chunk = resolve_chunk_size(None, example_bytes(_materialized(request)), request.batch.size)

    def store(start: int, stop: int, parts: list) -> None:
        n = stop - start
        norm = np.sqrt(sum(squared_rows(part, n) for part in parts))
        norms[start:stop] = norm
        weights = clip / np.maximum(norm, clip)  # 1 within the bound; NaN stays NaN
        for j, shape in enumerate(shapes):
            part, parts[j] = parts[j], None
            sums[j] += weighted_sum(part, weights, shape)

    for_each_chunk(request, chunk, store, "clipped")
    if sigma > 0:
        rng = np.random.default_rng(seed)
        for total, variable in zip(sums, request.variables):
            noise = rng.standard_normal(total.shape, dtype=result_dtype(variable))
            noise *= sigma * clip
            total += noise
    result = finish(request, [total / request.batch.size for total in sums])
    if not return_norms:
        return result
    wide = all(result_dtype(v) == np.float64 for v in request.variables)
    return result, norms.astype(np.float64 if wide else np.float32)


def _materialized(request: Any) -> list:
    """The selected variables whose per-example rows are formed (not factored): they alone
    fill the chunk's memory budget, since the factors of the others are never multiplied out."""
    planned = plan(request.model, request.variables, request.adapter.layers_module)
    index = rest(planned, len(request.variables))
    return [request.variables[j] for j in index]
