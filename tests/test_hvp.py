"""gradkit.hvp against closed forms, dense finite-difference Hessians and the other flavours.

References: Hessians derived by hand (linear models; a one-hidden-layer network under
target=), dense Hessians built column by column from central differences of
`gradients()` (float64 models), and the same weights on TensorFlow, JAX, torch and tf-keras.
Nothing here compares against numbers hvp printed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gradkit as gk
from conftest import (
    assert_same_state,
    state_snapshot,
    to_numpy,
    trained_stateful_model,
)

RNG = np.random.default_rng(5)

# Central differences of float64 gradients: (eps, relative tolerance). TensorFlow and tf-keras
# compute a float64 model in float64 throughout (gradients exact to ~1e-16). Keras 3 on JAX
# and torch runs some ops of a float64 model in float32 (on JAX keras.ops.tanh of a float64
# NumPy input and ops.mean, on torch matmul: ~1e-7 relative, measured; see also
# test_gradients.test_float64_model_gives_float64_gradients), and that rounding, divided
# by 2 * eps, is the error of the difference quotient; a larger eps balances it against the
# eps**2 truncation error (measured errors there: 1e-5 to 1e-4), with a looser tolerance.
FD = {"tensorflow": (1e-5, 1e-6), "tf_keras": (1e-5, 1e-6),
      "jax": (3e-3, 5e-4), "torch": (3e-3, 5e-4)}


# ----------------------------------------------------------------------------- helpers


def _flat(grads: dict) -> np.ndarray:
    return np.concatenate([np.ravel(g) for g in grads.values()]).astype(np.float64)


def _random_like(grads: dict, scale: float = 1.0) -> dict:
    return {k: (RNG.normal(size=g.shape) * scale).astype(g.dtype) for k, g in grads.items()}


def _slices(grads: dict) -> dict[str, slice]:
    """Where each key's entries sit in `_flat(grads)`."""
    out, start = {}, 0
    for key, g in grads.items():
        out[key] = slice(start, start + g.size)
        start += g.size
    return out


def _fd_hessian(model, x, y=None, *, eps: float, **kwargs) -> np.ndarray:
    """The dense Hessian over all trainable variables: column j is the central difference of
    `gradients()` along weight j. Symmetrized (the true Hessian is), halving the noise."""
    variables = model.trainable_variables
    values = [to_numpy(v) for v in variables]
    columns = []
    try:
        for variable, value in zip(variables, values):
            for j in range(value.size):
                sides = []
                for step in (eps, -eps):
                    moved = value.copy()
                    moved.flat[j] += step
                    variable.assign(moved)
                    sides.append(_flat(gk.gradients(model, x, y, **kwargs)))
                columns.append((sides[0] - sides[1]) / (2 * eps))
            variable.assign(value)
    finally:
        for variable, value in zip(variables, values):
            variable.assign(value)
    hessian = np.stack(columns, axis=1)
    return (hessian + hessian.T) / 2


def _assert_close(got: dict, expected: np.ndarray, rtol: float, what: str = "") -> None:
    """`got` (a gradient set) equals the flat `expected`, relative to the size of `expected`:
    as a whole, and entry by entry with an absolute floor of rtol * max|expected|."""
    flat = _flat(got)
    scale = np.linalg.norm(expected)
    assert scale > 1e-3, f"{what}: a degenerate reference"
    error = np.linalg.norm(flat - expected) / scale
    assert error < rtol, f"{what}: relative error {error:.2e} >= {rtol:.0e}"
    np.testing.assert_allclose(flat, expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max(), err_msg=what)


def _set_random_weights(model, scale: float = 0.5) -> None:
    model.set_weights([RNG.normal(size=tuple(v.shape)) * scale for v in model.weights])


