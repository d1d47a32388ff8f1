"""gradkit.per_example_gradients against a slow, obvious loop of gradients() on single examples.

Row i must equal gradients(model, x[i:i+1], y[i:i+1]); the mean over rows must equal the
batch gradient of the compiled mean loss; chunking must not change anything.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _per_example_models import BUILDERS, N, cnn, layernorm, mlp, text
from conftest import assert_same_state, state_snapshot

import gradkit as gk


def loop_reference(model, x, y=None, sample_weight=None, **kwargs):
    """Per-example gradients the slow way: one gradients() call per example, stacked."""
    rows = []
    for i in range(N):
        xi = [a[i:i + 1] for a in x] if isinstance(x, list) else x[i:i + 1]
        rows.append(gk.gradients(
            model, xi, None if y is None else y[i:i + 1],
            sample_weight=None if sample_weight is None else sample_weight[i:i + 1], **kwargs))
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def assert_same_sets(actual, expected, rtol=1e-5, atol=1e-6):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("builder", [mlp, cnn, text, layernorm], ids=lambda b: b.__name__)
def test_rows_equal_a_loop_over_single_examples(keras, builder):
    model, x, y = builder(keras)
    result = gk.per_example_gradients(model, x, y)
    assert all(v.dtype == np.float32 for v in result.values())
    assert_same_sets(result, loop_reference(model, x, y))


def test_mean_over_rows_is_the_batch_gradient_regularizer_included(keras):
    model, x, y = mlp(keras)
    rows = gk.per_example_gradients(model, x, y)
    batch = gk.gradients(model, x, y)
    assert_same_sets({k: v.mean(axis=0) for k, v in rows.items()}, batch)


def test_an_orthogonal_regularizer_keeps_its_dense_layer_factored(keras):
    """Its gradient, taken by the framework, is added to every factored row."""
    from gradkit._factors import Factor
    from gradkit._request import prepare

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, activation="tanh", name="hidden", kernel_regularizer=(
            keras.regularizers.OrthogonalRegularizer(factor=0.3, mode="columns"))),
        keras.layers.Dense(3, name="out")])
    model.compile(loss="mse")
    x = np.random.default_rng(3).normal(size=(N, 4)).astype("float32")
    y = np.random.default_rng(4).normal(size=(N, 3)).astype("float32")
    gk.gradients(model, x, y)
    request = prepare(model, x, y)
    parts = dict(zip(request.keys, request.adapter.per_example_parts(request)))
    kernel = next(part for key, part in parts.items() if key.endswith("hidden/kernel"))
    assert isinstance(kernel, Factor) and np.abs(kernel.offset).max() > 1e-3
    assert_same_sets(gk.per_example_gradients(model, x, y), loop_reference(model, x, y))


def test_chunk_size_does_not_change_the_result(keras):
    model, x, y = text(keras)
    results = [gk.per_example_gradients(model, x, y, chunk_size=c) for c in (1, 2, N, 100)]
    for other in results[1:]:
        assert_same_sets(other, results[0])


def test_sample_weight_multiplies_each_row(keras):
    model, x, y = BUILDERS["layernorm"](keras)  # no regularizer: row i is w_i * loss_i'
    weights = np.array([0.5, 2.0, 0.0, 1.0, 3.0], "float32")
    weighted = gk.per_example_gradients(model, x, y, sample_weight=weights)
    plain = gk.per_example_gradients(model, x, y)
    expected = {k: v * weights.reshape((N,) + (1,) * (v.ndim - 1)) for k, v in plain.items()}
    assert_same_sets(weighted, expected)
    batch = gk.gradients(model, x, y, sample_weight=weights)
    assert_same_sets({k: v.mean(axis=0) for k, v in weighted.items()}, batch)


def test_target_rows_sum_to_the_batch_gradient(keras):
    model, x, _ = mlp(keras)
    rows = gk.per_example_gradients(model, x, target=1)
    assert_same_sets(rows, loop_reference(model, x, target=1))
    assert_same_sets({k: v.sum(axis=0) for k, v in rows.items()}, gk.gradients(model, x, target=1))


def test_layers_selects_variables(keras):
    model, x, y = mlp(keras)
    rows = gk.per_example_gradients(model, x, y, layers="out")
    assert [k.rsplit("/", 2)[-2:] for k in rows] == [["out", "kernel"], ["out", "bias"]]
    assert_same_sets(rows, loop_reference(model, x, y, layers="out"))


def _batchnorm_model(keras):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, name="dense"),
        keras.layers.BatchNormalization(name="the_bn"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(2, name="out"),
    ])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def test_batchnorm_in_training_mode_is_refused_naming_the_layer(keras):
    model = _batchnorm_model(keras)
    x, y = np.ones((N, 4), "float32"), np.zeros((N, 2), "float32")
    with pytest.raises(gk.InvalidArgumentError, match="the_bn") as info:
        gk.per_example_gradients(model, x, y, training=True)
    assert "Received: training=True" in str(info.value)
    with pytest.raises(gk.InvalidArgumentError, match="the_bn"):
        gk.per_example_norms(model, x, y, training=True)


def test_no_model_state_changes(keras):
    model = _batchnorm_model(keras)
    x = np.random.default_rng(1).normal(size=(N, 4)).astype("float32")
    y = np.zeros((N, 2), "float32")
    model.fit(x, y, epochs=1, verbose=0)  # optimizer, metrics and moving statistics exist
    before = state_snapshot(model)
    rows = gk.per_example_gradients(model, x, y)  # BatchNorm in inference mode: allowed
    gk.per_example_norms(model, x, y)
    assert_same_state(before, state_snapshot(model))
    assert_same_sets(rows, loop_reference(model, x, y))
    model.get_layer("the_bn").trainable = False  # a frozen BatchNorm does not couple examples
    gk.per_example_gradients(model, x, y, training=True)
    gk.per_example_norms(model, x, y, training=True)
    assert_same_state(before, state_snapshot(model))


def test_unconnected_variable_is_an_error(keras):
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, name="hidden")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(1, name="a")(hidden),
                                 keras.layers.Dense(1, name="b")(hidden)])
    with pytest.raises(gk.UnconnectedGradientError, match="b/kernel"):
        gk.per_example_gradients(model, np.ones((N, 3)), target=lambda out: out[0][:, 0])
    rows = gk.per_example_gradients(model, np.ones((N, 3)), target=lambda out: out[0][:, 0],
                                    layers=["hidden", "a"])
    assert len(rows) == 4


def test_bad_chunk_size_is_a_clear_error(keras):
    model, x, y = mlp(keras)
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(gk.InvalidArgumentError, match="chunk_size") as info:
            gk.per_example_gradients(model, x, y, chunk_size=bad)
        assert f"Received: chunk_size={bad!r}" in str(info.value)


def test_loop_fallback_when_the_vectorizer_fails(keras, flavour, monkeypatch, caplog):
    from gradkit import _backends

    model, x, y = mlp(keras)
    expected = gk.per_example_gradients(model, x, y)

    tries = []

    def failing(*args, **kwargs):
        tries.append(1)
        raise NotImplementedError("no batching rule for this op")

    monkeypatch.setattr(_backends.for_flavour(flavour), "per_example_parts", failing)
    with caplog.at_level(logging.WARNING, logger="gradkit"):
        rows = gk.per_example_gradients(model, x, y, chunk_size=2)
        again = gk.per_example_gradients(model, x, y)
        norms = gk.per_example_norms(model, x, y)
    assert_same_sets(rows, expected)
    assert_same_sets(again, expected)
    np.testing.assert_allclose(norms, np.sqrt(sum(
        (v.reshape(N, -1).astype("float64") ** 2).sum(1) for v in expected.values())), rtol=1e-5)
    assert len(tries) == 1  # the failed route is remembered: never retried
    assert len(caplog.records) == 1  # logged once, with the framework's own reason
    assert "loop over examples" in caplog.text and "no batching rule" in caplog.text


def test_nonfinite_rows_are_reported(keras):
    model, x, y = mlp(keras)
    x = x.copy()
    x[2, 0] = np.nan
    with pytest.warns(gk.NonFiniteGradientWarning, match="NaN"):
        rows = gk.per_example_gradients(model, x, y)
    for value in rows.values():  # only example 2's row is affected
        assert np.isfinite(value[0]).all() and not np.isfinite(value[2]).all()


def test_mixed_precision_rows_are_unscaled(keras, flavour):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(3, name="out"),
            keras.layers.Activation("linear", dtype="float32"),
        ])
    finally:  # tf-keras: None restores "follow floatx" (an explicit float32 would pin it)
        keras.mixed_precision.set_global_policy(None if flavour == "tf_keras" else "float32")
    # A modest scale: 2**15 overflows float16 through LayerNormalization on the first step.
    optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(),
                                                         initial_scale=64.0)
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(3).normal(size=(N, 4)).astype("float32")
    y = np.random.default_rng(4).normal(size=(N, 3)).astype("float32")
    rows = gk.per_example_gradients(model, x, y)
    assert all(v.dtype == np.float32 for v in rows.values())
    assert_same_sets(rows, loop_reference(model, x, y), rtol=2e-2, atol=2e-3)
    norms = np.sqrt(sum((v.reshape(N, -1).astype("float64") ** 2).sum(1) for v in rows.values()))
    np.testing.assert_allclose(gk.per_example_norms(model, x, y), norms, rtol=1e-4)


def test_float64_model_gives_float64_rows(keras, flavour, float64):
    model, x, y = text(keras)
    rows = gk.per_example_gradients(model, x, y)
    norms = gk.per_example_norms(model, x, y)
    reference = loop_reference(model, x, y)
    assert all(v.dtype == np.float64 for v in rows.values()) and norms.dtype == np.float64
    # Keras on torch rounds part of a float64 forward pass at float32 precision (in the loop
    # of gradients() as well), so the rows agree to float32 precision there.
    tolerance = 1e-6 if flavour == "torch" else 1e-10
    assert_same_sets(rows, reference, rtol=tolerance, atol=tolerance * 1e-2)


def test_out_receives_the_rows_and_is_returned(keras):
    model, x, y = mlp(keras)
    expected = gk.per_example_gradients(model, x, y)
    out = {key: np.full_like(value, np.nan) for key, value in expected.items()}
    got = gk.per_example_gradients(model, x, y, out=out)
    assert got is out
    assert_same_sets(out, expected)  # (calls may take different routes: float error)
    again = gk.per_example_gradients(model, x, y, chunk_size=2, out=out)  # reused, chunked
    assert again is out
    assert_same_sets(out, expected)


def test_bad_out_is_refused_before_anything_is_written(keras):
    model, x, y = mlp(keras)
    expected = gk.per_example_gradients(model, x, y)
    first = next(iter(expected))
    cases = {
        "keys": {k: v for k, v in list(expected.items())[1:]},
        "shape": dict(expected, **{first: np.zeros((1,) + expected[first].shape[1:], "float32")}),
        "dtype": dict(expected, **{first: expected[first].astype("float64")}),
        "layout": dict(expected, **{first: np.asfortranarray(expected[first])}),
        "not a dict": list(expected.values()),
    }
    assert expected[first].ndim == 3  # a kernel's rows: Fortran order is not C order
    for name, out in cases.items():
        before = dict(out) if isinstance(out, dict) else {}
        before = {k: v.copy() for k, v in before.items()}
        with pytest.raises(gk.InvalidArgumentError, match="out.*Received"):
            gk.per_example_gradients(model, x, y, out=out)
        for k in before:
            np.testing.assert_array_equal(out[k], before[k], err_msg=name)
