"""The streaming statistics against NumPy on the materialized per-example arrays."""

from __future__ import annotations

import numpy as np
import pytest

from gradkit import InvalidArgumentError
from gradkit._select import layer_of
from gradkit._stats import MomentAccumulator

RNG = np.random.default_rng(1)


def _per_example(n):
    rng = np.random.default_rng(n)  # the same data for every partition of one size
    return {
        "block/dense/kernel": rng.normal(0.8, 1.0, size=(n, 3, 2)).astype("float32"),
        "block/dense/bias": rng.normal(-0.8, 0.5, size=(n, 2)).astype("float32"),
        "out/kernel": rng.normal(1.0, 2.0, size=(n, 2, 1)).astype("float32"),
    }


def _stream(data, cuts):
    acc = MomentAccumulator()
    for start, stop in zip(cuts[:-1], cuts[1:]):
        acc.update({k: v[start:stop] for k, v in data.items()})
    return acc.result()


def _mccandlish(flat):
    """Appendix A of McCandlish et al. (2018) with B_small = 1 and B_big = n, written out."""
    n = flat.shape[0]
    g_small_sq = np.mean(np.sum(flat**2, axis=1))  # E|G_{B=1}|²
    g_big_sq = np.sum(flat.mean(axis=0) ** 2)       # |G_{B=n}|²
    true_sq = (n * g_big_sq - 1 * g_small_sq) / (n - 1)
    trace = (g_small_sq - g_big_sq) / (1 / 1 - 1 / n)
    return trace, true_sq, trace / true_sq if true_sq > 0 else np.inf


@pytest.mark.parametrize("cuts", [[0, 17], [0, 5, 10, 15, 17], list(range(18)), [0, 1, 16, 17]])
def test_streaming_equals_numpy_for_any_partition(cuts):
    data = _per_example(17)
    stats = _stream(data, cuts)
    assert stats.count == 17
    for key, g in data.items():
        g = g.astype("float64")
        np.testing.assert_allclose(stats.mean[key], g.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats.variance[key], g.var(0, ddof=1), rtol=1e-5)
        np.testing.assert_allclose(stats.second_moment[key], np.mean(g**2, 0), rtol=1e-5)
        np.testing.assert_allclose(stats.snr[key], g.mean(0) ** 2 / g.var(0, ddof=1), rtol=1e-4)
        assert stats.mean[key].dtype == np.float32 and stats.mean[key].shape == g.shape[1:]
        flat = g.reshape(17, -1)
        summary = stats.variables[key]
        np.testing.assert_allclose(summary.norm_of_mean, np.linalg.norm(g.mean(0)), rtol=1e-6)
        np.testing.assert_allclose(
            summary.mean_example_norm, np.mean(np.linalg.norm(flat, axis=1)), rtol=1e-6)
        trace, _, noise = _mccandlish(flat)
        assert np.isfinite(noise)
        np.testing.assert_allclose(summary.trace_variance, trace, rtol=1e-5)
        np.testing.assert_allclose(summary.noise_scale, noise, rtol=1e-4)


def test_layer_and_total_summaries_concatenate_their_variables():
    data = _per_example(9)
    stats = _stream(data, [0, 4, 9])
    groups = {
        "block/dense": ["block/dense/kernel", "block/dense/bias"],
        "out": ["out/kernel"],
    }
    assert set(stats.layers) == set(groups)
    for name, summary in [*((n, stats.layers[n]) for n in groups), ("total", stats.total)]:
        keys = groups.get(name, list(data))
        flat = np.concatenate([data[k].astype("float64").reshape(9, -1) for k in keys], axis=1)
        trace, true_sq, noise = _mccandlish(flat)
        np.testing.assert_allclose(summary.norm_of_mean, np.linalg.norm(flat.mean(0)), rtol=1e-6)
        np.testing.assert_allclose(
            summary.mean_example_norm, np.linalg.norm(flat, axis=1).mean(), rtol=1e-6)
        np.testing.assert_allclose(summary.trace_variance, trace, rtol=1e-5)
        np.testing.assert_allclose(summary.noise_scale, noise, rtol=1e-4)
        np.testing.assert_allclose(
            summary.snr, np.sum(flat.mean(0) ** 2) / np.sum(flat.var(0, ddof=1)), rtol=1e-5)
        assert true_sq > 0


def test_merge_is_stable_where_the_naive_formula_cancels():
    # Large mean, tiny spread: E[g²] - E[g]² in float32 loses every digit of the variance.
    g = (1e4 + RNG.normal(0, 1e-2, size=(4000, 3))).astype("float64")
    stats = _stream({"v": g.astype("float32")}, list(range(0, 4001, 250)))
    reference = g.astype("float32").astype("float64").var(0, ddof=1)
    np.testing.assert_allclose(stats.variance["v"], reference, rtol=1e-3)
    f32 = g.astype("float32")
    naive = np.mean(f32**2, 0) - np.mean(f32, 0) ** 2
    assert not np.allclose(naive, reference, rtol=1e-1)  # the failure mode being guarded


