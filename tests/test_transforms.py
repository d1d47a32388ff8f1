"""gradkit.transforms against closed forms written out in NumPy (and optax where installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradkit as gk
from gradkit import transforms as T


def _grads(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "model/dense/kernel": (scale * rng.normal(size=(3, 4))).astype("float32"),
        "model/dense/bias": (scale * rng.normal(size=(4,))).astype("float32"),
        "model/conv_1/kernel": (scale * rng.normal(size=(2, 2, 1, 3))).astype("float32"),
        "model/conv_2/kernel": (scale * rng.normal(size=(3,))).astype("float64"),
        "model/head/kernel": None,
    }


def _run(tx, grads):
    """One update from a fresh state, checking that `grads` is left as it was."""
    before = {k: None if g is None else g.copy() for k, g in grads.items()}
    out, _ = tx.update(grads, tx.init(grads))
    assert list(out) == list(grads)
    for key, g in grads.items():
        if g is None:
            assert out[key] is None
            continue
        np.testing.assert_array_equal(g, before[key], err_msg=f"{key} modified in place")
        assert out[key].dtype == g.dtype and out[key].shape == g.shape, key
    return out


def _arrays(grads):
    return {k: g for k, g in grads.items() if g is not None}


def _global_norm(grads):
    return math.sqrt(sum(float(np.sum(g.astype("float64") ** 2)) for g in _arrays(grads).values()))


def _close(actual, expected, rtol=1e-6, ordered=True):
    assert list(actual) == list(expected) if ordered else sorted(actual) == sorted(expected)
    for key, e in expected.items():
        if e is None:
            assert actual[key] is None, key
        else:
            np.testing.assert_allclose(actual[key], e, rtol=rtol, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_closed_form(max_norm):
    grads = _grads(scale=2.0)
    norm = _global_norm(grads)
    factor = max_norm / norm if norm > max_norm else 1.0
    out = _run(T.clip_by_global_norm(max_norm), grads)
    _close(out, {k: None if g is None else g * factor for k, g in grads.items()})
    assert math.isclose(_global_norm(out), min(norm, max_norm), rel_tol=1e-6)


def test_clip_by_norm_clips_each_variable_alone():
    grads = _grads()
    norms = {k: float(np.linalg.norm(g.astype("float64"))) for k, g in _arrays(grads).items()}
    max_norm = float(np.median(list(norms.values())))  # some variables above it, some below
    expected = {k: None if g is None else g * min(1.0, max_norm / norms[k])
                for k, g in grads.items()}
    out = _run(T.clip_by_norm(max_norm), grads)
    _close(out, expected)
    after = [np.linalg.norm(g) for g in _arrays(out).values()]
    assert max(after) <= max_norm * (1 + 1e-6) and min(after) < max_norm * 0.99


def test_clip_by_value_and_scale():
    grads = _grads(scale=2.0)
    _close(_run(T.clip_by_value(-0.5, 1.0), grads),
           {k: None if g is None else np.minimum(np.maximum(g, -0.5), 1.0)
            for k, g in grads.items()})
    _close(_run(T.scale(-0.25), grads),
           {k: None if g is None else -0.25 * g for k, g in grads.items()})
    same = _run(T.clip_by_value(-np.inf, np.inf), grads)
    _close(same, grads, rtol=0)


def test_chain_applies_in_order_and_order_matters():
    grads = _grads(scale=2.0)
    assert _global_norm(grads) > 1.0
    clip_then_scale = _run(T.chain(T.clip_by_global_norm(1.0), T.scale(3.0)), grads)
    scale_then_clip = _run(T.chain(T.scale(3.0), T.clip_by_global_norm(1.0)), grads)
    assert math.isclose(_global_norm(clip_then_scale), 3.0, rel_tol=1e-6)
    assert math.isclose(_global_norm(scale_then_clip), 1.0, rel_tol=1e-6)
    tx = T.chain(T.scale(2.0), T.add_noise(0.1, seed=0))
    state = tx.init(grads)
    assert isinstance(state, tuple) and len(state) == 2
    assert _run(T.chain(), grads).keys() == grads.keys()  # the empty chain is the identity


def test_scale_by_layer_with_globs_names_and_paths():
    grads = _grads()
    out = _run(T.scale_by_layer({"conv*": 2.0, "model/dense": 0.5}), grads)
    factors = {"model/dense/kernel": 0.5, "model/dense/bias": 0.5, "model/conv_1/kernel": 2.0,
               "model/conv_2/kernel": 2.0}
    _close(out, {k: None if g is None else g * factors[k] for k, g in grads.items()})
    only_one = _run(T.scale_by_layer({"conv_2": -1.0}), grads)  # the others keep factor 1
    _close(only_one, {k: None if g is None else g * (-1.0 if "conv_2" in k else 1.0)
                      for k, g in grads.items()})


def test_scale_by_layer_patterns_that_match_nothing_or_overlap_raise():
    grads = _grads()
    with pytest.raises(gk.UnknownLayerError, match=r"'dens' matches no layer.*model/dense.*"
                                                   r"Received: pattern='dens'"):
        T.scale_by_layer({"dens": 0.5}).init(grads)
    with pytest.raises(gk.InvalidArgumentError, match=r"'model/conv_1' matches both 'conv\*' "
                                                      r"and 'conv_1'.*Received: patterns="):
        T.scale_by_layer({"conv*": 2.0, "conv_1": 3.0}).update(grads, None)
    with pytest.raises(gk.InvalidArgumentError, match=r"factors\['d'\] must be a finite number"):
        T.scale_by_layer({"d": float("nan")})
    with pytest.raises(gk.InvalidArgumentError, match=r"non-empty dict.*Received: factors=\{\}"):
        T.scale_by_layer({})


def test_mask_zeroes_the_given_layers_and_freeze_is_the_same():
    grads = _grads()
    assert T.freeze is T.mask
    for layers in (["dense", "conv_2"], ("model/dense", "*_2")):
        out = _run(T.mask(layers=layers), grads)
        for key, g in _arrays(grads).items():
            masked = "dense" in key or "conv_2" in key
            np.testing.assert_array_equal(out[key], np.zeros_like(g) if masked else g)
    out = _run(T.mask("conv*"), grads)
    assert not np.any(out["model/conv_1/kernel"]) and np.any(out["model/dense/kernel"])
    with pytest.raises(gk.UnknownLayerError, match=r"'decoder' matches no layer"):
        _run(T.mask(layers=["dense", "decoder"]), grads)
    with pytest.raises(gk.InvalidArgumentError, match=r"layer patterns are non-empty strings"):
        T.mask(layers=[3])


def test_add_noise_mean_and_std_within_sampling_error():
    n, stddev = 200_000, 0.7
    grads = {"layer/kernel": np.full((n,), 2.0, "float32"), "layer/bias": None}
    out = _run(T.add_noise(stddev, seed=5), grads)
    noise = out["layer/kernel"].astype("float64") - 2.0
    # 6 standard errors: the mean's is σ/√n, the sample standard deviation's about σ/√(2n).
    assert abs(noise.mean()) < 6 * stddev / math.sqrt(n)
    assert abs(noise.std() - stddev) < 6 * stddev / math.sqrt(2 * n)


def test_add_noise_is_reproducible_and_advances_through_the_state():
    grads = _grads()
    tx = T.add_noise(0.1, seed=3)
    state = tx.init(grads)
    first, state1 = tx.update(grads, state)
    again, _ = tx.update(grads, state)  # the same state gives the same noise
    _close(again, first, rtol=0)
    second, _ = tx.update(grads, state1)  # the returned state gives new noise
    assert not np.array_equal(first["model/dense/kernel"], second["model/dense/kernel"])
    other = T.add_noise(0.1, seed=3)
    _close(other.update(grads, other.init(grads))[0], first, rtol=0)  # same seed, same noise
    fresh = T.add_noise(0.1)
    a = fresh.update(grads, fresh.init(grads))[0]
    b = fresh.update(grads, fresh.init(grads))[0]
    assert not np.array_equal(a["model/dense/kernel"], b["model/dense/kernel"])
    _close(_run(T.add_noise(0.0, seed=1), grads), grads, rtol=0)


def test_apply_if_finite_zeroes_the_update_and_keeps_the_inner_state():
    grads, bad = _grads(), _grads()
    bad["model/dense/bias"] = bad["model/dense/bias"].copy()
    bad["model/dense/bias"][1] = np.nan
    inner = T.chain(T.scale(2.0), T.add_noise(0.1, seed=0))
    tx = T.apply_if_finite(inner)
    state = tx.init(grads)
    assert state == T.ApplyIfFiniteState(0, True, 0, state.inner_state)

    zeros, state = tx.update(bad, state)
    for key, g in bad.items():
        assert (zeros[key] is None) if g is None else (
            zeros[key].dtype == g.dtype and not np.any(zeros[key]))
    zeros, state = tx.update(bad, state)
    assert (state.notfinite_count, state.last_finite, state.total_notfinite) == (2, False, 2)

    out, state = tx.update(grads, state)  # the noise the first update would have drawn
    reference, _ = inner.update(grads, inner.init(grads))
    _close(out, reference, rtol=0)
    assert (state.notfinite_count, state.last_finite, state.total_notfinite) == (0, True, 2)
    inf = dict(grads, **{"model/conv_1/kernel": np.full((2, 2, 1, 3), np.inf, "float32")})
    assert not np.any(tx.update(inf, state)[0]["model/dense/kernel"])


def test_float16_and_float64_keep_their_dtype():
    grads = {"a/kernel": np.array([300.0, -400.0], "float16"),  # squares overflow float16
             "b/kernel": np.array([1e-3, 2e-3], "float64")}
    out = _run(T.clip_by_global_norm(1.0), grads)
    assert out["a/kernel"].dtype == np.float16 and out["b/kernel"].dtype == np.float64
    np.testing.assert_allclose(out["a/kernel"], [0.6, -0.8], rtol=1e-3)
    for tx in (T.clip_by_norm(1.0), T.clip_by_value(-1, 1), T.scale(0.5),
               T.add_noise(0.1, seed=0), T.mask("a"), T.scale_by_layer({"b": 2})):
        _run(tx, grads)


@pytest.mark.parametrize("make, message", [
    (lambda: T.clip_by_global_norm(-1.0), r"max_norm must be a finite number > 0.*max_norm=-1.0"),
    (lambda: T.clip_by_global_norm(0), r"max_norm must be .* > 0.*Received: max_norm=0"),
    (lambda: T.clip_by_norm(float("inf")), r"max_norm must be a finite number"),
    (lambda: T.clip_by_value(1.0, -1.0), r"lo <= hi.*Received: lo=1.0, hi=-1.0"),
    (lambda: T.clip_by_value(float("nan"), 1.0), r"lo must be a number.*Received: lo=nan"),
    (lambda: T.scale("2"), r"factor must be a finite number.*Received: factor='2'"),
    (lambda: T.scale(True), r"Received: factor=True"),
    (lambda: T.add_noise(-0.1), r"stddev must be a finite number >= 0.*stddev=-0.1"),
    (lambda: T.add_noise(0.1, seed=1.5), r"seed=\) must be a non-negative int.*seed=1.5"),
    (lambda: T.chain(T.scale(1.0), "clip"), r"argument 1 is not one.*Received: transform='clip'"),
    (lambda: T.apply_if_finite(T.scale), r"wraps a gradient transformation.*Received: inner="),
])
def test_bad_arguments_raise_clear_errors(make, message):
    with pytest.raises(gk.InvalidArgumentError, match=message):
        make()


def test_bad_gradient_sets_raise_clear_errors():
    tx = T.clip_by_global_norm(1.0)
    grads = _grads()
    with pytest.raises(gk.InvalidArgumentError, match=r"not a dict.*Received: grads=\["):
        tx.init(list(grads.values()))
    with pytest.raises(gk.InvalidArgumentError, match=r"not a dict"):
        tx.update(list(grads.values()), None)
    with pytest.raises(gk.InvalidArgumentError,
                       match=r"'x/kernel' is not a floating-point.*Received: grads\['x/kernel'\]"):
        tx.update({"x/kernel": np.ones(3, "int32")}, None)
    with pytest.raises(gk.InvalidArgumentError, match=r"'x/kernel' is not a floating-point"):
        T.add_noise(1.0, seed=0).init({"x/kernel": [1.0, 2.0]})


# --- the same arrays through optax (installed with the `test` extra)

@pytest.mark.flavours("jax")  # optax runs on JAX; the transforms themselves are pure NumPy
def test_against_optax():
    optax = pytest.importorskip("optax")
    grads = _arrays(_grads(scale=2.0))
    grads = {k: g.astype("float32") for k, g in grads.items()}  # optax keeps JAX's float32
    cases = [
        (T.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
        (T.clip_by_value(-0.3, 0.3), optax.clip(0.3)),
        (T.scale(-0.1), optax.scale(-0.1)),
        (T.chain(T.clip_by_global_norm(1.0), T.scale(-0.1)),
         optax.chain(optax.clip_by_global_norm(1.0), optax.scale(-0.1))),
        (T.chain(T.scale(3.0), T.clip_by_value(-0.5, 0.5), T.clip_by_global_norm(0.7)),
         optax.chain(optax.scale(3.0), optax.clip(0.5), optax.clip_by_global_norm(0.7))),
    ]
    for ours, theirs in cases:
        expected, _ = theirs.update(grads, theirs.init(grads))
        _close(_run(ours, grads), {k: np.asarray(v) for k, v in expected.items()}, rtol=1e-5,
               ordered=False)  # JAX returns dicts in sorted key order


@pytest.mark.flavours("jax")
def test_apply_if_finite_against_optax():
    optax = pytest.importorskip("optax")
    grads = _arrays(_grads())
    grads = {k: g.astype("float32") for k, g in grads.items()}
    bad = dict(grads, **{"model/dense/bias": np.array([np.nan, 1, 2, 3], "float32")})
    ours = T.apply_if_finite(T.scale(2.0))
    theirs = optax.apply_if_finite(optax.scale(2.0), max_consecutive_errors=100)
    s1, s2 = ours.init(grads), theirs.init(grads)
    for g in (grads, bad, bad, grads, bad):
        o1, s1 = ours.update(g, s1)
        o2, s2 = theirs.update(g, s2)
        _close(o1, {k: np.asarray(v) for k, v in o2.items()}, rtol=0, ordered=False)
        assert (s1.notfinite_count, s1.last_finite, s1.total_notfinite) == (
            int(s2.notfinite_count), bool(s2.last_finite), int(s2.total_notfinite))
