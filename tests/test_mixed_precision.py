"""Mixed precision: the result is the true, unscaled float32 gradient.

A model under "mixed_float16" computes in float16 and its LossScaleOptimizer multiplies the
loss by 2**15 before differentiating; gradkit must divide that back out. References: the same
weights in a float32 model (loose tolerance: float16 arithmetic), and fit's own update.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import to_numpy

RNG = np.random.default_rng(2)
LR = 0.5


@pytest.fixture
def policy(keras, flavour):
    """Set a global dtype policy for one test and always restore the default."""
    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)

    yield set_policy
    # tf-keras: None is the default (follow floatx); an explicit "float32" would outlive
    # the test and override a later set_floatx. Keras 3's clear_session resets it anyway.
    keras.mixed_precision.set_global_policy(None if flavour == "tf_keras" else "float32")


def _mlp(keras):
    model = keras.Sequential(name="mlp", layers=[
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh", name="d1"),
        keras.layers.Dense(3, name="d2"),
        keras.layers.Activation("linear", dtype="float32", name="out"),
    ])
    return model


def _data():
    return (RNG.normal(size=(6, 4)).astype("float32"),
            RNG.normal(size=(6, 3)).astype("float32"))


def _float32_reference(keras, weights, x, y):
    model = _mlp(keras)
    model.set_weights(weights)
    model.compile(loss="mse")
    return gk.gradients(model, x, y)


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_float32_model(keras, policy, name):
    x, y = _data()
    policy(name)
    model = _mlp(keras)
    optimizer = keras.optimizers.SGD(learning_rate=LR)
    if name == "mixed_float16":
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="mse")
    weights = model.get_weights()

    grads = gk.gradients(model, x, y)

    policy("float32")
    reference = _float32_reference(keras, weights, x, y)
    assert list(grads) == list(reference)
    for key, g in grads.items():
        assert g.dtype == np.float32, key
        tolerance = 2e-2 if name == "mixed_float16" else 1e-1  # float16 / bfloat16 rounding
        np.testing.assert_allclose(g, reference[key], rtol=tolerance,
                                   atol=tolerance * np.abs(reference[key]).max(), err_msg=key)


def test_loss_scaled_fit_step_is_w_minus_lr_g(keras, policy):
    x, y = _data()
    policy("mixed_float16")
    model = _mlp(keras)
    optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=LR))
    model.compile(optimizer=optimizer, loss="mse")
    scale = optimizer.loss_scale if hasattr(optimizer, "loss_scale") else (  # tf-keras
        optimizer.scale_loss(1.0))  # Keras 3
    assert float(to_numpy(scale)) > 1  # the loss really is scaled: unscaling is a real check

    grads = gk.gradients(model, x, y, training=True)
    before = [to_numpy(v) for v in model.trainable_variables]
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    after = [to_numpy(v) for v in model.trainable_variables]

    for (key, g), w0, w1 in zip(grads.items(), before, after):
        assert g.dtype == np.float32
        np.testing.assert_allclose((w0 - w1) / LR, g, rtol=1e-3, atol=1e-4, err_msg=key)
