"""Per-model compiled-function caches are LRU-bounded (gradkit._backends._cache).

A new loss callable on every call must retrace but must not grow the model's cache: the LRU
itself against a hand-written order, then gradients and per-example gradients with a fresh
lambda per call against closed forms, with an evicted entry rebuilt when its loss returns.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import gradkit as gk
from gradkit._backends import _cache

RNG = np.random.default_rng(0)


class _Key:  # a weak-referenceable stand-in for a model
    pass


@pytest.fixture
def bound_3(monkeypatch):
    monkeypatch.setattr(_cache, "MAX_ENTRIES_PER_MODEL", 3)


def test_lru_keeps_the_most_recent_entries(bound_3):
    cache = _cache.BoundedCache()
    for i in range(5):
        cache[i] = str(i)
        assert len(cache) == min(i + 1, 3)
    assert [k for k in range(5) if k in cache] == [2, 3, 4]
    assert list(cache.values()) == ["2", "3", "4"]


def test_lru_a_hit_makes_an_entry_recent(bound_3):
    cache = _cache.BoundedCache()
    for i in range(3):
        cache[i] = i
    assert cache[0] == 0  # 0 is now the most recent: 1 is the oldest
    cache[3] = 3
    assert [k for k in range(4) if k in cache] == [0, 2, 3]
    cache[2] = "again"  # overwriting is a use too: 0 is the oldest now
    cache[4] = 4
    assert [k for k in range(5) if k in cache] == [2, 3, 4]
    assert list(cache.values()) == [3, "again", 4]  # least recently used first
    with pytest.raises(KeyError):
        cache[0]


def test_for_model_gives_one_cache_per_model_that_dies_with_it():
    a, b = _Key(), _Key()
    cache = _cache.for_model(a)
    cache["k"] = 1
    assert _cache.for_model(a) is cache and "k" in _cache.for_model(a)
    assert "k" not in _cache.for_model(b)
    assert _cache.cached(a, "k", lambda: 2) == 1 and _cache.cached(b, "k", lambda: 2) == 2
    alive = weakref.ref(cache)
    del a, cache
    gc.collect()
    assert alive() is None  # the entries died with their model


def _linear(keras):
    n, n_in, n_out = 6, 4, 3
    x = RNG.normal(size=(n, n_in)).astype("float32")
    y = RNG.normal(size=(n, n_out)).astype("float32")
    w = RNG.normal(size=(n_in, n_out)).astype("float32")
    inputs = keras.Input((n_in,))
    model = keras.Model(inputs, keras.layers.Dense(n_out, use_bias=False, name="dense")(inputs))
    model.get_layer("dense").set_weights([w])
    xd, yd, wd = (a.astype("float64") for a in (x, y, w))
    # mse = mean over outputs, then over the batch: dL/dW = 2/(N*out) X^T (XW - y); row i of
    # the per-example result is example i's own: 2/out x_i^T (x_i W - y_i).
    batch = 2.0 / (n * n_out) * xd.T @ (xd @ wd - yd)
    rows = 2.0 / n_out * np.einsum("ni,no->nio", xd, xd @ wd - yd)
    return model, x, y, batch, rows


def _scaled_mse_losses(keras, count):
    """`count` distinct lambdas, loss i = (i + 1) * mse: a wrong cache hit gives a wrong scale."""
    mse = keras.losses.mean_squared_error
    return [lambda t, p, s=float(i + 1): s * mse(t, p) for i in range(count)]


def test_new_loss_per_call_keeps_the_gradient_cache_bounded(keras, flavour, bound_3,
                                                            monkeypatch):
    builds = []
    cached = _cache.cached
    monkeypatch.setattr(_cache, "cached", lambda model, key, build: cached(
        model, key, lambda: builds.append(1) or build()))
    model, x, y, expected, _ = _linear(keras)
    named = gk.gradients(model, x, y, loss="mse")["dense/kernel"]
    np.testing.assert_allclose(named, expected, rtol=1e-5, atol=1e-6)
    losses = _scaled_mse_losses(keras, 8)
    sizes = []
    for i, loss in enumerate(losses):
        got = gk.gradients(model, x, y, loss=loss)["dense/kernel"]
        np.testing.assert_allclose(got, (i + 1) * named, rtol=1e-5, atol=1e-6)
        sizes.append(len(_cache.for_model(model)))
    assert sizes == [2] + [3] * 7  # "mse" and the first loss, then the three most recent
    assert len(builds) == 1 + 8
    gk.gradients(model, x, y, loss=losses[-1])  # still cached: no rebuild
    assert len(builds) == 9
    got = gk.gradients(model, x, y, loss=losses[0])["dense/kernel"]  # evicted: rebuilt
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(builds) == 10 and len(_cache.for_model(model)) == 3


def test_new_loss_per_call_keeps_the_per_example_caches_bounded(keras, flavour, bound_3):
    model, x, y, _, expected = _linear(keras)
    losses = _scaled_mse_losses(keras, 6)
    for i, loss in enumerate(losses + losses[:1]):  # losses[0] again at the end: evicted, rebuilt
        # training=True (no layer depends on it) takes torch's vmap route, which caches
        got = gk.per_example_gradients(model, x, y, loss=loss, training=True)["dense/kernel"]
        np.testing.assert_allclose(got, (i % 6 + 1) * expected, rtol=1e-4, atol=1e-5)
        # each loss adds its compiled functions and its per-example route: never past 3
        assert 1 <= len(_cache.for_model(model)) <= 3
