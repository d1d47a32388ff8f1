"""The compiled loss exactly as `fit` differentiates it: one SGD step of fit is w - lr * g.

Each case is checked against `fit` itself (one step of plain SGD on one batch) and, where the
model is linear, against a hand computation.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import to_numpy

RNG = np.random.default_rng(1)
LR = 0.5


def _ops(keras, flavour):
    """square/mean/sum on tensors of this flavour."""
    return keras.backend if flavour == "tf_keras" else keras.ops


def _trainable(model) -> list[np.ndarray]:
    return [to_numpy(v) for v in model.trainable_variables]


def fit_step_matches(model, x, y=None, sample_weight=None, rtol=1e-4, atol=1e-5):
    """One fit step with SGD(LR) on one batch moves the weights by exactly -LR * gradients."""
    grads = gk.gradients(model, x, y, sample_weight=sample_weight, training=True)
    before = _trainable(model)
    size = len(x[0] if isinstance(x, list) else next(iter(x.values())) if isinstance(x, dict)
               else x)
    model.fit(x, y, sample_weight=sample_weight, batch_size=size, epochs=1, shuffle=False,
              verbose=0)
    after = _trainable(model)
    assert len(grads) == len(before)
    for (key, g), w0, w1 in zip(grads.items(), before, after):
        np.testing.assert_allclose((w0 - w1) / LR, g, rtol=rtol, atol=atol, err_msg=key)
    return grads


def _linear(keras, n_in=3, n_out=2, **dense_kwargs):
    inputs = keras.Input((n_in,), name="x")
    outputs = keras.layers.Dense(n_out, use_bias=False, name="dense", **dense_kwargs)(inputs)
    model = keras.Model(inputs, outputs)
    w = RNG.normal(size=(n_in, n_out)).astype("float32")
    model.get_layer("dense").set_weights([w])
    return model, w


def _data(n=6, n_in=3, n_out=2):
    return (RNG.normal(size=(n, n_in)).astype("float32"),
            RNG.normal(size=(n, n_out)).astype("float32"))


def test_fit_step_batchnorm_mlp(keras):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh", name="d1"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(3, name="d2"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    x, y = _data(8, 4, 3)
    grads = fit_step_matches(model, x, y)
    assert any("gamma" in k for k in grads) and any("beta" in k for k in grads)


def test_training_true_uses_batch_statistics(keras):
    # With BatchNorm, training=True normalizes with the batch's own statistics, so the
    # gradient differs from inference mode (moving mean 0, variance 1 at initialization).
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(1, name="d")])
    model.compile(loss="mse")
    x, y = _data(6, 3, 1)
    x = x * 3 + 2
    train = gk.gradients(model, x, y, training=True)
    infer = gk.gradients(model, x, y, training=False)
    kernel = [k for k in train if k.endswith("d/kernel")][0]
    assert not np.allclose(train[kernel], infer[kernel], rtol=1e-2)
    # In inference mode the BatchNorm is the identity (up to epsilon): a linear model.
    w = model.get_layer("d").get_weights()
    scale = 1 / np.sqrt(1 + 1e-3)
    r = scale * x @ w[0] + w[1] - y
    np.testing.assert_allclose(infer[kernel], 2 / 6 * scale * x.T @ r, rtol=1e-4, atol=1e-5)


def test_sample_weight_hand_and_fit(keras):
    # L = 1/N sum_i sw_i mean_j (x_i W - y_i)_j^2  =>  dW = 2/(N*out) X^T diag(sw) (XW - y).
    model, w = _linear(keras)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    x, y = _data()
    sw = np.array([1.0, 0.0, 2.0, 0.5, 1.5, 3.0], "float32")
    expected = 2 / (6 * 2) * x.T @ (sw[:, None] * (x @ w - y))
    grads = fit_step_matches(model, x, y, sample_weight=sw)
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def test_kernel_regularizer_hand_and_fit(keras):
    # L2(c) adds c * sum(W^2)  =>  dW gains 2 c W.
    model, w = _linear(keras, kernel_regularizer=keras.regularizers.L2(0.1))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    x, y = _data()
    expected = 2 / (6 * 2) * x.T @ (x @ w - y) + 2 * 0.1 * w
    grads = fit_step_matches(model, x, y)
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def _penalty_layer(keras, ops, c):
    class Penalty(keras.layers.Layer):
        """Identity that adds c * sum(inputs^2) to the model's losses."""

        def call(self, inputs):
            self.add_loss(c * ops.sum(ops.square(inputs)))
            return inputs

    return Penalty(name="penalty")


def test_add_loss_hand_and_fit(keras, flavour):
    # out = XW; L = mse + c * sum(out^2)  =>  dW = 2/(N*out) X^T (XW - y) + 2c X^T XW.
    c = 0.05
    inputs = keras.Input((3,), name="x")
    dense = keras.layers.Dense(2, use_bias=False, name="dense")(inputs)
    outputs = _penalty_layer(keras, _ops(keras, flavour), c)(dense)
    model = keras.Model(inputs, outputs)
    w = RNG.normal(size=(3, 2)).astype("float32")
    model.get_layer("dense").set_weights([w])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    x, y = _data()
    expected = 2 / (6 * 2) * x.T @ (x @ w - y) + 2 * c * x.T @ (x @ w)
    grads = fit_step_matches(model, x, y)
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def test_activity_regularizer_matches_fit(keras):
    # Keras 3 and tf-keras scale activity regularization differently; fit is the reference.
    model, _ = _linear(keras, activity_regularizer=keras.regularizers.L2(0.05))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    fit_step_matches(model, *_data())


