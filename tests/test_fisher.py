"""fisher_diagonal against independent references.

Empirical: the second moment of `gk.per_example_gradients` rows of the whole data at once,
computed in NumPy. True: softmax regression, whose Fisher diagonal has a closed form: for
kernel entry (j, c), mean_i p_ic (1 − p_ic) x_ij²; for bias c, mean_i p_ic (1 − p_ic).
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import assert_same_state, state_snapshot

RNG = np.random.default_rng(5)
X = RNG.normal(size=(23, 4)).astype(np.float32)
Y = RNG.integers(0, 3, size=23)


def _batches():
    cuts = [0, 7, 9, 23]  # 3 uneven batches
    return [(X[a:b], Y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def _softmax_regression(keras, bias=True, compiled=True):
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(3, activation="softmax", use_bias=bias,
                                                 name="out")])
    weights = [RNG.normal(size=(4, 3)) * 0.8] + ([RNG.normal(size=3) * 0.3] if bias else [])
    model.set_weights(weights)
    if compiled:
        model.compile(loss="sparse_categorical_crossentropy")
    return model


def _closed_form(model, x, bias):
    w = model.get_weights()
    logits = x.astype(np.float64) @ w[0] + (w[1] if bias else 0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    v = p * (1 - p)  # (N, C)
    kernel = np.einsum("ic,ij->jc", v, x.astype(np.float64) ** 2) / len(x)
    return p, kernel, (v.mean(0) if bias else None)


def _snapshot(model):
    """State after one gk.gradients call: on tf-keras a fresh compiled model builds its loss
    metrics lazily on the first gradkit call (any function, not fisher_diagonal's doing)."""
    gk.gradients(model, X[:2], Y[:2])
    return state_snapshot(model)


def _keys(grads):
    kernel = next(k for k in grads if k.endswith("kernel"))
    bias = next((k for k in grads if k.endswith("bias")), None)
    return kernel, bias


def test_empirical_equals_second_moment_of_rows(keras):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy")
    before = _snapshot(model)
    result = gk.fisher_diagonal(model, _batches())
    rows = gk.per_example_gradients(model, X, Y)
    assert list(result) == list(rows)
    for key, row in rows.items():
        expected = np.mean(row.astype(np.float64) ** 2, axis=0)
        assert result[key].shape == row.shape[1:] and result[key].dtype == row.dtype
        np.testing.assert_allclose(result[key], expected, rtol=1e-5, atol=1e-9, err_msg=key)
    assert_same_state(before, state_snapshot(model))


def test_empirical_with_loss_and_layers(keras):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="hidden"),
                              keras.layers.Dense(3, name="head")])
    onehot = np.eye(3, dtype=np.float32)[Y]
    result = gk.fisher_diagonal(model, (X, onehot), loss="mse", layers="head", batch_size=10)
    rows = gk.per_example_gradients(model, X, onehot, loss="mse", layers="head")
    assert list(result) == list(rows)
    for key, row in rows.items():
        np.testing.assert_allclose(result[key], np.mean(row.astype(np.float64) ** 2, 0),
                                   rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bias", [False, True])
def test_true_exact_matches_closed_form(keras, bias):
    model = _softmax_regression(keras, bias=bias)
    before = _snapshot(model)
    result = gk.fisher_diagonal(model, _batches(), kind="true", samples="exact")
    _, kernel, bias_f = _closed_form(model, X, bias)
    kernel_key, bias_key = _keys(result)
    np.testing.assert_allclose(result[kernel_key], kernel, rtol=1e-4, atol=1e-7)
    if bias:
        np.testing.assert_allclose(result[bias_key], bias_f, rtol=1e-4, atol=1e-7)
    else:
        assert bias_key is None
    assert_same_state(before, state_snapshot(model))


def test_true_monte_carlo_within_its_standard_error(keras):
    samples = 500  # the bound below scales with 1/sqrt(samples)
    model = _softmax_regression(keras, bias=True, compiled=False)
    x_only = [X[:7], X[7:9], X[9:]]  # labels are not needed for the true Fisher
    result = gk.fisher_diagonal(model, x_only, kind="true", samples=samples, seed=3)
    p, kernel, bias_f = _closed_form(model, X, True)
    # per draw, v = (p_c − δ)² s with s = x_j² (kernel) or 1 (bias); Var over y ~ p
    m2 = (1 - p) * p ** 4 + p * (1 - p) ** 4
    var_draw = m2 - (p * (1 - p)) ** 2  # (N, C)
    n = len(X)
    se_kernel = np.sqrt(np.einsum("ic,ij->jc", var_draw, X.astype(np.float64) ** 4)
                        / (n * n * samples))
    se_bias = np.sqrt(var_draw.sum(0) / (n * n * samples))
    kernel_key, bias_key = _keys(result)
    assert np.all(np.abs(result[kernel_key] - kernel) <= 5 * se_kernel + 1e-6)
    assert np.all(np.abs(result[bias_key] - bias_f) <= 5 * se_bias + 1e-6)
    assert not np.allclose(result[kernel_key], kernel, rtol=1e-6, atol=0)  # it is random


def test_true_same_seed_same_result(keras):
    model = _softmax_regression(keras)
    first = gk.fisher_diagonal(model, _batches(), kind="true", samples=3, seed=7)
    again = gk.fisher_diagonal(model, _batches(), kind="true", samples=3, seed=7)
    other = gk.fisher_diagonal(model, _batches(), kind="true", samples=3, seed=8)
    for key in first:  # the same labels; the per-example route may round differently
        np.testing.assert_allclose(first[key], again[key], rtol=1e-6, atol=1e-9)
    assert any(not np.allclose(first[k], other[k], rtol=1e-3) for k in first)


def test_true_refuses_non_probability_outputs(keras):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(loss="mse")
    with pytest.raises(gk.InvalidArgumentError,
                       match=r"(?s)softmax.*kind='empirical'.*Received: kind='true'"):
        gk.fisher_diagonal(model, _batches(), kind="true")


@pytest.mark.parametrize("options, match", [
    ({"kind": "fisher"}, "kind= must be one of"),
    ({"kind": "true", "samples": 0}, "samples= must be a positive int"),
    ({"kind": "true", "samples": True}, "samples= must be a positive int"),
    ({"kind": "true", "samples": 2.5}, "samples= must be a positive int"),
    ({"samples": 5}, "samples= is the number of labels drawn"),
])
def test_bad_options(keras, options, match):
    model = _softmax_regression(keras)
    with pytest.raises(gk.InvalidArgumentError, match=match):
        gk.fisher_diagonal(model, _batches(), **options)
