"""No model state changes: every variable, statistic, seed, optimizer slot and metric is
bitwise identical after gradkit calls, in training mode too."""

from __future__ import annotations

import numpy as np
import pytest

import gradkit as gk
from conftest import assert_same_state, state_snapshot, to_numpy, trained_stateful_model

RNG = np.random.default_rng(3)


def test_no_state_changes(keras):
    model, x, y = trained_stateful_model(keras)
    before = state_snapshot(model)
    moving_mean = to_numpy(model.get_layer("bn").moving_mean)
    assert not np.all(moving_mean == 0)  # fit changed it: the snapshot holds real state

    gk.gradients(model, x, y, training=True)
    gk.gradients(model, x[:5], y[:5], training=True)  # another batch size
    gk.gradients(model, x, y, loss="mae", sample_weight=np.arange(8.0), training=True)
    gk.gradients(model, x, target=1, layers="d2", training=True)
    gk.gradients(model, x, y)  # inference mode too

    assert_same_state(before, state_snapshot(model))


def test_training_true_really_trains_mode(keras, flavour):
    # Dropout and batch statistics are on in training=True, so the gradient differs.
    model, x, y = trained_stateful_model(keras)
    first = gk.gradients(model, x, y, training=True)
    infer = gk.gradients(model, x, y, training=False)
    key = next(k for k in first if k.endswith("d1/kernel"))
    assert not np.allclose(first[key], infer[key])


def _dropout_model(keras, traces):
    class Counting(keras.layers.Layer):
        def call(self, inputs):
            traces.append(1)  # under tf.function and jax.jit: runs only while tracing
            return inputs

    # 32 units: per-example rows of one call share one mask draw, and two fresh draws over 8
    # units came out equal about once in 256 runs (a flaky "fresh masks differ" check)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(32, name="d1"),
                              Counting(), keras.layers.Dropout(0.5, name="drop"),
                              keras.layers.Dense(2, name="d2")])
    model.compile(loss="mse")
    return model, RNG.normal(size=(5, 6)).astype("float32"), \
        RNG.normal(size=(5, 2)).astype("float32")


def test_dropout_seed(keras, flavour):
    # seed=int: reproducible masks; seed=None: fresh masks per call, as fit; the model's own
    # seed state (seed generators, torch's global generator) never moves either way.
    traces: list = []
    model, x, y = _dropout_model(keras, traces)
    vector = gk.gradients(model, x, y)
    key = next(k for k in vector if k.endswith("d1/kernel"))
    before = state_snapshot(model)
    if flavour == "torch":
        import torch

        rng_before = torch.get_rng_state()
    calls = {
        "gradients": lambda **kw: gk.gradients(model, x, y, **kw)[key],
        "per_example": lambda **kw: gk.per_example_norms(model, x, y, **kw),
        "inputs": lambda **kw: gk.input_gradients(model, x, y, **kw),
        "accumulate": lambda **kw: gk.accumulate(model, (x, y), batch_size=2, progress=False,
                                                 **kw)[key],
        "stats": lambda **kw: gk.gradient_stats(model, (x, y), batch_size=3, progress=False,
                                                **kw).variance[key],
        "ggn_vp": lambda **kw: gk.ggn_vp(model, x, y, vector=vector, **kw)[key],
        "hvp_over": lambda **kw: gk.hvp_over(model, (x, y), vector=vector, batch_size=2,
                                             **kw)[key],
    }
    for name, call in calls.items():
        for _ in range(8):  # per-example: the route trial (vectorized, then the compiled loop)
            call(training=True, seed=5)
        same = [call(training=True, seed=7) for _ in range(2)]
        traced = len(traces)
        fresh = [call(training=True) for _ in range(2)]
        other = call(training=True, seed=8)
        if flavour != "torch":  # the seed is an input of the compiled function
            assert len(traces) == traced, f"{name}: retraced for a new seed"
        # the same masks agree to rounding (routes may differ); other masks differ plainly
        np.testing.assert_allclose(same[0], same[1], rtol=1e-5, atol=1e-7, err_msg=name)
        assert not np.allclose(fresh[0], fresh[1], rtol=1e-3), name
        assert not np.allclose(same[0], other, rtol=1e-3), name
    assert_same_state(before, state_snapshot(model))
    if flavour == "torch":
        assert torch.equal(rng_before, torch.get_rng_state())
    with pytest.raises(gk.GradkitError, match="training=True"):
        gk.gradients(model, x, y, seed=3)
    with pytest.raises(gk.GradkitError, match="Received: seed=1.5"):
        gk.gradients(model, x, y, training=True, seed=1.5)
    with pytest.raises(gk.GradkitError, match="training=True"):
        gk.hvp_over(model, (x, y), vector=vector, seed=3)


@pytest.mark.flavours("torch")
def test_torch_global_rng_is_not_advanced(keras):
    # Keras on torch draws unseeded dropout masks from torch's global generator, as fit does;
    # a gradkit call must leave that stream where it was.
    import torch

    model, x, y = trained_stateful_model(keras)
    before = torch.get_rng_state()
    gk.gradients(model, x, y, training=True)
    assert torch.equal(before, torch.get_rng_state())



def test_gradients_before_and_after_the_first_fit(keras):
    # fit builds the optimizer and compiled metrics after gradkit traced its function; the
    # cached function must keep working and keep leaving every new variable alone.
    model = keras.Sequential(name="late", layers=[
        keras.Input((4,)), keras.layers.Dense(3, name="d"), keras.layers.BatchNormalization(
            name="bn")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    x = RNG.normal(size=(8, 4)).astype("float32")
    y = RNG.normal(size=(8, 3)).astype("float32")
    early = gk.gradients(model, x, y, training=True)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = state_snapshot(model)
    late = gk.gradients(model, x, y, training=True)
    assert_same_state(before, state_snapshot(model))
    assert list(late) == list(early)
    assert not np.allclose(late[list(late)[0]], early[list(early)[0]])  # weights moved
    fresh = keras.models.clone_model(model)
    fresh.set_weights(model.get_weights())
    fresh.compile(loss="mse")
    for a, b in zip(late.values(), gk.gradients(fresh, x, y, training=True).values()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
