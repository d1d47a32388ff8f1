"""`check_gradients`: no false alarm over a zoo of built-in layers, and it catches injected
bugs (a custom gradient with the wrong sign, one missing a 1/N factor, a stop_gradient that
should not be there); the user's model is untouched. Every flavour."""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import FLAVOUR, assert_same_state, state_snapshot, trained_stateful_model

BUGS = ("none", "sign", "one_over_n", "stop_gradient")


def _image_zoo(keras):
    """Conv2D, DepthwiseConv2D, SeparableConv2D, Conv2DTranspose, BatchNormalization,
    GroupNormalization, AveragePooling2D, MaxPooling2D, GlobalAveragePooling2D, Dense."""
    L = keras.layers
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same", activation="tanh")(inputs)
    h = L.DepthwiseConv2D(3, padding="same")(h)
    h = L.SeparableConv2D(3, 3, activation="sigmoid")(h)
    h = L.Conv2DTranspose(2, 2, strides=2)(h)
    h = L.BatchNormalization()(h)
    h = L.GroupNormalization(groups=1)(h) if hasattr(L, "GroupNormalization") else h
    h = L.AveragePooling2D(2)(h)
    h = L.MaxPooling2D(2)(h)
    outputs = L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(3, 6, 6, 2)).astype("float32"), np.array([0, 2, 1])


def _sequence_zoo(keras):
    """Embedding, Conv1D, LayerNormalization, MultiHeadAttention, SimpleRNN, LSTM, GRU,
    Dropout (inference), EinsumDense (Keras 3), Dense with an L2 regularizer."""
    L = keras.layers
    tokens = keras.Input((4,), dtype="int32")
    h = L.Embedding(7, 3)(tokens)
    h = L.Conv1D(3, 2, padding="same", activation="gelu" if FLAVOUR != "tf_keras" else "elu")(h)
    h = L.LayerNormalization()(h)
    h = L.MultiHeadAttention(2, 2)(h, h)
    h = L.SimpleRNN(3, return_sequences=True)(h)
    h = L.LSTM(2, return_sequences=True)(h)
    h = L.Dropout(0.5)(L.GRU(2)(h))
    if hasattr(L, "EinsumDense"):
        h = L.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c")(h)
    outputs = L.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1))(h)
    model = keras.Model(tokens, outputs)
    model.compile(loss="mse")
    rng = np.random.default_rng(1)
    return (model, rng.integers(0, 7, size=(3, 4)).astype("int32"),
            rng.normal(size=(3, 2)).astype("float32"))


@pytest.mark.filterwarnings("ignore:check_gradients:RuntimeWarning")
@pytest.mark.parametrize("build", [_image_zoo, _sequence_zoo])
def test_no_false_alarm_over_a_zoo_of_layers(keras, build):
    model, x, y = build(keras)
    report = gk.check_gradients(model, x, y, directions=1, seed=0)
    assert report.ok, str(report)
    assert list(report.variables) == list(gk.gradients(model, x, y))
    verdicts = list(report.verdicts().values())
    # kinks (max pooling) may be "not smooth"; most variables must be a clear "ok"
    assert verdicts.count("ok") >= 0.8 * len(verdicts), str(report)


def _bugged_layer(keras, flavour):
    """A layer out = f(x, w) = x * w / n (n = features) with a hand-written gradient, or
    x * w * stop_gradient(w) * 2 / n: `bug` picks what is wrong with it."""
    if flavour == "tf_keras":
        import tensorflow as tf

        ops, custom_gradient = tf.math, tf.custom_gradient
        reduce_sum, stop_gradient = tf.reduce_sum, tf.stop_gradient
    else:
        ops, custom_gradient = keras.ops, keras.ops.custom_gradient
        reduce_sum, stop_gradient = keras.ops.sum, keras.ops.stop_gradient

    class Bugged(keras.layers.Layer):
        def __init__(self, bug="none", **kwargs):
            super().__init__(**kwargs)
            self.bug = bug

        def build(self, input_shape):
            self.w = self.add_weight(name="w", shape=(input_shape[-1],),
                                     initializer=keras.initializers.RandomUniform(0.5, 1.5))

        def call(self, x):
            n, bug = float(x.shape[-1]), self.bug
            if bug == "stop_gradient":  # d/dw (x w² / n) = 2 x w / n: the stop loses half
                return x * self.w * stop_gradient(self.w) / n

            @custom_gradient
            def scaled(x, w):
                def grad(*args, upstream=None):
                    if upstream is None:
                        (upstream,) = args
                    dw = reduce_sum(upstream * x, axis=0) / (1.0 if bug == "one_over_n" else n)
                    return upstream * w / n, -dw if bug == "sign" else dw

                return x * w / n, grad

            return scaled(x, ops.multiply(self.w, 1.0))

        def get_config(self):
            return {**super().get_config(), "bug": self.bug}

    return Bugged


