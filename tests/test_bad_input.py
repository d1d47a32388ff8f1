"""Every user error raises the right gradkit error, saying what to do, ending in Received:."""

from __future__ import annotations

import re

import numpy as np
import pytest

import gradkit as gk

X = np.ones((4, 3), "float32")
Y = np.zeros((4, 2), "float32")


def _model(keras, compiled=True):
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    if compiled:
        model.compile(loss="mse")
    return model


def _two_inputs(keras):
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    joined = keras.layers.Concatenate(name="cat")([a, b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1, name="dense")(joined))
    model.compile(loss="mse")
    return model


def _raises(error, pattern, call, *args, **kwargs):
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert re.search(pattern, message, re.S), message
    assert re.search(r"Received: \w+=.+$", message), message
    return info.value


def test_uncompiled_model_without_loss_or_target(keras):
    _raises(gk.InvalidArgumentError, r"not compiled.*loss='mse'.*target=k",
            gk.gradients, _model(keras, compiled=False), X, Y)


def test_loss_and_target_together(keras):
    _raises(gk.InvalidArgumentError, r"Pass only one", gk.gradients, _model(keras), X,
            loss="mse", target=0)


@pytest.mark.parametrize("kwargs", [{}, {"loss": "mse"}])
def test_y_missing_for_a_loss(keras, kwargs):
    _raises(gk.InvalidArgumentError, r"y is required", gk.gradients, _model(keras), X,
            **kwargs)


#: public calls that take no target=: their messages must not suggest it
WITHOUT_TARGET = {
    "ggn_vp": lambda m, y: gk.ggn_vp(m, X, y, vector={}),
    "ggn_vp_over": lambda m, y: gk.ggn_vp_over(m, (X, y) if y is not None else X, vector={}),
    "clipped_gradients": lambda m, y: gk.clipped_gradients(m, X, y, l2_norm_clip=1.0),
    "fisher_diagonal": lambda m, y: gk.fisher_diagonal(m, (X, y) if y is not None else X),
    "gradient_stats": lambda m, y: gk.gradient_stats(m, [(X, y) if y is not None else X]),
    "locate_nonfinite": lambda m, y: gk.locate_nonfinite(m, X, y),
}


@pytest.mark.parametrize("call", sorted(WITHOUT_TARGET))
@pytest.mark.parametrize("compiled", [True, False])
def test_calls_without_target_never_suggest_it(keras, call, compiled):
    model = _model(keras, compiled=compiled)  # compiled: y missing; not compiled: no loss
    error = _raises(gk.InvalidArgumentError, r"y is required" if compiled else r"not compiled",
                    WITHOUT_TARGET[call], model, None)
    assert "target=" not in str(error), str(error)


def test_an_empty_batch_is_refused_except_where_the_result_is_rows(keras):
    model, x, y = _model(keras), X[:0], Y[:0]
    for call in (lambda: gk.gradients(model, x, y), lambda: gk.gradients(model, x, target=0),
                 lambda: gk.input_gradients(model, x, y),
                 lambda: gk.hvp(model, x, y, vector={}),
                 lambda: gk.clipped_gradients(model, x, y, l2_norm_clip=1.0)):
        _raises(gk.DataShapeError, r"no examples.*Pass at least one", call)
    rows = gk.per_example_gradients(model, x, y)  # B = 0 rows, as NumPy would
    assert [r.shape for r in rows.values()] == [(0, 3, 2), (0, 2)]
    assert gk.per_example_norms(model, x, y).shape == (0,)


def test_a_data_source_where_one_batch_belongs_points_to_the_dataset_calls(keras):
    model = _model(keras)

    class Loader:  # a DataLoader-like iterable of batches
        def __iter__(self):
            yield X, Y

    for source in ((b for b in [(X, Y)]), Loader()):
        for call in (gk.gradients, gk.per_example_norms):
            # not "y is required": the y is inside the source
            _raises(gk.InvalidArgumentError, r"x is a data source.*accumulate\(\)",
                    call, model, source)


def test_y_given_with_target(keras):
    _raises(gk.InvalidArgumentError, r"y is not used with target=", gk.gradients,
            _model(keras), X, Y, target=1)


@pytest.mark.parametrize("target", [5, -3, 1.5, "dense", True])
def test_bad_target(keras, target):
    _raises(gk.InvalidArgumentError, r"target", gk.gradients, _model(keras), X, target=target)


def test_int_target_on_multi_output_model(keras):
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, [keras.layers.Dense(2, name="a")(inputs),
                                 keras.layers.Dense(2, name="b")(inputs)])
    _raises(gk.InvalidArgumentError, r"several outputs.*callable", gk.gradients, model, X,
            target=0)


@pytest.mark.parametrize("loss", ["no_such_loss", 3])
def test_bad_loss(keras, loss):
    _raises(gk.InvalidArgumentError, r"loss", gk.gradients, _model(keras), X, Y, loss=loss)


@pytest.mark.parametrize("what", ["y", "sample_weight", "inputs"])
def test_mismatched_batch_sizes(keras, what):
    model = _two_inputs(keras) if what == "inputs" else _model(keras)
    x = {"a": X, "b": np.ones((3, 2), "float32")} if what == "inputs" else X
    y = Y[:3] if what == "y" else np.zeros((4, 1), "float32")
    sw = np.ones(5) if what == "sample_weight" else None
    _raises(gk.DataShapeError, r"share one batch size", gk.gradients, model, x, y,
            sample_weight=sw)


