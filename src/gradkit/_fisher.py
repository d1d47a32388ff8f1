"""The diagonal of the Fisher information over a dataset, from per-example gradients.

Empirical:  F = (1/N) Σ_i g_i ⊙ g_i,              g_i the gradient of example i's own loss.
True:       F = (1/N) Σ_i E_{y~p(·|x_i)} g_i(y) ⊙ g_i(y), labels drawn from the model itself.

Both are streamed batch by batch through `per_example_gradients()` (each batch's rows are
squared and summed in float64, then dropped), so memory is one batch of rows at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._accumulate import prepare_dataset
from gradkit._data import leaves, map_structure
from gradkit._detect import flavour_of
from gradkit._errors import InvalidArgumentError, received
from gradkit._per_example import per_example_gradients
from gradkit._distributed import process_group
from gradkit._request import floatx, result_dtype
from gradkit._seeds import check_seed
from gradkit._select import select_variables, unique_keys
from gradkit._sources import BatchStream

KINDS = ("empirical", "true")
TRUE_LOSS = "sparse_categorical_crossentropy"
ROWS_PER_CALL = 4096  # examples × label draws per per_example_gradients call (kind="true")


def fisher_diagonal(model: Any, data: Any, *, kind: str = "empirical", samples: Any = 1,
                    seed: Any = None, loss: Any = None, layers: Any = None,
                    batch_size: int | None = None, strategy: Any = None
                    ) -> dict[str, np.ndarray]:
    """The diagonal of the Fisher information, a MEAN over every example of `data`.

    Scale: ``F = (1/N) Σ_i g_i ⊙ g_i`` where ``g_i`` is row i of ``per_example_gradients()``:
    the gradient of example i's OWN loss (times its sample weight; regularizer gradients,
    if the model has any, are part of every row, as there), never of the batch mean.

    ``kind="empirical"``: ``g_i`` uses the labels in `data` and the compiled loss (or
    ``loss=``); `samples` must stay 1 and `seed` is unused.

    ``kind="true"``: labels are drawn from the model's own predictive distribution, so the
    model must be a classifier whose single output is class probabilities (a softmax: rows in
    [0, 1] summing to 1; anything else raises InvalidArgumentError). ``g_i`` is the gradient
    of sparse categorical cross-entropy of those outputs (the negative log-likelihood of the
    drawn class, whatever the compiled loss is; ``loss=`` replaces it by another loss taking
    integer labels); labels in `data`, if any, are ignored. ``samples=n`` draws n labels per
    example with ``numpy.random.default_rng(seed)`` and averages over examples and draws
    (an unbiased Monte Carlo estimate); ``samples="exact"`` takes the expectation exactly,
    every class weighted by its probability (one gradient row per class and example).

    `data`: any source ``accumulate()`` takes (a tuple of arrays is cut into batches of
    ``batch_size``). ``layers`` selects variables as in ``gradients()``. Inference mode; keys,
    order and dtypes as ``gradients()``; no model state changes. ``strategy=``:
    torch.distributed, as in ``accumulate()`` (collective; the mean over every process's
    examples; with kind="true" each process draws its labels from ``(seed, its rank)``).
    """
    _check_options(kind, samples)
    check_seed(seed, "label draws")
    group = process_group(model, strategy, "fisher_diagonal()", others=False)

    def prepared():
        variables = select_variables(model, layers)
        if kind == "empirical":
            return variables, prepare_dataset(model, data, loss=loss, layers=layers,
                                              batch_size=batch_size, scores=False)[1]
        flavour = flavour_of(model)  # labels come from the model: the data's y is not checked
        return variables, BatchStream(model, data, batch_size, flavour, floatx(flavour))

    def squares():
        return _squares(model, stream, kind, samples, rng, loss, layers, variables)

    if group is None:
        variables, stream = prepared()
    else:
        variables, stream = group.agree(prepared, lambda p: group.signature(p[0]))
    rng = np.random.default_rng(seed if group is None or seed is None else [seed, group.rank])
    sums, count = squares() if group is None else group.total(squares, variables)
    draws = samples if kind == "true" and samples != "exact" else 1
    return {key: (total / (count * draws)).astype(result_dtype(variable))
            for key, total, variable in zip(unique_keys(variables), sums, variables)}


def _squares(model, stream, kind, samples, rng, loss, layers, variables):
    """(Σ_i g_i ⊙ g_i per variable in float64, examples) over this process's batches."""
    total = [np.zeros(tuple(v.shape), np.float64) for v in variables]
    keys, count = unique_keys(variables), 0
    for _, batch in stream:
        if kind == "empirical":
            rows = per_example_gradients(model, batch.x, batch.y, loss=loss, layers=layers,
                                         sample_weight=batch.sample_weight)
            parts = [(rows, None)]
        else:
            parts = _true_parts(model, batch, samples, rng, loss, layers)
        for rows, weights in parts:
            for sum_, key in zip(total, keys):
                squares = np.square(rows[key].astype(np.float64))
                sum_ += squares.sum(axis=0) if weights is None else \
                    np.tensordot(weights, squares, axes=(0, 0))
        count += batch.size
    return total, count


