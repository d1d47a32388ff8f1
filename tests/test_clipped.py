"""gradkit.clipped_gradients against per-example gradients clipped and averaged in NumPy.

The reference for each example is a loop of single-example ``gradients()`` calls (the
definition of example i's gradient), clipped to the bound by its norm in NumPy, summed and
divided by B. The noise is checked statistically against its stated distribution.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import assert_same_state, state_snapshot

B = 6
RNG = np.random.default_rng(11)


def _mlp(keras):
    """Dense layers, one of them L2-regularized, its bias too (factored, its regularizers'
    gradients added to each row and their inner products to the norms)."""
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(6, activation="tanh", name="hidden"),
        keras.layers.Dense(4, activation="relu", name="reg",
                           kernel_regularizer=keras.regularizers.L2(0.1),
                           bias_regularizer=keras.regularizers.L2(0.2)),
        keras.layers.Dense(3, name="out"),
    ])
    model.get_layer("reg").bias.assign(RNG.normal(size=4).astype("float32"))
    model.compile(loss="mse")
    return model, RNG.normal(size=(B, 5)).astype("float32"), \
        RNG.normal(size=(B, 3)).astype("float32")


def _cnn(keras):
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu", name="conv"),
        keras.layers.LayerNormalization(name="norm"),  # no factored form: rows
        keras.layers.Flatten(),
        keras.layers.Dense(4, name="out"),
    ])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, RNG.normal(size=(B, 6, 6, 2)).astype("float32"), RNG.integers(0, 4, B)


def _embedding(keras):
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(7, 3, name="embed"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2, name="out"),
    ])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, RNG.integers(0, 7, (B, 5)).astype("int32"), RNG.integers(0, 2, B)


def _loop_rows(model, x, y, sample_weight=None):
    """Example i's gradient as gradients() of the batch of one, stacked per key."""
    rows = [gk.gradients(model, x[i:i + 1], y[i:i + 1],
                         sample_weight=None if sample_weight is None
                         else sample_weight[i:i + 1]) for i in range(len(x))]
    return {key: np.stack([row[key] for row in rows]).astype(np.float64) for key in rows[0]}


def _clipped_mean(rows, clip):
    norms = np.sqrt(sum((r.reshape(B, -1) ** 2).sum(axis=1) for r in rows.values()))
    scale = np.minimum(1.0, clip / norms)
    return {k: np.tensordot(scale, r, 1) / B for k, r in rows.items()}, norms


@pytest.mark.parametrize("build", [_mlp, _cnn, _embedding])
def test_equals_clipping_each_examples_gradient(keras, build):
    model, x, y = build(keras)
    rows = _loop_rows(model, x, y)
    norms = np.sqrt(sum((r.reshape(B, -1) ** 2).sum(axis=1) for r in rows.values()))
    clip = float(np.median(norms))  # about half the examples are clipped
    before = state_snapshot(model)
    result, got_norms = gk.clipped_gradients(model, x, y, l2_norm_clip=clip,
                                             return_norms=True)
    assert_same_state(before, state_snapshot(model))
    expected, _ = _clipped_mean(rows, clip)
    assert list(result) == list(expected)
    for key in expected:
        assert result[key].dtype == np.float32
        np.testing.assert_allclose(result[key], expected[key], rtol=2e-4, atol=1e-6,
                                   err_msg=key)
    np.testing.assert_allclose(got_norms, norms, rtol=1e-4)
    # A bound above every norm clips nothing: the plain mean of the examples' gradients.
    unclipped = gk.clipped_gradients(model, x, y, l2_norm_clip=2 * norms.max())
    for key in expected:
        np.testing.assert_allclose(unclipped[key], rows[key].mean(axis=0), rtol=2e-4,
                                   atol=1e-6, err_msg=key)


def test_sample_weight_scales_before_clipping(keras):
    model, x, y = _mlp(keras)
    weights = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 1.0], "float32")
    rows = _loop_rows(model, x, y, weights)
    result = gk.clipped_gradients(model, x, y, l2_norm_clip=0.5, sample_weight=weights,
                                  layers=["reg", "out"])
    assert list(result) == [k for k in rows if k.split("/")[-2] in ("reg", "out")]
    selected = {k: rows[k] for k in result}
    expected, _ = _clipped_mean(selected, 0.5)  # the norm over the selected variables only
    for key in result:
        np.testing.assert_allclose(result[key], expected[key], rtol=2e-4, atol=1e-6,
                                   err_msg=key)


def test_noise_has_the_stated_distribution(keras):
    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(50, name="wide")])
    model.compile(loss="mse")
    x, y = RNG.normal(size=(B, 40)).astype("float32"), RNG.normal(size=(B, 50)).astype("float32")
    clip, sigma = 0.25, 1.5
    clean = gk.clipped_gradients(model, x, y, l2_norm_clip=clip)
    noisy = gk.clipped_gradients(model, x, y, l2_norm_clip=clip, noise_multiplier=sigma,
                                 seed=3)
    noise = np.concatenate([(noisy[k].astype(np.float64) - clean[k]).ravel() * B
                            for k in clean])
    count, stddev = noise.size, sigma * clip  # 2050 draws of N(0, (σC)²)
    assert abs(noise.mean()) < 5 * stddev / np.sqrt(count)
    assert abs(noise.std() / stddev - 1) < 5 / np.sqrt(2 * count)
    again = gk.clipped_gradients(model, x, y, l2_norm_clip=clip, noise_multiplier=sigma,
                                 seed=3)
    fresh = gk.clipped_gradients(model, x, y, l2_norm_clip=clip, noise_multiplier=sigma)
    for key in clean:  # the same noise (the clipped sum may come from another route)
        np.testing.assert_allclose(again[key], noisy[key], rtol=1e-5, atol=1e-6)
        assert not np.allclose(fresh[key], noisy[key])


@pytest.mark.parametrize("options, words", [
    ({"l2_norm_clip": 0.0}, "l2_norm_clip"),
    ({"l2_norm_clip": float("nan")}, "l2_norm_clip"),
    ({"l2_norm_clip": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
    ({"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "seed": 1.5}, "seed="),
])
def test_bad_options_raise(keras, options, words):
    model, x, y = _mlp(keras)
    with pytest.raises(gk.InvalidArgumentError, match=words):
        gk.clipped_gradients(model, x, y, **options)
