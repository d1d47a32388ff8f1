"""Compiled once: on TensorFlow and tf-keras, new batch sizes reuse the traced function.

Tracing runs the model's Python code; eager replays of a traced function do not. A layer that
counts its Python calls therefore counts traces, whatever gradkit's cache looks like inside.
(JAX compiles one XLA program per input shape by design; torch runs eagerly.)
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk

pytestmark = pytest.mark.flavours("tensorflow", "tf_keras")


def _counting_model(keras, calls):
    class Counting(keras.layers.Layer):
        def call(self, inputs):
            calls.append(1)  # runs only while tracing
            return inputs

    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    joined = keras.layers.Concatenate(name="cat")([Counting(name="count")(a), b])
    outputs = keras.layers.Dense(2, name="dense")(joined)
    model = keras.Model({"a": a, "b": b}, outputs)
    model.compile(loss="mse")
    return model


def _batch(n, rng):
    x = {"a": rng.normal(size=(n, 3)).astype("float32"),
         "b": rng.normal(size=(n, 2)).astype("float32")}
    return x, rng.normal(size=(n, 2)).astype("float32"), rng.uniform(size=n).astype("float32")


@pytest.mark.parametrize("kwargs", [{}, {"training": True}, {"layers": "dense"}])
def test_no_retrace_across_batch_sizes(keras, kwargs):
    calls: list = []
    model = _counting_model(keras, calls)
    rng = np.random.default_rng(0)
    x, y, sw = _batch(4, rng)
    gk.gradients(model, x, y, sample_weight=sw, **kwargs)
    traced = len(calls)
    assert traced >= 1
    for n in (3, 5, 7, 9, 1, 16):
        x, y, sw = _batch(n, rng)
        grads = gk.gradients(model, x, y, sample_weight=sw, **kwargs)
        assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert len(calls) == traced, f"retraced {len(calls) - traced} time(s)"


def test_results_after_reuse_match_a_fresh_trace(keras):
    # The reused trace must compute with the new batch, not replay the old one.
    calls: list = []
    model = _counting_model(keras, calls)
    rng = np.random.default_rng(1)
    x4, y4, _ = _batch(4, rng)
    x6, y6, _ = _batch(6, rng)
    gk.gradients(model, x4, y4)
    reused = gk.gradients(model, x6, y6)
    fresh_model = _counting_model(keras, [])
    fresh_model.set_weights(model.get_weights())
    fresh = gk.gradients(fresh_model, x6, y6)
    for a, b in zip(reused.values(), fresh.values()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
