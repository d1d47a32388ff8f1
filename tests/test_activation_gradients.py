"""gradkit.activation_gradients against split models and closed forms, on every flavour.

References: the tail of a Sequential model (the layers after the chosen one, same weights)
differentiated with respect to its input; linear residual blocks, whose gradient has a
closed form; and probe models (keras.Model(inputs, layer.output)) for the activations.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from gradkit._select import layer_of, variable_key
from conftest import assert_same_state, state_snapshot, to_numpy, trained_stateful_model

RNG = np.random.default_rng(4)


def _acts(model, *args, **kwargs):
    """gk.activation_gradients with the keys the tests below name: a layer's key is the path
    its variables carry, which in a Keras 3 Sequential starts with the model's name (the
    key agreement itself is tested in test_norms.py)."""
    result = gk.activation_gradients(model, *args, **kwargs)

    def strip(d):
        return {k.removeprefix(model.name + "/"): v for k, v in d.items()}

    return tuple(map(strip, result)) if isinstance(result, tuple) else strip(result)


def _sequential(keras):
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", name="d1"),
        keras.layers.Dense(4, activation="sigmoid", name="d2"),
        keras.layers.Dense(2, name="d3"),
    ])
    model.compile(loss="mse")
    return model


def _tail(keras, model, after):
    """A Sequential of the layers after `after`, sharing nothing but copies of the weights."""
    names = [layer.name for layer in model.layers]
    rest = model.layers[names.index(after) + 1:]
    width = model.get_layer(after).get_weights()[0].shape[1]
    tail = keras.Sequential([keras.Input((width,))] + [
        keras.layers.Dense(layer.units, activation=layer.activation, name=layer.name + "_t")
        for layer in rest])
    for new, old in zip(tail.layers, rest):
        new.set_weights(old.get_weights())
    tail.compile(loss="mse")
    return tail


def _probe(keras, model, name):
    return keras.Model(model.inputs, model.get_layer(name).output)


@pytest.mark.parametrize("n", [5, 3])  # a second batch size reuses the compiled function
def test_sequential_split_at_each_layer(keras, n):
    model = _sequential(keras)
    x = RNG.normal(size=(n, 3)).astype("float32")
    y = RNG.normal(size=(n, 2)).astype("float32")

    grads, acts = _acts(model, x, y, layers=["d2", "d1"],
                                          return_activations=True)
    assert list(grads) == ["d2", "d1"] and list(acts) == ["d2", "d1"]
    for name in ("d1", "d2"):
        h = to_numpy(_probe(keras, model, name)(x))
        np.testing.assert_allclose(acts[name], h, rtol=1e-6, atol=1e-7)
        expected = gk.input_gradients(_tail(keras, model, name), h, y)
        assert grads[name].shape == h.shape and grads[name].dtype == np.float32
        np.testing.assert_allclose(grads[name], expected, rtol=1e-5, atol=1e-7)


def test_glob_selects_every_called_layer(keras):
    model, _, _ = _linear_residual(keras)  # its InputLayer "x" is never called: skipped
    x = RNG.normal(size=(2, 3)).astype("float32")

    every = _acts(model, x, layers="*", target=0)
    named = _acts(model, x, layers=["d1", "branch", "add", "head"], target=0)

    assert sorted(every) == sorted(named)
    for key in named:
        np.testing.assert_array_equal(every[key], named[key])


def test_target_rows_are_each_examples_own_score(keras):
    model = _sequential(keras)
    x = RNG.normal(size=(4, 3)).astype("float32")

    grads = _acts(model, x, layers="d1", target=0)["d1"]

    tail = _tail(keras, model, "d1")
    h = to_numpy(_probe(keras, model, "d1")(x))
    for i in range(4):
        np.testing.assert_allclose(grads[i:i + 1], gk.input_gradients(tail, h[i:i + 1], target=0),
                                   rtol=1e-5, atol=1e-7)


def _linear_residual(keras):
    """s = h + h W2 (linear branch), out = s W3: d out_k / d h = (I + W2) W3[:, k]."""
    x = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, name="d1")(x)
    r = keras.layers.Dense(4, use_bias=False, name="branch")(h)
    s = keras.layers.Add(name="add")([h, r])
    out = keras.layers.Dense(2, use_bias=False, name="head")(s)
    model = keras.Model(x, out)
    w2, w3 = RNG.normal(size=(4, 4)), RNG.normal(size=(4, 2))
    model.get_layer("branch").set_weights([w2.astype("float32")])
    model.get_layer("head").set_weights([w3.astype("float32")])
    return model, w2, w3


def test_residual_skip_connection_closed_form(keras):
    model, w2, w3 = _linear_residual(keras)
    x = RNG.normal(size=(3, 3)).astype("float32")

    grads = _acts(model, x, layers=["d1", "branch", "add"], target=1)

    through_both = (np.eye(4) + w2) @ w3[:, 1]
    np.testing.assert_allclose(grads["d1"], np.tile(through_both, (3, 1)), rtol=1e-5)
    np.testing.assert_allclose(grads["branch"], np.tile(w3[:, 1], (3, 1)), rtol=1e-6)
    np.testing.assert_allclose(grads["add"], np.tile(w3[:, 1], (3, 1)), rtol=1e-6)


def test_identity_layer_on_a_skip_path(keras):
    # Dropout at inference returns its input tensor itself; its output gradient must still
    # be that of its own output, not of the tensor it shares with the skip connection.
    x = keras.Input((3,), name="x")
    h = keras.layers.Dense(3, use_bias=False, name="d1")(x)
    dropped = keras.layers.Dropout(0.5, name="drop")(h)
    s = keras.layers.Add(name="add")([h, keras.layers.Dense(3, use_bias=False,
                                                            name="branch")(dropped)])
    model = keras.Model(x, keras.layers.Dense(1, use_bias=False, name="head")(s))
    w_branch = model.get_layer("branch").get_weights()[0]
    w_head = model.get_layer("head").get_weights()[0][:, 0]

    grads = _acts(model, np.ones((2, 3), "float32"),
                                    layers=["drop", "d1"], target=0)

    np.testing.assert_allclose(grads["drop"], np.tile(w_branch @ w_head, (2, 1)), rtol=1e-5)
    np.testing.assert_allclose(grads["d1"], np.tile(w_head + w_branch @ w_head, (2, 1)),
                               rtol=1e-5)


def _nested(keras):
    block = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(4, activation="tanh", name="inner_a"),
        keras.layers.Dense(3, name="inner_b"),
    ], name="block")
    x = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, activation="tanh", name="pre")(x)
    out = keras.layers.Dense(2, use_bias=False, name="head")(block(h))
    return keras.Model(x, out)


def test_layers_inside_a_nested_model(keras):
    model = _nested(keras)
    x = RNG.normal(size=(3, 3)).astype("float32")
    block = model.get_layer("block")

    grads, acts = _acts(model, x, layers=["block/inner_a", "block"],
                                          target=1, return_activations=True)

    # the key its variables carry: "block/inner_a" on Keras 3, "inner_a" on tf-keras
    key_a = layer_of(variable_key(block.get_layer("inner_a").trainable_variables[0]))
    grads["inner_a"], acts["inner_a"] = grads.pop(key_a), acts.pop(key_a)
    w_head = model.get_layer("head").get_weights()[0]
    np.testing.assert_allclose(grads["block"], np.tile(w_head[:, 1], (3, 1)), rtol=1e-6)
    h_pre = to_numpy(_probe(keras, model, "pre")(x))
    h_a = to_numpy(keras.Model(block.inputs, block.get_layer("inner_a").output)(h_pre))
    np.testing.assert_allclose(acts["inner_a"], h_a, rtol=1e-6, atol=1e-7)
    # d out_1 / d a = W_b @ W_head[:, 1]: inner_b and head are linear.
    w_b = block.get_layer("inner_b").get_weights()[0]
    np.testing.assert_allclose(grads["inner_a"], np.tile(w_b @ w_head[:, 1], (3, 1)),
                               rtol=1e-5)


def test_colliding_names_are_keyed_by_nested_path(keras):
    x = keras.Input((2,), name="x")
    inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="dense")],
                             name="inner")
    model = keras.Model(x, keras.layers.Dense(1, name="dense")(inner(x)))

    grads = _acts(model, np.ones((2, 2), "float32"),
                                    layers=["inner/dense", model.layers[-1], "inner"],
                                    target=0)

    assert list(grads) == ["inner/dense", "dense", "inner"]
    w = model.layers[-1].get_weights()[0][:, 0]
    np.testing.assert_allclose(grads["inner/dense"], np.tile(w, (2, 1)), rtol=1e-6)
    np.testing.assert_allclose(grads["dense"], np.ones((2, 1)))


def test_layers_of_a_subclassed_model(keras):
    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(3, activation="tanh", name="hidden")
            self.head = keras.layers.Dense(2, use_bias=False, name="head")

        def call(self, inputs):
            return self.head(self.hidden(inputs))

    model = Tiny()
    x = RNG.normal(size=(3, 4)).astype("float32")
    model(x[:1])

    grads = _acts(model, x, layers="hidden", loss="mse",
                                    y=np.zeros((3, 2), "float32"))

    # mse = mean((h W)^2) over 3 x 2 entries  =>  d/dh = 2 (h W) W^T / 6.
    w = model.head.get_weights()[0]
    h = np.tanh(x @ model.hidden.get_weights()[0] + model.hidden.get_weights()[1])
    np.testing.assert_allclose(grads["hidden"], 2 * (h @ w) @ w.T / 6, rtol=1e-4, atol=1e-6)


def _two_branches(keras):
    x = keras.Input((3,), name="x")
    left = keras.layers.Dense(2, name="left")(x)
    right = keras.layers.Dense(2, name="right")(x)
    return keras.Model(x, [left, right])


@pytest.mark.parametrize("mode", ["raise", "zero", "none"])
def test_unconnected_layer_modes(keras, mode):
    model = _two_branches(keras)
    x = RNG.normal(size=(3, 3)).astype("float32")
    first_output = lambda outputs: outputs[0][:, 0]  # noqa: E731

    if mode == "raise":
        with pytest.raises(gk.UnconnectedGradientError, match=r"right.*Received: "):
            _acts(model, x, layers=["left", "right"], target=first_output)
        return
    grads = _acts(model, x, layers=["left", "right"], target=first_output,
                                    unconnected=mode)
    np.testing.assert_allclose(grads["left"], np.tile([1.0, 0.0], (3, 1)))
    if mode == "zero":
        np.testing.assert_array_equal(grads["right"], np.zeros((3, 2), "float32"))
    else:
        assert grads["right"] is None


def test_embedding_output_of_integer_ids(keras):
    # mean over time of the embeddings, then a linear head: d out_k / d e_t = W[:, k] / T.
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(10, 3, name="emb"),
        keras.layers.GlobalAveragePooling1D(name="pool"),
        keras.layers.Dense(2, use_bias=False, name="head"),
    ])
    ids = RNG.integers(0, 10, size=(2, 5)).astype("int32")

    grads, acts = _acts(model, ids, layers="emb", target=1,
                                          return_activations=True)

    w = model.get_layer("head").get_weights()[0]
    np.testing.assert_allclose(grads["emb"], np.broadcast_to(w[:, 1] / 5, (2, 5, 3)), rtol=1e-6)
    table = model.get_layer("emb").get_weights()[0]
    np.testing.assert_allclose(acts["emb"], table[ids], rtol=1e-6)


def test_grad_cam_conv_feature_maps(keras):
    # global average pooling then a linear head: d out_k / d A[i, u, v, c] = W[c, k] / (H W).
    model = keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
        keras.layers.GlobalAveragePooling2D(name="gap"),
        keras.layers.Dense(4, use_bias=False, name="head"),
    ])
    x = RNG.normal(size=(2, 5, 5, 2)).astype("float32")

    grads, acts = _acts(model, x, layers="conv", target=3,
                                          return_activations=True)

    w = model.get_layer("head").get_weights()[0]
    np.testing.assert_allclose(grads["conv"], np.broadcast_to(w[:, 3] / 9, (2, 3, 3, 3)),
                               rtol=1e-6)
    probe = to_numpy(_probe(keras, model, "conv")(x))
    np.testing.assert_allclose(acts["conv"], probe, rtol=1e-5, atol=1e-6)


def test_training_true_changes_no_state_and_restores_the_layers(keras):
    model, x, y = trained_stateful_model(keras)
    before = state_snapshot(model)
    calls = {name: vars(model.get_layer(name)).get("call") for name in ("d1", "bn", "drop")}

    grads = _acts(model, x, y, layers=["d1", "bn", "drop"], training=True)

    assert [g.shape for g in grads.values()] == [(len(x), 6)] * 3  # Dense(6) width
    assert_same_state(before, state_snapshot(model))
    for name, call in calls.items():
        assert vars(model.get_layer(name)).get("call") is call


def test_shared_layer_is_a_clear_error_and_the_model_is_restored(keras):
    x = keras.Input((3,), name="x")
    shared = keras.layers.Dense(3, name="shared")
    model = keras.Model(x, keras.layers.Dense(1, name="head")(shared(shared(x))))
    data = RNG.normal(size=(2, 3)).astype("float32")
    expected = to_numpy(model(data))

    with pytest.raises(gk.InvalidArgumentError, match=r"'shared'.*more than once.*Received: "):
        _acts(model, data, layers="shared", target=0)

    assert "call" not in vars(shared)
    np.testing.assert_array_equal(to_numpy(model(data)), expected)


def test_clear_errors(keras):
    model = _sequential(keras)
    x = np.ones((2, 3), "float32")
    with pytest.raises(gk.UnknownLayerError, match=r"'d9'.*Did you mean.*Received: "):
        _acts(model, x, layers="d9", target=0)
    with pytest.raises(gk.InvalidArgumentError, match=r"layers= is required.*Received: "):
        _acts(model, x, layers=None, target=0)
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    with pytest.raises(gk.InvalidArgumentError, match=r"not compiled.*Received: "):
        _acts(uncompiled, x, np.ones((2, 2)), layers="d")


def test_input_layer_points_to_input_gradients(keras):
    model, _, _ = _linear_residual(keras)
    with pytest.raises(gk.InvalidArgumentError, match=r"(?s)'x'.*input_gradients.*Received: "):
        _acts(model, np.ones((2, 3), "float32"), layers="x", target=0)


@pytest.fixture
def policy(keras):
    """Set a global dtype policy for one test and always restore float32."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def _mixed_mlp(keras):
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh", name="d1"),
        keras.layers.Dense(3, name="d2"),
        keras.layers.Activation("linear", dtype="float32", name="out"),
    ])


