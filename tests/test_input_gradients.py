"""gradkit.input_gradients against finite differences and closed forms, on every flavour.

The finite-difference reference runs the same small network written in NumPy (float64), so
it shares nothing with the code under test but the weights.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import assert_same_state, state_snapshot, trained_stateful_model

RNG = np.random.default_rng(3)


def _mlp(keras, n_in=3, hidden=4, n_out=2):
    """x -> tanh(x W1 + b1) W2 + b2, with known weights; returns (model, weights)."""
    inputs = keras.Input((n_in,), name="x")
    h = keras.layers.Dense(hidden, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(n_out, name="head")(h)
    model = keras.Model(inputs, outputs)
    weights = [RNG.normal(size=(n_in, hidden)), RNG.normal(size=hidden) * 0.1,
               RNG.normal(size=(hidden, n_out)), RNG.normal(size=n_out) * 0.1]
    weights = [w.astype("float32") for w in weights]
    model.get_layer("hidden").set_weights(weights[:2])
    model.get_layer("head").set_weights(weights[2:])
    return model, [w.astype("float64") for w in weights]


def _forward(weights, x):
    w1, b1, w2, b2 = weights
    return np.tanh(x @ w1 + b1) @ w2 + b2


def _finite_differences(f, x, eps=1e-6):
    """d f(x) / d x for a scalar function f of a float64 array, by central differences."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


def test_compiled_mse_against_finite_differences(keras):
    model, weights = _mlp(keras)
    model.compile(loss="mse")
    x = RNG.normal(size=(5, 3)).astype("float32")
    y = RNG.normal(size=(5, 2)).astype("float32")

    grads = gk.input_gradients(model, x, y)

    def mse(xx):  # Keras mse: mean over the last axis, then over the batch
        return np.mean((_forward(weights, xx) - y) ** 2)

    assert grads.shape == x.shape and grads.dtype == np.float32
    expected = _finite_differences(mse, x.astype("float64"))
    np.testing.assert_allclose(grads, expected, rtol=1e-4, atol=1e-6)


