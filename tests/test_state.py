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
    # Dropout and batch statistics are on in training=True, so the gradient differs; yet the
    # seed state stays put, so two training calls see the same dropout mask and agree
    # exactly. (tf-keras draws unseeded dropout from TF's per-op random kernels, which no
    # one can rewind: its masks differ from call to call, as model(x, training=True) does.)
    model, x, y = trained_stateful_model(keras)
    first = gk.gradients(model, x, y, training=True)
    second = gk.gradients(model, x, y, training=True)
    infer = gk.gradients(model, x, y, training=False)
    key = next(k for k in first if k.endswith("d1/kernel"))
    assert not np.allclose(first[key], infer[key])
    if flavour != "tf_keras":
        for k in first:
            np.testing.assert_array_equal(first[k], second[k], err_msg=k)


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