@pytest.mark.parametrize("as_dict", [False, True])
def test_two_outputs_loss_weights_match_fit(keras, as_dict):
    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    o1 = keras.layers.Dense(2, name="o1")(hidden)
    o2 = keras.layers.Dense(1, activation="sigmoid", name="o2")(hidden)
    model = keras.Model(inputs, {"o1": o1, "o2": o2} if as_dict else [o1, o2])
    losses = {"o1": "mse", "o2": "binary_crossentropy"} if as_dict else [
        "mse", "binary_crossentropy"]
    weights = {"o1": 0.3, "o2": 2.0} if as_dict else [0.3, 2.0]
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss=losses,
                  loss_weights=weights)
    x = RNG.normal(size=(6, 3)).astype("float32")
    y1 = RNG.normal(size=(6, 2)).astype("float32")
    y2 = RNG.integers(0, 2, size=(6, 1)).astype("float32")
    fit_step_matches(model, x, {"o1": y1, "o2": y2} if as_dict else [y1, y2])


def _mse_reference(x, y, w):
    return 2 / (len(x) * y.shape[1]) * x.T @ (x @ w - y)


@pytest.mark.parametrize("kind", ["name", "instance", "per_example_fn", "scalar_fn"])
def test_loss_argument_forms(keras, flavour, kind):
    ops = _ops(keras, flavour)
    loss = {
        "name": "mse",
        "instance": keras.losses.MeanSquaredError(),
        "per_example_fn": lambda t, p: ops.mean(ops.square(t - p), axis=-1),
        "scalar_fn": lambda t, p: ops.mean(ops.square(t - p)),
    }[kind]
    model, w = _linear(keras)  # not compiled: loss= is the only loss
    x, y = _data()
    grads = gk.gradients(model, x, y, loss=loss)
    np.testing.assert_allclose(grads["dense/kernel"], _mse_reference(x, y, w),
                               rtol=1e-5, atol=1e-6)


def test_loss_argument_replaces_compiled_loss_keeps_regularizers(keras):
    model, w = _linear(keras, kernel_regularizer=keras.regularizers.L2(0.1))
    model.compile(loss="mae")
    x, y = _data()
    grads = gk.gradients(model, x, y, loss="mse")
    np.testing.assert_allclose(grads["dense/kernel"], _mse_reference(x, y, w) + 0.2 * w,
                               rtol=1e-5, atol=1e-6)


def test_loss_argument_with_sample_weight(keras):
    model, w = _linear(keras)
    x, y = _data()
    sw = np.array([1.0, 0.0, 2.0, 0.5, 1.5, 3.0], "float32")
    grads = gk.gradients(model, x, y, loss="mse", sample_weight=sw)
    expected = 2 / (6 * 2) * x.T @ (sw[:, None] * (x @ w - y))
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def test_target_ignores_regularizers_and_compiled_loss(keras):
    model, _ = _linear(keras, kernel_regularizer=keras.regularizers.L2(10.0))
    model.compile(loss="mse")
    x, _ = _data()
    grads = gk.gradients(model, x, target=0)
    expected = np.zeros((3, 2))
    expected[:, 0] = x.sum(0)
    np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def test_recompiling_with_another_loss_is_seen(keras):
    # A cached trace must not keep differentiating the loss of an earlier compile().
    model, w = _linear(keras)
    x, y = _data()
    model.compile(loss="mse")
    first = gk.gradients(model, x, y)
    model.compile(loss="mae")
    second = gk.gradients(model, x, y)
    np.testing.assert_allclose(first["dense/kernel"], _mse_reference(x, y, w), rtol=1e-5,
                               atol=1e-6)
    mae = x.T @ np.sign(x @ w - y) / (len(x) * y.shape[1])
    np.testing.assert_allclose(second["dense/kernel"], mae, rtol=1e-5, atol=1e-6)


def test_new_callables_each_call_are_each_honoured(keras):
    model, _ = _linear(keras)
    x, _ = _data()
    for k in range(2):
        grads = gk.gradients(model, x, target=lambda out: out[:, k])  # noqa: B023
        expected = np.zeros((3, 2))
        expected[:, k] = x.sum(0)
        np.testing.assert_allclose(grads["dense/kernel"], expected, rtol=1e-5, atol=1e-6)


def test_one_compiled_loss_for_two_outputs_matches_fit(keras):
    inputs = keras.Input((3,), name="x")
    o1 = keras.layers.Dense(2, name="o1")(inputs)
    o2 = keras.layers.Dense(2, name="o2")(inputs)
    model = keras.Model(inputs, [o1, o2])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    x, y1 = _data()
    fit_step_matches(model, x, [y1, RNG.normal(size=(6, 2)).astype("float32")])


def test_compiled_without_loss_differentiates_add_loss_alone(keras, flavour):
    # compile(loss=None) with an add_loss model: fit minimizes c * sum(out^2); no y needed.
    c = 0.05
    inputs = keras.Input((3,), name="x")
    dense = keras.layers.Dense(2, use_bias=False, name="dense")(inputs)
    model = keras.Model(inputs, _penalty_layer(keras, _ops(keras, flavour), c)(dense))
    w = RNG.normal(size=(3, 2)).astype("float32")
    model.get_layer("dense").set_weights([w])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR))
    x, _ = _data()
    grads = fit_step_matches(model, x)
    np.testing.assert_allclose(grads["dense/kernel"], 2 * c * x.T @ (x @ w), rtol=1e-5,
                               atol=1e-6)
