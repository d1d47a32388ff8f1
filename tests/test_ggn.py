"""gradkit.ggn_vp / ggn_vp_over and matrix="ggn" against references built by hand.

References: the closed-form Hessian of a linear model with mse (where G = H), a float64 NumPy
Jᵀ H_L J for a softmax regression (J and H_L derived by hand), and Jᵀ H_L J with J from
central differences of the model's outputs (BatchNorm in training mode). Every flavour
checks itself against the same references, so the flavours agree with each other too.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import assert_same_state, state_snapshot, to_numpy, trained_stateful_model

RNG = np.random.default_rng(23)
# Central differences of float64 outputs: (eps, rtol); see FD in test_hvp.py (JAX and torch
# run some ops of a float64 model in float32).
FD = {"tensorflow": (1e-5, 1e-6), "tf_keras": (1e-5, 1e-6),
      "jax": (3e-3, 5e-4), "torch": (3e-3, 5e-4)}


def _flat(grads: dict) -> np.ndarray:
    return np.concatenate([np.ravel(g) for g in grads.values()]).astype(np.float64)


def _unflat(flat: np.ndarray, template: dict) -> dict:
    out, start = {}, 0
    for key, g in template.items():
        out[key] = flat[start:start + g.size].reshape(g.shape).astype(g.dtype)
        start += g.size
    return out


def _dense(product, template: dict) -> np.ndarray:
    """The matrix of `product` (gradient set -> gradient set), column j from basis vector j."""
    size = sum(g.size for g in template.values())
    return np.stack([_flat(product(_unflat(np.eye(size)[j], template)))
                     for j in range(size)], axis=1)


def _softmax_regression(keras):
    """4 -> 3 softmax (probabilities out), categorical cross-entropy, L2 on the kernel."""
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, activation="softmax", name="out",
                           kernel_regularizer=keras.regularizers.L2(0.1)),
    ])
    model.set_weights([RNG.normal(size=(4, 3)) * 0.5, RNG.normal(size=3) * 0.1])
    model.compile(loss="categorical_crossentropy")
    x = RNG.normal(size=(7, 4))
    y = np.eye(3)[RNG.integers(0, 3, size=7)]
    return model, x, y


def _tanh_mlp(keras):
    """3 -> 4 tanh -> 2, mse, far targets: an indefinite Hessian (see test_curvature.py)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2)])
    rng = np.random.default_rng(2)
    model.set_weights([rng.normal(size=(3, 4)) * 1.5, rng.normal(size=4) * 0.5,
                       rng.normal(size=(4, 2)) * 1.5, rng.normal(size=2) * 0.5])
    model.compile(loss="mse")
    return model, rng.normal(size=(10, 3)), rng.normal(size=(10, 2)) * 3.0


# ----------------------------------------------------------------------------- references


def test_linear_mse_equals_the_closed_form_hessian(keras):
    # z = Xa Wa, L = 1/(N*O) ||Xa Wa - Y||^2: G = H = 2/(N*O) kron(Xaᵀ Xa, I_O).
    n, n_in, n_out = 6, 4, 3
    model = keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(n_out, name="d")])
    model.compile(loss="mse")
    x = RNG.normal(size=(n, n_in)).astype("float32")
    y = RNG.normal(size=(n, n_out)).astype("float32")
    xa = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
    expected = 2.0 / (n * n_out) * np.kron(xa.T @ xa, np.eye(n_out))
    vector = {k: RNG.normal(size=g.shape).astype("float32")
              for k, g in gk.gradients(model, x, y).items()}

    got = gk.ggn_vp(model, x, y, vector=vector)

    assert ["/".join(k.split("/")[-2:]) for k in got] == ["d/kernel", "d/bias"]
    assert all(g.dtype == np.float32 and g.shape == vector[k].shape for k, g in got.items())
    reference = expected @ _flat(vector)
    np.testing.assert_allclose(_flat(got), reference, rtol=1e-5,
                               atol=1e-5 * np.abs(reference).max())