def test_float64_gradients_stay_float64_and_noise_dominated_scale_is_inf():
    g = RNG.normal(0, 1, size=(50, 4))  # zero-mean: |G|² estimate near or below zero
    g = g - g.mean(0)
    stats = _stream({"w": g}, [0, 50])
    assert stats.mean["w"].dtype == np.float64
    assert stats.variables["w"].noise_scale == float("inf")


def test_fewer_than_two_examples_and_mismatched_chunks_raise():
    acc = MomentAccumulator()
    acc.update({"w": np.ones((1, 2))})
    with pytest.raises(InvalidArgumentError, match="at least 2 examples"):
        acc.result()
    with pytest.raises(InvalidArgumentError, match="same variables"):
        acc.update({"v": np.ones((1, 2))})
    with pytest.raises(InvalidArgumentError, match="leading example axis"):
        acc.update({"w": np.ones((2, 2)), "v": np.ones((3, 2))})


def test_layer_of():
    assert layer_of("a/b/kernel") == "a/b"
    assert layer_of("kernel") == "kernel"


# --- gradient_stats on a model: against per-example gradients from a slow loop of gradients()


def _stats_model(keras):
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.l2(0.1),
                           name="hidden"),
        keras.layers.Dense(2, name="out"),
    ])
    model.compile(loss="mse")
    return model


def test_gradient_stats_equal_numpy_on_a_loop_of_single_examples(keras):
    import gradkit as gk

    rng = np.random.default_rng(5)
    n = 12
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32") + 1.0
    sw = rng.uniform(0.5, 1.5, size=n).astype("float32")
    model = _stats_model(keras)
    loop = [gk.gradients(model, x[i:i + 1], y[i:i + 1], sample_weight=sw[i:i + 1])
            for i in range(n)]
    per_example = {k: np.stack([g[k] for g in loop]).astype("float64") for k in loop[0]}

    stats = gk.gradient_stats(model, (x, y, sw), batch_size=5)

    assert stats.count == n and list(stats.mean) == list(per_example)
    for key, g in per_example.items():
        np.testing.assert_allclose(stats.mean[key], g.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats.variance[key], g.var(0, ddof=1), rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(stats.second_moment[key], np.mean(g**2, 0), rtol=1e-4,
                                   atol=1e-7)
    flat = np.concatenate([g.reshape(n, -1) for g in per_example.values()], axis=1)
    trace, _, noise = _mccandlish(flat)
    np.testing.assert_allclose(stats.total.norm_of_mean, np.linalg.norm(flat.mean(0)), rtol=1e-4)
    np.testing.assert_allclose(stats.total.mean_example_norm,
                               np.linalg.norm(flat, axis=1).mean(), rtol=1e-4)
    np.testing.assert_allclose(stats.total.trace_variance, trace, rtol=1e-3)
    np.testing.assert_allclose(stats.total.noise_scale, noise, rtol=1e-3)
    assert {layer_of(k) for k in per_example} == set(stats.layers)
    # a short repr, and summary() of the stats: one row per layer, then the total
    assert "\n" not in repr(stats) and len(repr(stats)) < 250 and "count=" in repr(stats)
    table = gk.summary(stats).splitlines()
    assert [line.split()[0] for line in table[2:-2]] == list(stats.layers)
    assert table[-1].startswith(f"total ({n} examples)")
    assert float(table[-1].split()[-4]) == pytest.approx(stats.total.norm_of_mean, rel=1e-3)
    # The mean per-example gradient is the dataset gradient (regularizer counted once).
    accumulated = gk.accumulate(model, (x, y, sw), batch_size=5)
    for key in accumulated:
        np.testing.assert_allclose(stats.mean[key], accumulated[key], rtol=1e-4, atol=1e-6)


def test_gradient_stats_layers_and_errors(keras):
    import gradkit as gk

    model = _stats_model(keras)
    x = np.ones((4, 3), "float32")
    y = np.zeros((4, 2), "float32")
    stats = gk.gradient_stats(model, [(x[:2], y[:2]), (x[2:], y[2:])], layers="out")
    assert [k.rpartition("/")[0].rpartition("/")[2] for k in stats.mean] == ["out", "out"]
    with pytest.raises(InvalidArgumentError, match="at least 2 examples"):
        gk.gradient_stats(model, (x[:1], y[:1]))
    with pytest.raises(InvalidArgumentError, match="y is required"):
        gk.gradient_stats(model, x)
