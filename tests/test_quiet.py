"""Quiet in normal use: no framework warning leaks out of a gradkit call (torch's vmap
fallback and attention-kernel notes), and TensorFlow logs no retracing warning."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

import gradkit as gk


@pytest.mark.flavours("torch")
def test_no_torch_vmap_or_attention_warnings(keras):
    # (MultiHeadAttention under tf.vectorized_map is the TensorFlow crash of issue 9: torch only)
    inputs = keras.Input((4, 8))
    attended = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(attended)))
    model.compile(loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 4, 8)).astype("float32"), rng.normal(size=(3, 2)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norms = gk.per_example_norms(model, x, y)
        gk.gradients(model, x, y, training=True)
    assert norms.shape == (3,) and np.all(norms > 0)


@pytest.mark.flavours("tensorflow", "tf_keras")
def test_no_tensorflow_retracing_warnings(keras, caplog):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d1"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(2, name="d2")])
    model.compile(loss="mse")
    rng = np.random.default_rng(1)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for n in (2, 3, 5, 7, 11, 13, 4):  # batch sizes, seeds and calls vary
            x, y = rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 2))
            gk.gradients(model, x, y, training=True, seed=n)
            gk.gradients(model, x, y)
            gk.input_gradients(model, x, y)
            gk.per_example_norms(model, x, y)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


@pytest.mark.flavours("tensorflow", "tf_keras")
def test_short_fits_with_a_monitor_log_no_retracing_warning(keras, caplog):
    """Each fit with a GradientMonitor traces Keras' train step afresh (TensorFlow counts
    every tf.function of its code together): short fits in a loop must not read as retracing."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d1"),
                              keras.layers.Dense(2, name="d2")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 3)).astype("float32"), rng.normal(size=(12, 2))
    monitor = gk.GradientMonitor(every=2, writers=())
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(4):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
    np.testing.assert_array_equal(monitor.history["step"], np.arange(0, 12, 2))
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
