"""layers= selection: by name, glob, Layer object and nested path; clear errors otherwise."""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk

RNG = np.random.default_rng(4)
X = RNG.normal(size=(5, 4)).astype("float32")
Y = RNG.normal(size=(5, 2)).astype("float32")


def _key(variable) -> str:
    path = getattr(variable, "path", None)
    return path if isinstance(path, str) and path else variable.name.removesuffix(":0")


def _keys(*layers) -> list[str]:
    return [_key(v) for layer in layers for v in layer.trainable_variables]


def _nested_model(keras):
    encoder = keras.Sequential(name="encoder", layers=[
        keras.Input((4,)),
        keras.layers.Dense(3, activation="tanh", name="enc_dense_1"),
        keras.layers.Dense(3, activation="tanh", name="enc_dense_2"),
    ])
    inputs = keras.Input((4,), name="x")
    hidden = encoder(inputs)
    hidden = keras.layers.Dropout(0.1, name="drop")(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs, name="outer")
    model.compile(loss="mse")
    return model, encoder


def _check_subset(model, selected, expected_layers):
    full = gk.gradients(model, X, Y)
    assert list(selected) == _keys(*expected_layers)
    for key, grad in selected.items():
        np.testing.assert_allclose(grad, full[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_select_by_name(keras):
    model, _ = _nested_model(keras)
    grads = gk.gradients(model, X, Y, layers="head")
    _check_subset(model, grads, [model.get_layer("head")])


def test_select_nested_path_and_inner_name(keras):
    model, encoder = _nested_model(keras)
    inner = encoder.get_layer("enc_dense_2")
    by_path = gk.gradients(model, X, Y, layers="encoder/enc_dense_2")
    _check_subset(model, by_path, [inner])
    by_name = gk.gradients(model, X, Y, layers="enc_dense_2")
    assert list(by_name) == list(by_path)


def test_select_whole_nested_model(keras):
    model, encoder = _nested_model(keras)
    grads = gk.gradients(model, X, Y, layers="encoder")
    _check_subset(model, grads, [encoder.get_layer("enc_dense_1"),
                                 encoder.get_layer("enc_dense_2")])


def test_select_glob(keras):
    model, encoder = _nested_model(keras)
    grads = gk.gradients(model, X, Y, layers="enc_dense_*")
    _check_subset(model, grads, [encoder.get_layer("enc_dense_1"),
                                 encoder.get_layer("enc_dense_2")])
    by_path_glob = gk.gradients(model, X, Y, layers="encoder/*_1")
    assert list(by_path_glob) == _keys(encoder.get_layer("enc_dense_1"))


def test_select_layer_objects_and_lists_keep_model_order(keras):
    model, encoder = _nested_model(keras)
    head, first = model.get_layer("head"), encoder.get_layer("enc_dense_1")
    grads = gk.gradients(model, X, Y, layers=[head, first, "head"])  # duplicates collapse
    _check_subset(model, grads, [first, head])


def test_unknown_name_lists_close_matches(keras):
    model, _ = _nested_model(keras)
    with pytest.raises(gk.UnknownLayerError, match=r"Did you mean 'head'") as info:
        gk.gradients(model, X, Y, layers="haed")
    assert isinstance(info.value, KeyError)
    assert "Received: layers='haed'" in str(info.value)


def test_unknown_name_without_close_match_lists_layers(keras):
    model, _ = _nested_model(keras)
    with pytest.raises(gk.UnknownLayerError, match=r"layers are: .*head.*Received: layers="):
        gk.gradients(model, X, Y, layers="zzzzzz")


def test_foreign_layer_object(keras):
    model, _ = _nested_model(keras)
    stranger = keras.layers.Dense(2, name="stranger")
    with pytest.raises(gk.UnknownLayerError, match=r"'stranger' is not part of this model"):
        gk.gradients(model, X, Y, layers=stranger)


@pytest.mark.parametrize("which", ["frozen", "weightless"])
def test_layers_without_trainable_variables(keras, which):
    model, _ = _nested_model(keras)
    name = "head" if which == "frozen" else "drop"
    model.get_layer("head").trainable = which != "frozen"
    with pytest.raises(gk.InvalidArgumentError,
                       match=rf"\['{name}'\] have no trainable variables.*Received: layers="):
        gk.gradients(model, X, Y, layers=name)


def test_frozen_layers_are_left_out_of_full_result(keras):
    model, encoder = _nested_model(keras)
    encoder.trainable = False
    model.compile(loss="mse")
    grads = gk.gradients(model, X, Y)
    assert list(grads) == _keys(model.get_layer("head"))


def test_empty_layers_list(keras):
    model, _ = _nested_model(keras)
    with pytest.raises(gk.InvalidArgumentError, match=r"layers= is empty.*Received: layers=\[\]"):
        gk.gradients(model, X, Y, layers=[])


def test_select_variables_themselves(keras):
    # What get_gradients(loss, weights) users pass: a variable, or a list of them (in model
    # order in the result, exactly those variables, mixed with layers too).
    model, encoder = _nested_model(keras)
    full = gk.gradients(model, X, Y)
    head = model.get_layer("head")
    kernel = encoder.get_layer("enc_dense_2").trainable_variables[0]
    for layers, expected in [(kernel, [kernel]), ([head.trainable_variables[1], kernel],
                                                 [kernel, head.trainable_variables[1]]),
                             ([kernel, "head"], [kernel, *head.trainable_variables])]:
        got = gk.gradients(model, X, Y, layers=layers)
        assert list(got) == [_key(v) for v in expected]
        for key in got:
            np.testing.assert_allclose(got[key], full[key], rtol=1e-6, atol=1e-7)
    head.trainable = False
    with pytest.raises(gk.UnknownLayerError, match=r"is not trainable.*Received: layers="):
        gk.gradients(model, X, Y, layers=head.variables[0])
    for bad in (0, object()):
        type_name = type(bad).__name__
        with pytest.raises(gk.InvalidArgumentError,
                           match=rf"Layer objects or the model's variables.*type {type_name}"):
            gk.gradients(model, X, Y, layers=bad)