def _mlp(keras):
    """3 -> 4 (tanh, L2 regularizer) -> 3 (softmax), categorical cross-entropy: 31 weights."""
    inputs = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, activation="tanh", name="hidden",
                           kernel_regularizer=keras.regularizers.L2(0.05))(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs)
    _set_random_weights(model, 0.8)
    model.compile(loss="categorical_crossentropy")
    x = RNG.normal(size=(6, 3))
    y = np.eye(3)[RNG.integers(0, 3, size=6)]
    return model, x, y


def _cnn(keras):
    """5x5x1 -> Conv2D(2, 3x3, tanh) -> Flatten -> Dense(2), mse: 58 weights."""
    inputs = keras.Input((5, 5, 1), name="image")
    h = keras.layers.Conv2D(2, 3, activation="tanh", name="conv")(inputs)
    h = keras.layers.Flatten(name="flat")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    _set_random_weights(model, 0.5)
    model.compile(loss="mse")
    x = RNG.normal(size=(4, 5, 5, 1))
    y = RNG.normal(size=(4, 2))
    return model, x, y


def _linear(keras, n_in, n_out, *, bias):
    inputs = keras.Input((n_in,), name="x")
    outputs = keras.layers.Dense(n_out, use_bias=bias, name="dense")(inputs)
    return keras.Model(inputs, outputs)


# ----------------------------------------------------------------------- closed forms


def test_linear_mse_closed_form(keras):
    # Keras' mse averages over the batch AND the last axis: with z = X W + b and
    # Xa = [X, 1], Wa = [W; b],  L = 1/(N*O) * ||Xa Wa - Y||^2, so
    #   d2L / dWa[a,k] dWa[c,l] = 2/(N*O) * (Xa^T Xa)[a,c] * delta(k,l),
    # i.e. H = 2/(N*O) * kron(Xa^T Xa, I_O) over Wa flattened row-major = [W.ravel(), b].
    n, n_in, n_out = 6, 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    y = RNG.normal(size=(n, n_out)).astype("float32")
    model = _linear(keras, n_in, n_out, bias=True)
    model.get_layer("dense").set_weights([RNG.normal(size=(n_in, n_out)),
                                          RNG.normal(size=n_out)])
    model.compile(loss="mse")
    xa = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
    hessian = 2.0 / (n * n_out) * np.kron(xa.T @ xa, np.eye(n_out))

    grads = gk.gradients(model, x, y)
    for vector in (grads, _random_like(grads)):  # the documented use, and any direction
        got = gk.hvp(model, x, y, vector=vector)
        assert list(got) == list(grads) == ["dense/kernel", "dense/bias"]
        assert all(g.dtype == np.float32 and g.shape == vector[k].shape
                   for k, g in got.items())
        _assert_close(got, hessian @ _flat(vector), 1e-5, "linear mse")


def test_target_closed_form(keras):
    # target=k differentiates f = sum_i sum_j t_ij W2[j,k], t = tanh(X W1), s = 1 - t^2:
    #   (H v)_W1 = X^T((-2 t s) * (X V1) * W2[:,k]) + (X^T s) * V2[:,k],
    #   (H v)_W2[:, l] = delta(l,k) * sum_i s_i * (X V1)_i.
    n, n_in, hidden, n_out, k = 5, 3, 4, 2, 1
    inputs = keras.Input((n_in,), name="x")
    h = keras.layers.Dense(hidden, activation="tanh", use_bias=False, name="hidden")(inputs)
    outputs = keras.layers.Dense(n_out, use_bias=False, name="head")(h)
    model = keras.Model(inputs, outputs)
    w1, w2 = RNG.normal(size=(n_in, hidden)) * 0.7, RNG.normal(size=(hidden, n_out))
    model.set_weights([w1, w2])
    x = RNG.normal(size=(n, n_in)).astype("float32")
    v1, v2 = RNG.normal(size=(n_in, hidden)), RNG.normal(size=(hidden, n_out))

    got = gk.hvp(model, x, target=k, vector={"hidden/kernel": v1, "head/kernel": v2})

    x64, w1, w2 = x.astype(np.float64), w1.astype("float32").astype(np.float64), \
        w2.astype("float32").astype(np.float64)
    t = np.tanh(x64 @ w1)
    s = 1 - t**2
    xv = x64 @ v1
    hv1 = x64.T @ (-2 * t * s * xv * w2[:, k]) + (x64.T @ s) * v2[:, k]
    hv2 = np.zeros((hidden, n_out))
    hv2[:, k] = (s * xv).sum(0)
    assert list(got) == ["hidden/kernel", "head/kernel"]
    _assert_close(got, np.concatenate([hv1.ravel(), hv2.ravel()]), 1e-5, "target")


