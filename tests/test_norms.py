"""gradkit.per_example_norms against the norms of the materialized per-example gradients.

per_example_gradients is itself checked against a loop of gradients() (test_per_example.py);
here the Dense/Embedding closed forms and the materializing route must both reproduce it.
"""

from __future__ import annotations

import numpy as np
import pytest
from _per_example_models import BUILDERS, N, mlp, sequence, text

import gradkit as gk


def materialized_norms(rows: dict, by_layer: bool = False):
    """L2 norms over the flattened rows, overall or per layer (key without its last part)."""
    squares: dict[str, np.ndarray] = {}
    for key, value in rows.items():
        name = key.rsplit("/", 1)[0] if by_layer else "all"
        flat = value.reshape(len(value), -1).astype("float64")
        squares[name] = squares.get(name, 0.0) + (flat * flat).sum(axis=1)
    norms = {name: np.sqrt(total) for name, total in squares.items()}
    return norms if by_layer else norms["all"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_norms_equal_norms_of_per_example_gradients(keras, name):
    model, x, y = BUILDERS[name](keras)
    rows = gk.per_example_gradients(model, x, y)
    norms = gk.per_example_norms(model, x, y)
    assert norms.shape == (N,) and norms.dtype == np.float32
    np.testing.assert_allclose(norms, materialized_norms(rows), rtol=1e-5, atol=1e-7)
    by_layer = gk.per_example_norms(model, x, y, by_layer=True)
    expected = materialized_norms(rows, by_layer=True)
    assert list(by_layer) == list(expected)
    for layer in expected:
        np.testing.assert_allclose(by_layer[layer], expected[layer], rtol=1e-5, atol=1e-7,
                                   err_msg=layer)


def test_dense_and_embedding_come_back_factored(keras, flavour):
    """Plain Dense/Embedding variables come back as (input, output gradient) factors, so
    neither route materializes them; a subclass with a call of its own comes back as arrays
    (regularized layers: see test_conv_factors)."""
    from gradkit._factors import Factor
    from gradkit._request import prepare

    for builder, fast in ((mlp, ["out/kernel", "out/bias"]),
                          (text, ["embed/embeddings", "out/kernel", "out/bias"]),
                          (sequence, ["shared/kernel", "shared/bias", "out/kernel", "out/bias"])):
        model, x, y = builder(keras)
        gk.gradients(model, x, y)  # builds the model's compiled loss on every flavour
        request = prepare(model, x, y)
        parts = request.adapter.per_example_parts(request)
        factored = ["/".join(key.split("/")[-2:])
                    for key, part in zip(request.keys, parts)
                    if isinstance(part, Factor)]
        assert sorted(factored) == sorted(fast), builder.__name__


def test_sample_weight_target_and_layers(keras):
    model, x, y = mlp(keras)
    weights = np.array([0.5, 2.0, 0.0, 1.0, 3.0], "float32")
    rows = gk.per_example_gradients(model, x, y, sample_weight=weights)
    np.testing.assert_allclose(gk.per_example_norms(model, x, y, sample_weight=weights),
                               materialized_norms(rows), rtol=1e-5, atol=1e-7)
    rows = gk.per_example_gradients(model, x, target=2, layers="out")
    np.testing.assert_allclose(gk.per_example_norms(model, x, target=2, layers="out"),
                               materialized_norms(rows), rtol=1e-5, atol=1e-7)


def test_by_layer_must_be_a_bool(keras):
    model, x, y = mlp(keras)
    with pytest.raises(gk.InvalidArgumentError, match="Received: by_layer='yes'"):
        gk.per_example_norms(model, x, y, by_layer="yes")


def test_layer_keys_coincide_across_results(keras):
    # One key per layer in every result keyed by layer: activation_gradients, by_layer norms
    # and GradientStats.layers (a Keras 3 Sequential puts its name into variable paths; a
    # nested model, MultiHeadAttention's inner projections and a weightless layer included).
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d_in")],
                             name="inner")
    seq = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(3, name="d1"),
                            keras.layers.Dropout(0.1, name="drop"),
                            keras.layers.Dense(2, name="d2")], name="seq")
    seq.compile(loss="mse")
    x = np.random.default_rng(0).normal(size=(4, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(4, 2)).astype("float32")
    norms = gk.per_example_norms(seq, x, y, by_layer=True)
    stats = gk.gradient_stats(seq, (x, y), progress=False)
    acts = gk.activation_gradients(seq, x, y, layers=[inner.get_layer("d_in"), "d1", "d2"])
    assert list(acts) == list(norms) == list(stats.layers), (list(acts), list(norms))
    for key in acts:  # the key is the variables' path without its last part
        assert any(k.rsplit("/", 1)[0] == key for k in gk.gradients(seq, x, y)), key