def test_softmax_regression_against_numpy(keras, float64):
    # p_i = softmax(z_i), z_i = W x_i + b; dp/dz = S_i = diag(p_i) - p_i p_iᵀ;
    # J_i = S_i [kron(x_iᵀ, I_3), I_3] over (W row-major, b). Keras' cross-entropy on
    # probabilities is ℓ(p) = -Σ y_k log(p_k / Σp), so H_ℓ = diag(y / p²) - 11ᵀ at Σp = 1.
    # G = (1/N) Σ_i J_iᵀ H_ℓ,i J_i; the L2 penalty is not part of G.
    model, x, y = _softmax_regression(keras)
    w, b = (to_numpy(v).astype(np.float64) for v in model.trainable_variables)
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.zeros((15, 15))
    for xi, pi, yi in zip(x, p, y):
        jac = (np.diag(pi) - np.outer(pi, pi)) @ np.hstack([np.kron(xi, np.eye(3)), np.eye(3)])
        expected += jac.T @ (np.diag(yi / pi**2) - np.ones((3, 3))) @ jac / len(x)
    template = gk.gradients(model, x, y)

    dense = _dense(lambda v: gk.ggn_vp(model, x, y, vector=v), template)

    np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert np.linalg.eigvalsh((dense + dense.T) / 2).min() > -1e-6 * np.abs(expected).max()
    hessian = _dense(lambda v: gk.hvp(model, x, y, vector=v), template)
    assert np.abs(hessian - dense).max() > 0.05 * np.abs(dense).max()  # G is not H here


def test_psd_where_the_hessian_is_indefinite(keras, float64):
    model, x, y = _tanh_mlp(keras)
    template = gk.gradients(model, x, y)
    hessian = _dense(lambda v: gk.hvp(model, x, y, vector=v), template)
    ggn = _dense(lambda v: gk.ggn_vp(model, x, y, vector=v), template)
    scale = np.abs(ggn).max()
    np.testing.assert_allclose(ggn, ggn.T, rtol=0, atol=1e-6 * scale)
    assert np.linalg.eigvalsh((hessian + hessian.T) / 2).min() < -1e-3 * scale
    assert np.linalg.eigvalsh((ggn + ggn.T) / 2).min() > -1e-6 * scale
    for _ in range(3):  # vᵀ G v ≥ 0 along random directions, in float32 as well
        v = RNG.normal(size=ggn.shape[0])
        assert v @ ggn @ v > 0


def test_batchnorm_training_against_finite_difference_jacobian(keras, flavour, float64):
    # Allowed on every backend (TensorFlow too): G needs only first derivatives of the
    # network. With batch statistics J couples the examples; mse: H_L = 2/(N*O) I.
    eps, rtol = FD[flavour]
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, use_bias=False, name="d1"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Activation("tanh"),
        keras.layers.Dense(2, name="head")])
    model.set_weights([RNG.normal(size=tuple(v.shape)) * 0.8 for v in model.weights])
    model.get_layer("bn").moving_variance.assign(np.ones(4))
    model.compile(loss="mse")
    x, y = RNG.normal(size=(5, 3)) * 2 + 1, RNG.normal(size=(5, 2))
    variables = model.trainable_variables
    columns = []
    for variable in variables:
        value = to_numpy(variable)
        for j in range(value.size):
            sides = []
            for step in (eps, -eps):
                moved = value.copy()
                moved.flat[j] += step
                variable.assign(moved)
                sides.append(to_numpy(model(x, training=True)).ravel())
            variable.assign(value)
            columns.append((sides[0] - sides[1]) / (2 * eps))
    jac = np.stack(columns, axis=1)
    vector = {k: RNG.normal(size=g.shape) for k, g in gk.gradients(model, x, y).items()}
    expected = 2.0 / y.size * jac.T @ (jac @ _flat(vector))

    got = gk.ggn_vp(model, x, y, vector=vector, training=True)

    assert ["/".join(k.split("/")[-2:]) for k in got] == ["d1/kernel", "bn/gamma", "bn/beta",
                                                  "head/kernel", "head/bias"]
    np.testing.assert_allclose(_flat(got), expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max())