def test_wrong_input_shape(keras):
    error = _raises(gk.DataShapeError, r"has shape \(4, 5\).*expects \(None, 3\)",
                    gk.gradients, _model(keras), np.ones((4, 5)), Y)
    assert isinstance(error, ValueError)


def test_wrong_input_rank(keras):
    _raises(gk.DataShapeError, r"expects \(None, 3\)", gk.gradients, _model(keras),
            np.ones((4, 3, 1)), Y)


def test_dict_x_with_missing_key(keras):
    _raises(gk.DataShapeError, r"lacks the model input\(s\) \['b'\]", gk.gradients,
            _two_inputs(keras), {"a": X}, np.zeros((4, 1)))


def test_wrong_number_of_inputs(keras):
    _raises(gk.DataShapeError, r"takes 2 input\(s\).*holds 1", gk.gradients,
            _two_inputs(keras), [X], np.zeros((4, 1)))


def test_scalar_and_missing_x(keras):
    _raises(gk.DataShapeError, r"leading batch axis", gk.gradients, _model(keras),
            np.float32(1.0), Y)
    _raises(gk.InvalidArgumentError, r"x is required", gk.gradients, _model(keras), None, Y)


@pytest.mark.parametrize("thing", ["model.keras", None, "layer", "function"])
def test_not_a_keras_model(keras, thing):
    obj = {"layer": keras.layers.Dense(2), "function": lambda x: x}.get(thing, thing)
    error = _raises(gk.UnsupportedModelError, r"not one.*Pass the Keras model itself",
                    gk.gradients, obj, X, Y)
    assert isinstance(error, TypeError)


def test_unbuilt_sequential(keras):
    model = keras.Sequential([keras.layers.Dense(2)])
    model.compile(loss="mse")
    _raises(gk.UnsupportedModelError, r"not been built.*model\(x\[:1\]\)", gk.gradients,
            model, X, Y)


@pytest.mark.parametrize("kwargs", [{"training": "yes"}, {"unconnected": "ignore"}])
def test_bad_options(keras, kwargs):
    _raises(gk.InvalidArgumentError, r"must be", gk.gradients, _model(keras), X, Y, **kwargs)


def test_multi_output_loss_with_wrong_y_count(keras):
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, [keras.layers.Dense(2, name="a")(inputs),
                                 keras.layers.Dense(2, name="b")(inputs)])
    _raises(gk.InvalidArgumentError, r"2 outputs but y holds 1", gk.gradients, model, X, [Y],
            loss="mse")


def _two_heads(keras):
    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(4, name="h")(inputs)
    model = keras.Model(inputs, {"cls": keras.layers.Dense(3, name="cls_layer")(hidden),
                                 "reg": keras.layers.Dense(1, name="reg_layer")(hidden)})
    model.compile(loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"})
    return model


def test_labels_checked_against_outputs_and_losses(keras):
    model = _two_heads(keras)
    labels, reg = np.array([0, 1, 2, 1]), np.zeros((4, 1), "float32")
    gk.gradients(model, X, {"cls": labels, "reg": reg})  # the good case runs
    cases = [
        ({"cls": labels}, r"lacks labels for the output\(s\) \['reg'\]"),
        ({"clss": labels, "reg": reg}, r"key 'clss'.*Did you mean 'cls'"),
        ({"cls": np.array([0, 1, 5, 1]), "reg": reg}, r"'cls' must be class indices 0..2.*\[5\]"),
        ({"cls": np.eye(3)[labels], "reg": reg}, r"look one-hot.*argmax"),
    ]
    for y, pattern in cases:
        _raises(gk.DataShapeError, pattern, gk.gradients, model, X, y)
    onehot = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    onehot.compile(loss="categorical_crossentropy")
    _raises(gk.DataShapeError, r"look like class indices.*sparse_categorical", gk.gradients,
            onehot, X, labels)
    _raises(gk.DataShapeError, r"look like class indices", gk.accumulate, onehot,
            (X, labels), progress=False)
    # a list of NumPy scalars is one label array, as a list of floats is
    single = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    single.compile(loss="mse")
    got = gk.gradients(single, X, [np.float32(v) for v in range(4)])
    for key, value in gk.gradients(single, X, np.arange(4.0)).items():
        np.testing.assert_array_equal(got[key], value)


def test_target_on_dict_outputs_says_how_to_pick_one(keras):
    _raises(gk.InvalidArgumentError, r"keys \['cls', 'reg'\].*outputs\['cls'\]\[:, 1\]",
            gk.gradients, _two_heads(keras), X, target=1)


def test_custom_train_step_warns_once(keras):
    import warnings

    class Custom(keras.Model):
        def train_step(self, data):  # fit minimizes something gradkit cannot see
            return super().train_step(data)

    inputs = keras.Input((3,), name="x")
    model = Custom(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.compile(loss="mse")
    with pytest.warns(gk.CustomTrainStepWarning, match=r"Custom overrides train_step.*"
                      r"compute_loss.*loss="):
        gk.gradients(model, X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gk.gradients(model, X, Y)  # once per model
        gk.gradients(_model(keras), X, Y)  # Keras' own train_step: no warning