def test_mixed_precision_is_unscaled_float32(keras, policy):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.normal(size=(6, 3)).astype("float32")
    reference = _mixed_mlp(keras)
    reference.compile(loss="mse")
    policy("mixed_float16")
    model = _mixed_mlp(keras)
    model.set_weights(reference.get_weights())
    model.compile(optimizer="sgd", loss="mse")  # a LossScaleOptimizer: the loss is scaled

    grads = _acts(model, x, y, layers="d1")["d1"]
    inputs = gk.input_gradients(model, x, y)

    assert grads.dtype == np.float32 and inputs.dtype == np.float32
    expected = _acts(reference, x, y, layers="d1")["d1"]
    # float16 arithmetic: ~1e-3 relative to the largest entries; a loss scale left in would be
    # off by 2**15, one applied twice by 2**-15.
    np.testing.assert_allclose(grads, expected, rtol=2e-2, atol=1e-3 * np.abs(expected).max())
    reference_inputs = gk.input_gradients(reference, x, y)
    np.testing.assert_allclose(inputs, reference_inputs, rtol=2e-2,
                               atol=1e-3 * np.abs(reference_inputs).max())


@pytest.mark.flavours("tensorflow")
def test_cross_backend_agreement(cross_flavour_results):
    # The same weights on TF, JAX, torch and tf-keras (each in its own process, exchanging
    # results through gradkit.save: tests/_cross_backend_worker.py) give the same input and
    # activation gradients.
    reference = gk.load(cross_flavour_results / "tensorflow-activations.npz")
    assert len(reference) == 7
    for flavour in ("jax", "torch", "tf_keras"):
        grads = gk.load(cross_flavour_results / f"{flavour}-activations.npz")
        assert list(grads) == list(reference), flavour
        for key, value in reference.items():
            assert np.abs(value).max() > 1e-4, key  # a real gradient, not a zero array
            np.testing.assert_allclose(grads[key], value, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{flavour}: {key}")