def test_through_embedding_and_lstm_against_finite_differences(keras, flavour, float64):
    # mse: wᵀ G v = 2/(N*O) (J w)ᵀ (J v), each J·u a central difference of the outputs.
    eps, rtol = FD[flavour]
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(7, 3),
                              keras.layers.LSTM(4), keras.layers.Dense(2)])
    model.compile(loss="mse")
    x, y = RNG.integers(0, 7, size=(4, 5)), RNG.normal(size=(4, 2))
    template = gk.gradients(model, x, y)
    v, w = ({k: RNG.normal(size=g.shape) for k, g in template.items()} for _ in range(2))
    values = [to_numpy(t) for t in model.trainable_variables]

    def jvp(u):
        sides = []
        for step in (eps, -eps):
            for t, value, key in zip(model.trainable_variables, values, template):
                t.assign(value + step * u[key])
            sides.append(to_numpy(model(x)).ravel())
        for t, value in zip(model.trainable_variables, values):
            t.assign(value)
        return (sides[0] - sides[1]) / (2 * eps)

    jv, jw = jvp(v), jvp(w)
    got = _flat(gk.ggn_vp(model, x, y, vector=v))
    for direction, expected in ((v, jv @ jv), (w, jw @ jv)):
        np.testing.assert_allclose(_flat(direction) @ got, 2.0 / y.size * expected,
                                   rtol=rtol, atol=rtol * 2.0 / y.size * (jv @ jv))


# ------------------------------------------------------------------------------- datasets


def test_over_a_dataset_and_its_spectrum(keras, float64):
    model, x, y = _tanh_mlp(keras)
    template = gk.gradients(model, x, y)
    ggn = _dense(lambda v: gk.ggn_vp(model, x, y, vector=v), template)
    ggn = (ggn + ggn.T) / 2
    vector = {k: RNG.normal(size=g.shape) for k, g in template.items()}

    over = gk.ggn_vp_over(model, (x, y), vector=vector, batch_size=4)  # batches 4, 4, 2

    assert list(over) == list(template)
    np.testing.assert_allclose(_flat(over), ggn @ _flat(vector), rtol=1e-6,
                               atol=1e-6 * np.abs(ggn).max())
    values = np.linalg.eigvalsh(ggn)
    top = gk.hessian_eigenvalues(model, (x, y), matrix="ggn", k=2, tol=1e-8)
    np.testing.assert_allclose(top.values, values[::-1][:2], rtol=1e-4)
    trace = gk.hessian_trace(model, (x, y), matrix="ggn", samples=3 * ggn.shape[0], seed=0)
    assert trace.standard_error == 0.0  # the sketch spans every weight: exact
    np.testing.assert_allclose(trace.estimate, np.trace(ggn), rtol=1e-6)


# ------------------------------------------------------------------------------- contracts


def test_refusals_say_what_to_do(keras):
    model, x, y = _tanh_mlp(keras)
    with pytest.raises(gk.InvalidArgumentError, match=r"target= score.*Received: target=0"):
        gk.hessian_eigenvalues(model, (x,), target=0, matrix="ggn")
    with pytest.raises(gk.InvalidArgumentError, match=r"matrix= must be.*Received: matrix="):
        gk.hessian_trace(model, (x, y), matrix="fisher")
    bare = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    bare.compile()  # no loss on the outputs
    with pytest.raises(gk.InvalidArgumentError, match=r"without a loss.*Received: loss=None"):
        gk.ggn_vp(bare, x, y, vector={})


def test_no_state_changes(keras):
    model, x, y = trained_stateful_model(keras)
    before = state_snapshot(model)
    vector = {k: np.ones_like(g) for k, g in gk.gradients(model, x, y).items()}
    gk.ggn_vp(model, x, y, vector=vector, training=True)  # BatchNorm, dropout, Adam, a metric
    gk.ggn_vp_over(model, (x, y), vector=vector, training=True)  # one batch: the same trace
    assert_same_state(before, state_snapshot(model))
