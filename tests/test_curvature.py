"""Dataset curvature (hvp_over, hessian_eigenvalues, hessian_trace) against a dense Hessian.

The reference Hessian is assembled column by column from `gradkit.hvp` on basis vectors of
the whole dataset as one batch (an independent, product-by-product construction; checked
symmetric), then diagonalized by `numpy.linalg.eigh`. Models are float64 (see the float64
fixture in conftest.py): on JAX and torch Keras 3 still runs some ops of a float64 model in
float32 (~1e-7 relative, measured in test_hvp.py), far below the 1e-4 asked of eigenvalues.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import gradkit as gk
from conftest import assert_same_state, state_snapshot, trained_stateful_model

RNG = np.random.default_rng(11)
EIG_RTOL = 1e-4


# ----------------------------------------------------------------------------- helpers


def _flat(grads: dict) -> np.ndarray:
    return np.concatenate([np.ravel(g) for g in grads.values()]).astype(np.float64)


def _dense_hessian(model, x, y=None, **kwargs) -> np.ndarray:
    """H of the objective on (x, y) as one batch: column j = hvp(e_j)."""
    template = gk.gradients(model, x, y, **kwargs)
    size = sum(g.size for g in template.values())
    columns = []
    for j in range(size):
        basis = np.zeros(size)
        basis[j] = 1.0
        vector, start = {}, 0
        for key, g in template.items():
            vector[key] = basis[start:start + g.size].reshape(g.shape).astype(g.dtype)
            start += g.size
        columns.append(_flat(gk.hvp(model, x, y, vector=vector, **kwargs)))
    hessian = np.stack(columns, axis=1)
    scale = np.abs(hessian).max()
    np.testing.assert_allclose(hessian, hessian.T, rtol=0, atol=1e-6 * scale,
                               err_msg="the dense reference Hessian is not symmetric")
    return (hessian + hessian.T) / 2


def _softmax_regression(keras):
    """4 -> 3 softmax, categorical cross-entropy, L2 on kernel and bias: 15 weights, H > 0
    (the penalties lift the directions softmax is invariant to)."""
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, activation="softmax", name="out",
                           kernel_regularizer=keras.regularizers.L2(0.01),
                           bias_regularizer=keras.regularizers.L2(0.01)),
    ])
    model.set_weights([RNG.normal(size=(4, 3)) * 0.5, RNG.normal(size=3) * 0.1])
    model.compile(loss="categorical_crossentropy")
    x = RNG.normal(size=(11, 4)) * np.array([2.0, 1.0, 0.7, 0.3])
    y = np.eye(3)[RNG.integers(0, 3, size=11)]
    return model, x, y


def _tanh_mlp(keras):
    """3 -> 4 tanh -> 2 linear, mse: 26 weights. Large weights and far targets make the
    residual term of H outweigh its Gauss-Newton part in some directions (H indefinite)."""
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", name="hidden"),
        keras.layers.Dense(2, name="head"),
    ])
    rng = np.random.default_rng(2)
    model.set_weights([rng.normal(size=(3, 4)) * 1.5, rng.normal(size=4) * 0.5,
                       rng.normal(size=(4, 2)) * 1.5, rng.normal(size=2) * 0.5])
    model.compile(loss="mse")
    x = rng.normal(size=(10, 3))
    y = rng.normal(size=(10, 2)) * 3.0
    return model, x, y


def _assert_same(got: dict, expected: dict) -> None:
    """Equal to 1e-6 of the largest entry: float64 throughout on TensorFlow (1e-15 seen),
    some float32 ops on JAX and torch (1e-7 of the largest entry seen)."""
    got, expected = _flat(got), _flat(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def _uneven(x, y, sizes=(5, 2, 4)):
    """(x, y) as a generator of batches of the given sizes."""
    edges = np.cumsum((0,) + sizes)
    return ((x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:]))


def _assert_pairs(result, hessian: np.ndarray, expected: np.ndarray) -> None:
    """Values within EIG_RTOL of `expected`; unit vectors with small residuals."""
    np.testing.assert_allclose(result.values, expected, rtol=EIG_RTOL, atol=0)
    scale = np.abs(np.linalg.eigvalsh(hessian)).max()
    for vector, residual, value in zip(result.vectors, result.residuals, result.values):
        v = _flat(vector)
        assert abs(np.linalg.norm(v) - 1) < 1e-6
        assert residual < 1e-3 * scale
        assert np.linalg.norm(hessian @ v - value * v) < 1e-3 * scale


# ----------------------------------------------------------------------------- hvp_over


def test_hvp_over_uneven_batches_equals_one_batch(keras, float64):
    model, x, y = _tanh_mlp(keras)
    vector = {k: RNG.normal(size=g.shape) for k, g in gk.gradients(model, x, y).items()}
    expected = gk.hvp(model, x, y, vector=vector)
    got = gk.hvp_over(model, _uneven(x, y), vector=vector)
    assert list(got) == list(expected)
    assert all(got[k].dtype == expected[k].dtype == np.float64 for k in expected)
    _assert_same(got, expected)
    _assert_same(gk.hvp_over(model, (x, y), vector=vector, batch_size=4), expected)


def test_hvp_over_target_is_the_sum(keras, float64):
    model, x, _ = _tanh_mlp(keras)
    vector = {k: RNG.normal(size=g.shape) for k, g in gk.gradients(model, x, target=0).items()}
    expected = gk.hvp(model, x, target=0, vector=vector)
    got = gk.hvp_over(model, (x,), vector=vector, target=0, batch_size=3)
    _assert_same(got, expected)


def test_hvp_over_refuses_a_summed_loss(keras):
    model, x, y = _tanh_mlp(keras)
    model.compile(loss=keras.losses.MeanSquaredError(reduction="sum"))
    vector = {k: np.ones(g.shape) for k, g in gk.gradients(model, x, y).items()}
    with pytest.raises(gk.InvalidArgumentError, match="sum_over_batch_size"):
        gk.hvp_over(model, (x, y), vector=vector)


# ----------------------------------------------------------------------------- eigenvalues


def test_extreme_eigenvalues_match_the_dense_hessian(keras, float64):
    model, x, y = _softmax_regression(keras)
    hessian = _dense_hessian(model, x, y)
    values, vectors = np.linalg.eigh(hessian)
    assert values[0] > 0

    top = gk.hessian_eigenvalues(model, _uneven(x, y, (4, 4, 3)), k=2, tol=1e-8)
    _assert_pairs(top, hessian, values[::-1][:2])
    for got, expected in zip(top.vectors, vectors[:, ::-1].T):
        assert abs(_flat(got) @ expected) > 0.999  # the top pair is well separated
    assert top.hvps > 2
    assert re.fullmatch(r"HessianEigen\(values=\[.*\], max_residual=.*, hvps=\d+\)",
                        repr(top))

    bottom = gk.hessian_eigenvalues(model, (x, y), which="smallest", tol=1e-8)
    _assert_pairs(bottom, hessian, values[:1])


def test_negative_curvature_is_found(keras, float64):
    model, x, y = _tanh_mlp(keras)
    hessian = _dense_hessian(model, x, y)
    values, vectors = np.linalg.eigh(hessian)
    assert values[0] < -1e-3 * abs(values).max(), "the reference H must be indefinite"

    smallest = gk.hessian_eigenvalues(model, (x, y), which="smallest", tol=1e-8)
    assert smallest.values[0] < 0
    _assert_pairs(smallest, hessian, values[:1])
    assert abs(_flat(smallest.vectors[0]) @ vectors[:, 0]) > 0.999

    magnitude = gk.hessian_eigenvalues(model, (x, y), which="magnitude", k=2, tol=1e-8)
    _assert_pairs(magnitude, hessian, values[np.argsort(-np.abs(values))][:2])


def test_eigensolver_out_of_budget_says_what_to_do(keras):
    model, x, y = _tanh_mlp(keras)
    with pytest.raises(gk.NotConvergedError, match=r"within 3 Hessian-vector products.*"
                                                   r"max_hvps=.*Received: max_hvps=3, hvps=3$"):
        gk.hessian_eigenvalues(model, (x, y), which="smallest", max_hvps=3)


# ----------------------------------------------------------------------------- trace


def test_trace_estimators_are_unbiased(keras, float64):
    model, x, y = _tanh_mlp(keras)
    exact = np.trace(_dense_hessian(model, x, y))
    for method in ("hutchinson", "hutch++"):
        estimates = [gk.hessian_trace(model, (x, y), samples=12, method=method, seed=s)
                     for s in range(20)]
        values = np.array([e.estimate for e in estimates])
        spread = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean() - exact) < 3 * spread + 1e-9 * abs(exact), method
        assert all(e.standard_error > 0 for e in estimates)


def test_hutch_plus_plus_beats_hutchinson_with_dominant_eigenvalues(keras, float64):
    """Dense(3) on 12 inputs, mse: H = (2 / 3N) XᵀX per output (39 weights); two input
    directions 10x larger than the rest give 6 dominant eigenvalues."""
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="out")])
    model.compile(loss="mse")
    x = RNG.normal(size=(20, 12)) * np.r_[10.0, 10.0, np.ones(10)]
    y = RNG.normal(size=(20, 3))
    exact = np.trace(_dense_hessian(model, x, y))
    errors = {"hutchinson": [], "hutch++": []}
    for seed in range(5):
        for method, error in errors.items():
            estimate = gk.hessian_trace(model, (x, y), samples=30, method=method, seed=seed)
            error.append(estimate.standard_error)
            assert abs(estimate.estimate - exact) < 5 * estimate.standard_error + 1e-6 * exact
    assert np.mean(errors["hutch++"]) < 0.5 * np.mean(errors["hutchinson"])  # measured: 0.21


def test_hutch_plus_plus_is_exact_when_the_sketch_spans_every_weight(keras, float64):
    model, x, y = _softmax_regression(keras)  # 15 weights, a sketch of 15
    exact = np.trace(_dense_hessian(model, x, y))
    estimate, error = gk.hessian_trace(model, (x, y), samples=45, seed=0)
    assert error == 0.0
    np.testing.assert_allclose(estimate, exact, rtol=1e-6)  # float32 ops on JAX, torch


# ----------------------------------------------------------------------------- contracts


def test_no_model_state_changes(keras):
    model, x, y = trained_stateful_model(keras)
    before = state_snapshot(model)
    vector = {k: np.ones_like(g) for k, g in gk.gradients(model, x, y).items()}
    gk.hvp_over(model, _uneven(x, y, (3, 5)), vector=vector)
    gk.hessian_eigenvalues(model, (x, y), k=1, tol=1e-3)
    gk.hessian_trace(model, (x, y), samples=6, seed=0)
    assert_same_state(before, state_snapshot(model))


@pytest.mark.parametrize("call, received", [
    (lambda m, d: gk.hessian_eigenvalues(m, d, k=0), "k=0"),
    (lambda m, d: gk.hessian_eigenvalues(m, d, k=2.0), "k=2.0"),
    (lambda m, d: gk.hessian_eigenvalues(m, d, k=26), "k=26, weights=26"),
    (lambda m, d: gk.hessian_eigenvalues(m, d, which="top"), "which='top'"),
    (lambda m, d: gk.hessian_eigenvalues(m, d, tol=0), "tol=0"),
    (lambda m, d: gk.hessian_eigenvalues(m, d, max_hvps=0), "max_hvps=0"),
    (lambda m, d: gk.hessian_trace(m, d, samples=5), "samples=5"),
    (lambda m, d: gk.hessian_trace(m, d, method="hutchinson", samples=1), "samples=1"),
    (lambda m, d: gk.hessian_trace(m, d, method="exact"), "method='exact'"),
    (lambda m, d: gk.hvp_over(m, d, vector=[1.0]), "vector='list'"),
])
def test_bad_arguments_raise(keras, call, received):
    model, x, y = _tanh_mlp(keras)
    with pytest.raises(gk.InvalidArgumentError, match=re.escape(f"Received: {received}") + "$"):
        call(model, (x, y))


# ------------------------------------------------------------ target= and training= options


def test_target_gives_the_hessian_of_the_summed_score(keras, float64):
    model, x, _ = _tanh_mlp(keras)
    hessian = _dense_hessian(model, x, target=0)  # one batch: H of Σ_i outputs[i, 0]
    values = np.linalg.eigvalsh(hessian)
    top = gk.hessian_eigenvalues(model, ((x[a:b],) for a, b in ((0, 6), (6, 10))), target=0,
                                 which="magnitude", tol=1e-8)
    _assert_pairs(top, hessian, values[np.argsort(-np.abs(values))][:1])
    trace = gk.hessian_trace(model, (x,), target=0, samples=3 * len(values), seed=0,
                             batch_size=4)  # a sketch over every weight: exact
    np.testing.assert_allclose(trace.estimate, np.trace(hessian), rtol=1e-6)


def test_training_uses_batch_statistics(keras, flavour, float64):
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, use_bias=False, name="d1"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Activation("tanh"),
        keras.layers.Dense(2, name="head")])
    model.set_weights([RNG.normal(size=tuple(v.shape)) * 0.8 for v in model.weights])
    model.get_layer("bn").moving_variance.assign(np.ones(4))
    model.compile(loss="mse")
    x, y = RNG.normal(size=(6, 3)) * 2 + 1, RNG.normal(size=(6, 2))
    if flavour in ("tensorflow", "tf_keras"):  # refused as by hvp: TF's moments op
        with pytest.raises(gk.InvalidArgumentError, match=r"'bn'.*training=False"):
            gk.hessian_eigenvalues(model, (x, y), training=True)
        return
    hessian = _dense_hessian(model, x, y, training=True)
    values = np.linalg.eigvalsh(hessian)
    assert np.abs(values - np.linalg.eigvalsh(_dense_hessian(model, x, y))).max() \
        > 1e-2 * np.abs(values).max()  # batch statistics really change H
    top = gk.hessian_eigenvalues(model, (x, y), training=True, tol=1e-8)
    _assert_pairs(top, hessian, values[::-1][:1])
    trace = gk.hessian_trace(model, (x, y), training=True, samples=3 * len(values), seed=0)
    np.testing.assert_allclose(trace.estimate, np.trace(hessian), rtol=1e-6)