def _check_options(kind: Any, samples: Any) -> None:
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidArgumentError(
            f"kind= must be one of {KINDS}: 'empirical' squares the gradients of the data's "
            "own labels, 'true' those of labels drawn from the model's predictions. "
            + received(kind=kind))
    if kind == "empirical" and not (samples == 1 and isinstance(samples, int)
                                    and not isinstance(samples, bool)):
        raise InvalidArgumentError(
            "samples= is the number of labels drawn per example for kind='true'; the "
            "empirical Fisher uses the data's labels once. Drop samples= or pass "
            "kind='true'. " + received(kind=kind, samples=samples))
    if kind == "true" and samples != "exact" and (
            isinstance(samples, bool) or not isinstance(samples, (int, np.integer))
            or samples < 1):
        raise InvalidArgumentError(
            "samples= must be a positive int (labels drawn per example) or 'exact' (the "
            "expectation over every class). " + received(samples=samples))


def _true_parts(model, batch, samples, rng, loss, layers):
    """[(per-example rows, row weights or None)] of one batch, labels from the model."""
    probs = _probabilities(model, batch.x)
    size, classes = probs.shape
    x = map_structure(_to_numpy, batch.x)
    weight = map_structure(_to_numpy, batch.sample_weight)
    if samples == "exact":  # every class c of every example, weighted by p_ic
        draws = [(np.tile(np.arange(classes), (size, 1)), probs.reshape(-1))]
    else:
        group = max(1, min(samples, ROWS_PER_CALL // size))
        draws = []
        cumulative = np.cumsum(probs, axis=1)
        for start in range(0, samples, group):
            u = rng.random((size, min(group, samples - start)))
            labels = (cumulative[:, None, :] < u[..., None]).sum(axis=-1)
            draws.append((np.minimum(labels, classes - 1), None))
    parts = []
    for labels, weights in draws:
        repeat = labels.shape[1]
        tiled = map_structure(lambda a: np.repeat(a, repeat, axis=0), x)
        tiled_weight = map_structure(lambda a: np.repeat(a, repeat, axis=0), weight)
        rows = per_example_gradients(model, tiled, labels.reshape(-1),
                                     loss=TRUE_LOSS if loss is None else loss, layers=layers,
                                     sample_weight=tiled_weight)
        parts.append((rows, weights))
    return parts


def _probabilities(model: Any, x: Any) -> np.ndarray:
    """The model's outputs on `x` as (B, C) float64 class probabilities, or raise."""
    outputs = model(x, training=False)
    if isinstance(outputs, (list, tuple, dict)) and len(leaves(outputs)) == 1:
        outputs = leaves(outputs)[0]
    if isinstance(outputs, (list, tuple, dict)):
        raise _not_a_classifier(f"the model has {len(leaves(outputs))} outputs",
                                outputs=f"{len(leaves(outputs))} tensors")
    probs = _to_numpy(outputs).astype(np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise _not_a_classifier(f"its output has shape {probs.shape}, not (batch, classes)",
                                output_shape=probs.shape)
    sums = probs.sum(axis=1)
    if (not np.all(np.isfinite(probs)) or probs.min() < -1e-6 or probs.max() > 1 + 1e-6
            or np.max(np.abs(sums - 1)) > 1e-3):
        raise _not_a_classifier(
            "its outputs are not class probabilities (rows in [0, 1] summing to 1)",
            output_min=float(np.min(probs)), output_max=float(np.max(probs)),
            max_row_sum_error=float(np.max(np.abs(sums - 1))))
    probs = np.clip(probs, 0.0, 1.0)
    return probs / probs.sum(axis=1, keepdims=True)


def _not_a_classifier(what: str, **values: Any) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"kind='true' draws labels from the model's predictions, but {what}. The true "
        "Fisher needs a classifier with a single softmax output (class probabilities). Add "
        "a softmax to the output, or use kind='empirical' (the labels of the data). "
        + received(kind="true", **values))


def _to_numpy(leaf: Any) -> Any:
    if leaf is None or isinstance(leaf, np.ndarray):
        return leaf
    if hasattr(leaf, "detach"):  # torch
        return leaf.detach().cpu().numpy()
    return leaf.numpy() if hasattr(leaf, "numpy") else np.asarray(leaf)