@pytest.mark.filterwarnings("ignore:check_gradients:RuntimeWarning")
def test_catches_injected_gradient_bugs(keras, flavour):
    Bugged = _bugged_layer(keras, flavour)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    found = {}
    for bug in BUGS:
        inputs = keras.Input((4,))
        hidden = Bugged(bug, name="bugged")(keras.layers.Dense(3, activation="tanh")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
        model.compile(loss="mse")
        report = gk.check_gradients(model, x, y, layers="bugged", directions=2, seed=1)
        (check,) = report.variables.values()
        found[bug] = (check.verdict, report.ok, check.relative_error)
    assert found["none"][:2] == ("ok", True), found
    for bug in BUGS[1:]:
        assert found[bug][:2] == ("mismatch", False), found
        assert found[bug][2] > 0.3, found  # off by a sign, a factor n=3 or a half


@pytest.mark.filterwarnings("ignore:check_gradients:RuntimeWarning")
def test_the_model_is_untouched(keras, flavour):
    model, x, y = trained_stateful_model(keras)
    before = state_snapshot(model)
    policies = [str(getattr(layer, "dtype_policy", layer.dtype)) for layer in model.layers]
    dtypes = [str(v.dtype) for v in model.weights]
    floatx = keras.backend.floatx()
    report = gk.check_gradients(model, x, y, directions=1, seed=0)
    assert report.ok, str(report)
    assert_same_state(before, state_snapshot(model))
    assert [str(v.dtype) for v in model.weights] == dtypes
    assert [str(getattr(layer, "dtype_policy", layer.dtype)) for layer in model.layers] \
        == policies
    assert keras.backend.floatx() == floatx
    if flavour == "jax":
        import jax

        assert not jax.config.jax_enable_x64
    text = str(report)
    assert all(key in text for key in gk.gradients(model, x, y))
    assert "[" not in text  # a table of numbers, never an array


def test_bad_arguments(keras):
    model, x, y = trained_stateful_model(keras)
    with pytest.raises(gk.InvalidArgumentError, match="directions"):
        gk.check_gradients(model, x, y, directions=0)


# pytest.warns re-emits, from this file, the DeprecationWarning Keras 3's own Variable.numpy()
# raises on JAX and torch (NumPy 2's __array__ copy keyword)
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_a_model_that_cannot_be_copied_is_checked_in_place(keras, flavour, monkeypatch):
    """A subclassed model without get_config: checked on itself in float32 (warned), a wrong
    gradient still caught, its weights bitwise as before, even when the check fails midway."""
    Bugged = _bugged_layer(keras, flavour)

    class Opaque(keras.Model):
        def __init__(self, bug):
            super().__init__()
            self.dense = keras.layers.Dense(3, activation="tanh")
            self.bugged = Bugged(bug, name="bugged")

        def call(self, inputs):
            return self.bugged(self.dense(inputs))

    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4)).astype("float32")
    y = rng.normal(size=(5, 3)).astype("float32")
    for bug, verdict in (("none", "ok"), ("sign", "mismatch")):
        model = Opaque(bug)
        model(x[:1])
        model.compile(loss="mse")
        model.evaluate(x, y, verbose=0)  # tf-keras builds its compiled loss's tracker lazily
        before = state_snapshot(model)
        with pytest.warns(RuntimeWarning, match="clone_model could not copy.*restored bitwise"):
            report = gk.check_gradients(model, x, y, directions=2, seed=1)
        assert report.precision == "float32"
        assert report.variables[gk.gradients(model, x, y, layers="bugged").popitem()[0]
                                ].verdict == verdict, str(report)
        assert_same_state(before, state_snapshot(model))

    import gradkit._check as check

    def broken(variable, origin, *args):  # moves a weight, then fails
        variable.assign(origin + 1.0)
        raise RuntimeError("midway")

    monkeypatch.setattr(check, "_differences", broken)
    with pytest.raises(RuntimeError, match="midway"), pytest.warns(RuntimeWarning):
        gk.check_gradients(model, x, y)
    assert_same_state(before, state_snapshot(model))