def test_loss_argument_closed_form(keras):
    # loss= replaces the compiled mse by softmax cross-entropy on logits z = X W:
    #   d2L / dW[a,k] dW[c,l] = 1/N sum_i x_ia x_ic (diag(p_i) - p_i p_i^T)[k,l], so
    #   (H v)_W = X^T A / N with U = X V, A_i = p_i * u_i - p_i (p_i . u_i).
    # Without loss= it stays the compiled mse: 2/(N*C) X^T X V.
    n, n_in, n_classes = 8, 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    y = np.eye(n_classes, dtype="float32")[RNG.integers(0, n_classes, size=n)]
    model = _linear(keras, n_in, n_classes, bias=False)
    w = (RNG.normal(size=(n_in, n_classes)) * 0.5).astype("float32")
    model.set_weights([w])
    model.compile(loss="mse")
    v = RNG.normal(size=(n_in, n_classes)).astype("float32")

    got = gk.hvp(model, x, y, vector={"dense/kernel": v},
                 loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    compiled = gk.hvp(model, x, y, vector={"dense/kernel": v})

    x64, v64 = x.astype(np.float64), v.astype(np.float64)
    z = x64 @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = x64 @ v64
    a = p * u - p * (p * u).sum(1, keepdims=True)
    _assert_close(got, (x64.T @ a / n).ravel(), 1e-5, "loss=cross-entropy")
    _assert_close(compiled, (2 / (n * n_classes) * x64.T @ x64 @ v64).ravel(), 1e-5,
                  "compiled mse")


# ------------------------------------------------- dense Hessians by finite differences


def test_mlp_against_finite_differences(keras, flavour, float64):
    eps, rtol = FD[flavour]
    model, x, y = _mlp(keras)
    hessian = _fd_hessian(model, x, y, eps=eps)
    grads = gk.gradients(model, x, y)
    assert all(g.dtype == np.float64 for g in grads.values())  # really a float64 model
    for vector in (grads, _random_like(grads)):
        got = gk.hvp(model, x, y, vector=vector)
        assert list(got) == list(grads)
        assert all(g.dtype == np.float64 for g in got.values())
        _assert_close(got, hessian @ _flat(vector), rtol, "mlp")


def test_cnn_against_finite_differences(keras, flavour, float64):
    eps, rtol = FD[flavour]
    model, x, y = _cnn(keras)
    hessian = _fd_hessian(model, x, y, eps=eps)
    grads = gk.gradients(model, x, y)
    vector = _random_like(grads)
    got = gk.hvp(model, x, y, vector=vector)
    assert list(got) == list(grads) == ["conv/kernel", "conv/bias", "head/kernel",
                                        "head/bias"]
    assert all(g.dtype == np.float64 for g in got.values())
    _assert_close(got, hessian @ _flat(vector), rtol, "cnn")


def test_batchnorm_training_against_finite_differences(keras, flavour, float64):
    # In training mode BatchNorm normalizes with the batch statistics, and H includes their
    # dependence on the weights below. (A framework moments op that stops the gradient at
    # the mean still gets first derivatives right, but not second ones.)
    eps, rtol = FD[flavour]
    inputs = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, use_bias=False, name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh", name="tanh")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(loss="mse")
    _set_random_weights(model, 0.8)
    model.get_layer("bn").moving_variance.assign(np.ones(4))
    x, y = RNG.normal(size=(6, 3)) * 2 + 1, RNG.normal(size=(6, 2))
    vector = _random_like(gk.gradients(model, x, y, training=True))
    if flavour in ("tensorflow", "tf_keras"):  # refused: TF's moments op breaks H here
        with pytest.raises(gk.InvalidArgumentError, match=r"(?s)'bn'.*training=False.*Rec"):
            gk.hvp(model, x, y, vector=vector, training=True)
        return
    hessian = _fd_hessian(model, x, y, eps=eps, training=True)

    got = gk.hvp(model, x, y, vector=vector, training=True)

    assert list(got) == ["d1/kernel", "bn/gamma", "bn/beta", "head/kernel", "head/bias"]
    _assert_close(got, hessian @ _flat(vector), rtol, "batchnorm training")


def test_layers_gives_the_diagonal_block(keras, flavour, float64):
    eps, rtol = FD[flavour]
    model, x, y = _mlp(keras)
    hessian = _fd_hessian(model, x, y, eps=eps)
    where = _slices(gk.gradients(model, x, y))
    for layer in ("hidden", "head"):
        keys = [f"{layer}/kernel", f"{layer}/bias"]
        block = np.r_[where[keys[0]], where[keys[1]]]
        vector = _random_like(gk.gradients(model, x, y, layers=layer))
        assert list(vector) == keys

        got = gk.hvp(model, x, y, vector=vector, layers=layer)

        assert list(got) == keys
        _assert_close(got, hessian[np.ix_(block, block)] @ _flat(vector), rtol, layer)


# ------------------------------------------------------------------------ properties


def _mlp32(keras):
    model, x, y = _mlp(keras)  # floatx float32: the weights are cast on set_weights
    return model, x.astype("float32"), y.astype("float32")


def test_symmetric(keras):
    model, x, y = _mlp32(keras)
    grads = gk.gradients(model, x, y)
    v, w = _random_like(grads), _random_like(grads)
    hv, hw = gk.hvp(model, x, y, vector=v), gk.hvp(model, x, y, vector=w)
    v_hw, w_hv = _flat(v) @ _flat(hw), _flat(w) @ _flat(hv)
    bound = 1e-5 * np.linalg.norm(_flat(v)) * np.linalg.norm(_flat(hw))
    assert abs(v_hw - w_hv) < bound, (v_hw, w_hv)
    assert abs(v_hw) > 1e3 * bound  # not trivially zero


def test_linear_in_the_vector(keras):
    model, x, y = _mlp32(keras)
    grads = gk.gradients(model, x, y)
    v, w, a, b = _random_like(grads), _random_like(grads), 1.5, -0.25
    combined = {k: a * v[k] + b * w[k] for k in v}
    hv, hw = gk.hvp(model, x, y, vector=v), gk.hvp(model, x, y, vector=w)
    _assert_close(gk.hvp(model, x, y, vector=combined), a * _flat(hv) + b * _flat(hw), 1e-5,
                  "linearity")
    zero = gk.hvp(model, x, y, vector={k: np.zeros_like(g) for k, g in grads.items()})
    assert list(zero) == list(grads)
    assert all(not np.any(g) for g in zero.values())


# ----------------------------------------------------------------------------- state


def test_no_state_changes(keras, flavour):
    model, x, y = trained_stateful_model(keras)
    if flavour in ("tensorflow", "tf_keras"):  # hvp refuses BatchNorm in training there
        model.get_layer("bn").trainable = False
    before = state_snapshot(model)
    rng_before = None
    if flavour == "torch":  # unseeded dropout draws from torch's global generator
        import torch

        rng_before = torch.get_rng_state()
    vector = gk.gradients(model, x, y, training=True)

    infer = gk.hvp(model, x, y, vector=vector, training=False)
    train = gk.hvp(model, x, y, vector=vector, training=True, seed=5)
    again = gk.hvp(model, x, y, vector=vector, training=True, seed=5)
    gk.hvp(model, x[:5], y[:5], vector=vector, training=True)  # another batch size
    head = gk.gradients(model, x, target=1, layers="d2", training=True)
    gk.hvp(model, x, target=1, layers="d2", vector=head, training=True)

    assert_same_state(before, state_snapshot(model))
    if rng_before is not None:
        assert torch.equal(rng_before, torch.get_rng_state())
    key = next(k for k in infer if k.endswith("d1/kernel"))
    assert not np.allclose(infer[key], train[key])  # training=True really trains
    for k in train:  # one seed, one dropout mask
        np.testing.assert_array_equal(train[k], again[k], err_msg=k)


# ------------------------------------------------------------------------ bad vectors


def _bad_vector_cases(grads):
    first, *_ = grads
    yield "a list", list(grads.values()), r"vector= must be a gradient set.*Received: "
    missing = dict(grads)
    del missing[first]
    yield "a missing key", missing, rf"missing: \['{first}'\].*Received: "
    extra = dict(grads, **{"nowhere/kernel": np.zeros(3, "float32")})
    yield "an extra key", extra, r"not selected: \['nowhere/kernel'\].*Received: "
    wrong = dict(grads, **{first: np.zeros(grads[first].shape + (1,), "float32")})
    yield "a wrong shape", wrong, rf"vector\['{first}'\] has shape.*Received: "
    text = dict(grads, **{first: np.full(grads[first].shape, "a")})
    yield "a string array", text, rf"vector\['{first}'\].*real array.*Received: "


def test_bad_vector_raises(keras):
    model = _linear(keras, 3, 2, bias=True)
    model.compile(loss="mse")
    x, y = RNG.normal(size=(4, 3)).astype("float32"), RNG.normal(size=(4, 2)).astype("float32")
    grads = gk.gradients(model, x, y)
    for what, vector, message in _bad_vector_cases(grads):
        with pytest.raises(gk.GradkitError, match=message) as info:
            gk.hvp(model, x, y, vector=vector)
        assert isinstance(info.value, (ValueError, TypeError)), what
    # The whole-model vector is wrong for one layer: the other layer's keys are not selected.
    two = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="a"),
                            keras.layers.Dense(2, name="b")])
    two.compile(loss="mse")
    with pytest.raises(gk.GradkitError, match=r"not selected: \[.*a/kernel"):
        gk.hvp(two, x, y, vector=gk.gradients(two, x, y), layers="b")