def test_mean_loss_row_is_one_nth_of_the_examples_own_gradient(keras):
    model, _ = _mlp(keras)
    model.compile(loss="mse")
    x = RNG.normal(size=(4, 3)).astype("float32")
    y = RNG.normal(size=(4, 2)).astype("float32")

    grads = gk.input_gradients(model, x, y)

    for i in range(4):
        own = gk.input_gradients(model, x[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(grads[i:i + 1], own / 4, rtol=1e-5, atol=1e-7)


def test_target_gives_each_row_its_own_score_gradient(keras):
    model, weights = _mlp(keras)
    x = RNG.normal(size=(4, 3)).astype("float32")

    grads = gk.input_gradients(model, x, target=1)

    for i in range(4):
        expected = _finite_differences(lambda xi: _forward(weights, xi[None])[0, 1],
                                       x[i].astype("float64"))
        np.testing.assert_allclose(grads[i], expected, rtol=1e-4, atol=1e-6)


def test_rows_do_not_mix(keras):
    model, _ = _mlp(keras)
    x = RNG.normal(size=(5, 3)).astype("float32")
    changed = x.copy()
    changed[2] = RNG.normal(size=3) * 10

    before = gk.input_gradients(model, x, target=0)
    after = gk.input_gradients(model, changed, target=0)

    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(after[keep], before[keep], rtol=1e-6, atol=1e-7)
    assert not np.allclose(after[2], before[2])


def _two_inputs(keras):
    """out = concat(a, b) @ W + c: the gradient of out[:, k] is W[:, k] split by input."""
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    joined = keras.layers.Concatenate(name="join")([a, b])
    out = keras.layers.Dense(2, name="head")(joined)
    model = keras.Model([a, b], out)
    w = RNG.normal(size=(5, 2)).astype("float32")
    model.get_layer("head").set_weights([w, np.zeros(2, "float32")])
    return model, w


@pytest.mark.parametrize("as_dict", [False, True])
def test_multi_input_mirrors_x_with_sample_weight(keras, as_dict):
    model, w = _two_inputs(keras)
    a = RNG.normal(size=(4, 3)).astype("float32")
    b = RNG.normal(size=(4, 2)).astype("float32")
    sw = np.array([1.0, 2.0, 0.0, 0.5], "float32")
    x = {"a": a, "b": b} if as_dict else [a, b]

    grads = gk.input_gradients(model, x, target=1, sample_weight=sw)

    ga, gb = (grads["a"], grads["b"]) if as_dict else grads
    assert isinstance(grads, dict if as_dict else list)
    np.testing.assert_allclose(ga, sw[:, None] * w[:3, 1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, sw[:, None] * w[3:, 1], rtol=1e-6, atol=1e-7)


def test_input_the_objective_ignores_gets_zeros(keras):
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    model = keras.Model([a, b], [keras.layers.Dense(1, name="da")(a),
                                 keras.layers.Dense(1, name="db")(b)])
    x = [RNG.normal(size=(3, 3)).astype("float32"), RNG.normal(size=(3, 2)).astype("float32")]

    ga, gb = gk.input_gradients(model, x, target=lambda outputs: outputs[0][:, 0])

    kernel = model.get_layer("da").get_weights()[0][:, 0]
    np.testing.assert_allclose(ga, np.tile(kernel, (3, 1)), rtol=1e-6)
    np.testing.assert_array_equal(gb, np.zeros((3, 2), "float32"))


def test_training_true_changes_no_state(keras):
    model, x, y = trained_stateful_model(keras)
    before = state_snapshot(model)

    grads = gk.input_gradients(model, x, y, training=True)

    assert grads.shape == x.shape and np.all(np.isfinite(grads))
    assert_same_state(before, state_snapshot(model))


def test_float64_inputs_give_float64_gradients(keras, flavour, float64):
    model, w = _two_inputs(keras)
    a, b = RNG.normal(size=(2, 3)), RNG.normal(size=(2, 2))

    ga, gb = gk.input_gradients(model, [a, b], target=0)

    assert ga.dtype == np.float64 and gb.dtype == np.float64
    np.testing.assert_allclose(ga, np.tile(w[:3, 0], (2, 1)), rtol=1e-6)


def test_integer_inputs_point_to_the_embedding_layer(keras):
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(10, 3, name="emb"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])
    ids = RNG.integers(0, 10, size=(2, 5)).astype("int32")
    with pytest.raises(gk.InvalidArgumentError,
                       match=r"(?s)int32.*activation_gradients.*'emb'.*Received: "):
        gk.input_gradients(model, ids, target=0)


def test_token_ids_next_to_float_inputs_get_none(keras):
    """Token ids and float features in one model: the features' gradient (against the
    closed form of a linear head), None for the ids."""
    L = keras.layers
    ids, feats = keras.Input((5,), dtype="int32", name="ids"), keras.Input((3,), name="feats")
    pooled = L.GlobalAveragePooling1D()(L.Embedding(10, 4, name="emb")(ids))
    head = L.Dense(1, name="head")
    model = keras.Model({"ids": ids, "feats": feats}, head(L.Concatenate()([pooled, feats])))
    x = {"ids": RNG.integers(0, 10, size=(4, 5)).astype("int32"),
         "feats": RNG.normal(size=(4, 3)).astype("float32")}
    grads = gk.input_gradients(model, x, target=0)
    kernel = np.asarray(keras.ops.convert_to_numpy(head.kernel)) if hasattr(keras, "ops") \
        else head.kernel.numpy()
    assert grads["ids"] is None
    # target=0 sums the scores: d score_i / d feats_i = the head's weights on the features
    np.testing.assert_allclose(grads["feats"], np.tile(kernel[4:, 0], (4, 1)), rtol=1e-6)


def test_uncompiled_model_without_loss_or_target_is_a_clear_error(keras):
    model, _ = _mlp(keras)
    with pytest.raises(gk.InvalidArgumentError, match=r"not compiled.*Received: "):
        gk.input_gradients(model, np.ones((2, 3), "float32"), np.ones((2, 2), "float32"))


def test_token_ids_given_as_floats_point_to_the_embedding_layer(keras):
    """`keras.Input((5,))` (float) in front of an Embedding: the layer casts the ids to
    integers, so the input reaches the objective through no differentiable op; every flavour
    (JAX included: an integer value carries no derivative in its dependency walk) says so
    instead of returning zeros."""
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Embedding(10, 3, name="emb"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])
    model.compile(loss="mse")
    ids = RNG.integers(0, 10, size=(2, 5)).astype("float32")
    with pytest.raises(gk.InvalidArgumentError,
                       match=r"(?s)No float input.*activation_gradients.*'emb'.*Received: "):
        gk.input_gradients(model, ids, np.zeros((2, 2), "float32"))
    out = gk.activation_gradients(model, ids, np.zeros((2, 2), "float32"), layers="emb")
    assert next(iter(out.values())).shape == (2, 5, 3)
