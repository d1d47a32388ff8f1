"""Nothing silent: unconnected variables under each `unconnected=` mode, NaN reported."""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk

RNG = np.random.default_rng(5)
X = RNG.normal(size=(4, 3)).astype("float32")


def _two_branch_model(keras):
    inputs = keras.Input((3,), name="x")
    a = keras.layers.Dense(2, name="a")(inputs)
    b = keras.layers.Dense(2, name="b")(inputs)
    return keras.Model(inputs, [a, b], name="branches")


def _first_score(outputs):
    return outputs[0][:, 0]


def _expected_a(model):
    # sum_i (x_i W_a + b_a)[0]: dW_a[:, 0] = sum_i x_i, db_a[0] = N.
    w, b = np.zeros((3, 2)), np.zeros(2)
    w[:, 0], b[0] = X.sum(0), len(X)
    return w, b


def test_unconnected_raise_names_the_variables(keras):
    model = _two_branch_model(keras)
    with pytest.raises(gk.UnconnectedGradientError) as info:
        gk.gradients(model, X, target=_first_score)
    message = str(info.value)
    names = [v for v in message.split(": ")[1].split(". ")[0].split(", ")]
    assert [n.rsplit("/", 2)[-2:] for n in names] == [["b", "kernel"], ["b", "bias"]]
    assert "unconnected='zero'" in message and message.rstrip().endswith(
        "Received: unconnected='raise'")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("mode", ["zero", "none"])
def test_unconnected_zero_and_none(keras, mode):
    model = _two_branch_model(keras)
    grads = gk.gradients(model, X, target=_first_score, unconnected=mode, training=True)
    keys = list(grads)
    assert len(keys) == 4
    w, b = _expected_a(model)
    np.testing.assert_allclose(grads[keys[0]], w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads[keys[1]], b, rtol=1e-6)
    for key, shape in zip(keys[2:], [(3, 2), (2,)]):
        if mode == "zero":
            assert grads[key].shape == shape and grads[key].dtype == np.float32
            assert not grads[key].any()
        else:
            assert grads[key] is None


def test_selecting_only_connected_layers_needs_no_mode(keras):
    model = _two_branch_model(keras)
    grads = gk.gradients(model, X, target=_first_score, layers="a")
    w, b = _expected_a(model)
    np.testing.assert_allclose(list(grads.values())[0], w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call", ["per_example_gradients", "per_example_norms", "accumulate",
                                  "hvp"])
def test_calls_without_the_option_name_the_layers_that_reach_the_objective(keras, call):
    model = _two_branch_model(keras)
    vector = {k: np.ones_like(g) for k, g in
              gk.gradients(model, X, target=_first_score, unconnected="zero").items()}
    run = {"per_example_gradients": lambda **kw: gk.per_example_gradients(model, X, **kw),
           "per_example_norms": lambda **kw: gk.per_example_norms(model, X, **kw),
           "accumulate": lambda **kw: gk.accumulate(model, [X], **kw),
           "hvp": lambda **kw: gk.hvp(model, X, **kw, vector={
               k: v for k, v in vector.items() if "layers" not in kw
               or k.rsplit("/", 2)[-2] in kw["layers"]})}[call]
    with pytest.raises(gk.UnconnectedGradientError) as info:
        run(target=_first_score)
    message = str(info.value)
    # these calls take no unconnected=: the message must not send the user there
    assert "unconnected=" not in message
    assert "layers=['a'] reach it" in message and message.endswith("Received: layers=None")
    result = run(target=_first_score, layers=["a"])  # the layers it names work
    if call == "per_example_gradients":
        w, b = _expected_a(model)  # target: the rows sum to the batch's gradient
        np.testing.assert_allclose(list(result.values())[0].sum(0), w, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(list(result.values())[1].sum(0), b, rtol=1e-6, atol=1e-6)


def test_discarded_layer_output_in_subclassed_model(keras):
    class Discards(keras.Model):
        def __init__(self):
            super().__init__(name="discards")
            self.used = keras.layers.Dense(1, name="used")
            self.unused = keras.layers.Dense(1, name="unused")

        def call(self, inputs):
            self.unused(inputs)  # computed, then thrown away
            return self.used(inputs)

    model = Discards()
    model(X[:1])
    model.compile(loss="mse")
    y = np.ones((4, 1), "float32")
    with pytest.raises(gk.UnconnectedGradientError, match=r"unused/kernel, .*unused/bias"):
        gk.gradients(model, X, y)
    grads = gk.gradients(model, X, y, unconnected="none")
    assert [k for k, g in grads.items() if g is None] == [
        k for k in grads if "unused" in k] and len(grads) == 4


def test_zero_gradient_is_not_unconnected(keras):
    # A dead ReLU has an exactly zero gradient, yet its weights are connected: no error.
    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(2, activation="relu", name="dead")(inputs)
    outputs = keras.layers.Dense(1, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    dead = model.get_layer("dead")
    dead.set_weights([np.zeros((3, 2), "float32"), -np.ones(2, "float32")])
    model.compile(loss="mse")
    grads = gk.gradients(model, X, np.ones((4, 1), "float32"))
    for key in list(grads)[:2]:
        assert grads[key] is not None and not grads[key].any()


def test_bad_unconnected_value(keras):
    model = _two_branch_model(keras)
    with pytest.raises(gk.InvalidArgumentError, match=r"Received: unconnected='zeros'"):
        gk.gradients(model, X, target=_first_score, unconnected="zeros")


def test_nan_in_data_is_reported_not_hidden(keras):
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.compile(loss="mse")
    x = X.copy()
    x[1, 2] = np.nan
    with pytest.warns(gk.NonFiniteGradientWarning, match=r"dense/kernel.*1 NaN/Inf value"):
        grads = gk.gradients(model, x, np.zeros((4, 2), "float32"))
    assert np.isnan(list(grads.values())[0]).any()  # the NaN is in the result, not zeroed
