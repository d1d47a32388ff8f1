"""locate_nonfinite: the layer whose output first holds NaN/Inf, and the layer nearest the
loss whose output gradient does, on models where both are known by construction."""

import numpy as np
import pytest
from conftest import assert_same_state, state_snapshot

import gradkit as gk

RNG = np.random.default_rng(3)


def _ops(keras, flavour):
    if flavour == "tf_keras":
        import tensorflow as tf

        return tf.sqrt, tf.math.log
    return keras.ops.sqrt, keras.ops.log


def _model(keras, flavour, middle):
    """dense -> relu -> `middle` (a Lambda) -> out."""
    sqrt, log = _ops(keras, flavour)
    fn = {"sqrt": sqrt, "log": log}[middle]
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, name="dense"),
        keras.layers.ReLU(name="relu"),
        keras.layers.Lambda(lambda t: fn(t), name="middle"),
        keras.layers.Dense(2, name="out"),
    ])
    model.compile(loss="mse")
    return model


def _keys(found):
    """Layer name -> its key, from the forward order of the result."""
    keys = dict(zip(("dense", "relu", "middle", "out"), found["layers"]))
    assert len(found["layers"]) == 4 and all(k.endswith(n) for n, k in keys.items()), keys
    return keys


def _data():
    x = RNG.normal(size=(8, 4)).astype("float32")
    return x, RNG.normal(size=(8, 2)).astype("float32")


def test_backward_only_nonfinite_is_located_at_the_layer_before_its_source(keras, flavour):
    """sqrt(relu(t)): finite forward (sqrt(0) = 0), but sqrt' = inf at 0 makes the relu
    output's gradient Inf/NaN; the sqrt Lambda's own output gradient stays finite."""
    model = _model(keras, flavour, "sqrt")
    x, y = _data()
    model.evaluate(x, y, verbose=0)  # tf-keras builds its loss metric's variables lazily
    before = state_snapshot(model)
    found = gk.locate_nonfinite(model, x, y)
    assert_same_state(before, state_snapshot(model))
    keys = _keys(found)
    assert found["output"] is None
    assert found["gradient"] == keys["relu"]
    assert found["layers"][keys["middle"]] == (0, 0)
    assert found["layers"][keys["relu"]][1] > 0


def test_forward_nonfinite_is_located_at_the_first_layer_that_outputs_it(keras, flavour):
    """log(relu(t)) = -inf where relu gives 0: the Lambda is the first non-finite output."""
    model = _model(keras, flavour, "log")
    x, y = _data()
    found = gk.locate_nonfinite(model, x, y)
    keys = _keys(found)
    assert found["output"] == keys["middle"]
    assert found["layers"][keys["relu"]][0] == 0 and found["layers"][keys["dense"]][0] == 0
    kernel, bias = model.get_layer("dense").get_weights()
    expected = int(np.sum(x @ kernel + bias <= 0))  # log(0) = -inf where relu gives 0
    assert found["layers"][keys["middle"]][0] == expected > 0


def test_a_finite_batch_locates_nothing(keras, flavour):
    model = _model(keras, flavour, "sqrt")
    x, y = _data()
    dense = model.get_layer("dense")  # positive inputs and weights: no relu output is 0
    dense.set_weights([np.abs(w) + 0.1 for w in dense.get_weights()])
    x = np.abs(x) + 1.0
    found = gk.locate_nonfinite(model, x, y)
    assert found["output"] is None and found["gradient"] is None
    assert all(counts == (0, 0) for counts in found["layers"].values())


def test_a_layer_that_is_not_there_is_a_clear_error(keras, flavour):
    model = _model(keras, flavour, "sqrt")
    with pytest.raises(gk.GradkitError, match="nope"):
        gk.locate_nonfinite(model, *_data(), layers="nope")


def _recurrent_model(keras, flavour):
    """Embedding -> LSTM (its cell a sublayer, called in a loop) -> a nested Sequential with
    a Bidirectional GRU -> attention -> LSTM returning its states (three outputs), and a
    shared nested model on both -> Dense."""
    layers = keras.layers
    inputs = keras.Input((5,), dtype="int32")
    h = layers.Embedding(20, 8, name="embed")(inputs)
    h = layers.LSTM(6, return_sequences=True, name="lstm")(h)
    inner = keras.Sequential([keras.Input((5, 6)),
                              layers.Bidirectional(layers.GRU(4, return_sequences=True),
                                                   name="bigru")], name="inner")
    h = inner(h)
    h = layers.MultiHeadAttention(2, 4, name="attention")(h, h)
    h, state, _ = layers.LSTM(3, return_state=True, name="states")(h)
    shared = keras.Sequential([keras.Input((3,)), layers.Dense(3, name="twice")],
                              name="shared")
    h, state = shared(h), shared(state)
    outputs = layers.Dense(2, name="out")(layers.Concatenate(name="both")([h, state]))
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_by_default_every_layer_of_the_model_graph_is_looked_at(keras, flavour):
    """The default covers the model's layers and those of nested models, in forward order,
    but not the sublayers a layer keeps inside (an LSTM's cell, called in its loop, or
    attention's projections), a layer with several outputs, or a shared one: a recurrent
    model is looked at without an error, and the gradient located is a real one."""
    model = _recurrent_model(keras, flavour)
    x = RNG.integers(0, 20, size=(6, 5)).astype("int32")
    y = RNG.integers(0, 2, size=6)
    found = gk.locate_nonfinite(model, x, y)
    names = [key.rsplit("/", 1)[-1] for key in found["layers"]]
    assert names == ["embed", "lstm", "inner", "bigru", "attention", "both", "out"], names
    assert found["output"] is None and found["gradient"] is None
    model.get_layer("out").kernel.assign(np.full((6, 2), np.nan, "float32"))
    found = gk.locate_nonfinite(model, x, y)
    out = list(found["layers"])[-1]
    assert found["output"] == out and found["gradient"] == out  # NaN logits, NaN loss
    assert all(a == 0 for key, (a, _) in found["layers"].items() if key != out)  # finite