# ---------------------------------------------------------------------- cross-backend

FLAVOURS = ("tensorflow", "jax", "torch", "tf_keras")


@pytest.fixture
def written(cross_flavour_results) -> Path:
    return cross_flavour_results  # written by tests/_cross_backend_worker.py


@pytest.mark.flavours("tensorflow")
@pytest.mark.parametrize("run", ("compiled_training", "compiled_inference", "target",
                                 "loss_layers"))
@pytest.mark.parametrize("other", ("tensorflow", "torch", "tf_keras"))
def test_same_hvp_on_every_flavour(written, run, other):
    if run == "compiled_training" and other in ("tensorflow", "tf_keras"):
        refused = (written / f"{other}-hvp-{run}.refused").read_text()
        assert "BatchNormalization" in refused and "Received: " in refused
        return
    reference = gk.load(written / f"jax-hvp-{run}.npz")  # TensorFlow refuses one run
    got = gk.load(written / f"{other}-hvp-{run}.npz")
    assert list(got) == list(reference)
    assert len(reference) == (2 if run == "loss_layers" else 7)
    for key, expected in reference.items():
        assert got[key].dtype == expected.dtype == np.float32, key
        assert got[key].shape == expected.shape, key
        assert np.linalg.norm(expected) > 1e-3, key  # a real product, not a zero vector
        error = np.linalg.norm(got[key] - expected) / np.linalg.norm(expected)
        assert error < 1e-5, \
            f"{key}: {other} and jax differ by {error:.2e} (relative, run {run})"
