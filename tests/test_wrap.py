"""gradkit.transforms.wrap: fit with a wrapped optimizer equals the manual loop
gradients -> transform.update -> gradkit.apply, batch by batch, on every flavour."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_mirrored_step_worker

import gradkit as gk
from gradkit import transforms as T

RNG = np.random.default_rng(8)
X = RNG.normal(size=(24, 5)).astype("float32")
Y = RNG.normal(size=(24, 3)).astype("float32")
BATCH = 8


def _model(keras):
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(6, activation="tanh", name="d1"),
        keras.layers.Dense(3, name="d2"),
    ])


def _sgd(keras):
    return keras.optimizers.SGD(0.1, momentum=0.9)


def _manual(keras, transform, optimizer):
    """The reference: per batch, gradients of fit's objective, transformed, applied."""
    model = _model(keras)
    model.compile(optimizer=optimizer, loss="mse")
    for start in range(0, len(X), BATCH):
        grads = gk.gradients(model, X[start:start + BATCH], Y[start:start + BATCH],
                             training=True)
        changed, _ = transform.update(grads, transform.init(grads))
        gk.apply(model, changed)
    return model.get_weights()


def _fitted(keras, optimizer):
    model = _model(keras)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def _assert_close(got, expected):
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_with_a_wrapped_optimizer_equals_the_manual_loop(keras):
    transform = T.chain(T.clip_by_global_norm(0.2), T.scale_by_layer({"d1": 0.5}),
                        T.clip_by_value(-0.05, 0.05))
    original = _sgd(keras)
    wrapped = T.wrap(original, transform)
    assert wrapped is not original
    _assert_close(_fitted(keras, wrapped), _manual(keras, transform, _sgd(keras)))
    plain = _fitted(keras, original)  # the given optimizer itself runs no transform
    _assert_close(plain, _manual(keras, T.chain(), _sgd(keras)))
    changed = _fitted(keras, T.wrap(_sgd(keras), transform))
    assert max(np.abs(a - b).max() for a, b in zip(plain, changed)) > 1e-3


@pytest.mark.flavours("tensorflow", "tf_keras", "jax")
def test_wrapped_optimizer_trained_data_parallel_equals_the_manual_loop(flavour):
    """The transform sees the replicas' sum and its result is what is applied: Keras 3 on
    TensorFlow all-reduces after the hook (it hands back each replica's share), tf-keras
    before it; JAX's one SPMD step differentiates the global loss."""
    run_mirrored_step_worker(flavour, "wrap")


def test_an_embedding_gradient_is_transformed_as_the_dense_gradient(keras):
    """TensorFlow hands an Embedding's gradient as rows per id looked up (IndexedSlices), an
    id looked up twice in two rows: a clip acts on their sum, as on the other flavours."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, size=(24, 5)).astype("int32")  # every batch repeats ids
    labels = rng.integers(0, 3, size=24).astype("int32")
    transform = T.chain(T.clip_by_value(-0.02, 0.02), T.clip_by_global_norm(0.05))

    def model(optimizer):
        keras.utils.set_random_seed(2)
        m = keras.Sequential([keras.Input((5,), dtype="int32"),
                              keras.layers.Embedding(6, 4, name="emb"),
                              keras.layers.GlobalAveragePooling1D(),
                              keras.layers.Dense(3, name="d")])
        m.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        return m

    fitted = model(T.wrap(keras.optimizers.SGD(0.5), transform))
    fitted.fit(ids, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    manual = model(keras.optimizers.SGD(0.5))
    clipped = 0
    for start in range(0, 24, 8):
        grads = gk.gradients(manual, ids[start:start + 8], labels[start:start + 8],
                             training=True)
        emb = next(v for k, v in grads.items() if "emb" in k)
        clipped += np.abs(emb).max() > 0.02
        changed, _ = transform.update(grads, transform.init(grads))
        gk.apply(manual, changed)
    assert clipped == 3
    _assert_close(fitted.get_weights(), manual.get_weights())


def test_mask_freezes_a_layer_inside_fit(keras):
    model = _model(keras)
    model.compile(optimizer=T.wrap(keras.optimizers.SGD(0.1), T.mask("d1")), loss="mse")
    before = model.get_weights()
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    after = model.get_weights()
    for a, b in zip(before[:2], after[:2]):  # d1: kernel and bias untouched
        np.testing.assert_array_equal(a, b)
    assert np.abs(before[2] - after[2]).max() > 1e-4


def test_apply_if_finite_zeroes_a_nonfinite_update_inside_fit(keras):
    model = _model(keras)
    model.compile(optimizer=T.wrap(keras.optimizers.SGD(0.1),
                                   T.apply_if_finite(T.scale(1.0))), loss="mse")
    before = model.get_weights()
    x = X[:BATCH].copy()
    x[0, 0] = np.nan
    model.fit(x, Y[:BATCH], batch_size=BATCH, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.flavours("tensorflow", "jax", "torch")
def test_a_loss_scale_optimizer_gets_true_scale_gradients(keras):
    transform = T.clip_by_global_norm(0.2)

    def scaled():
        return keras.optimizers.LossScaleOptimizer(_sgd(keras), initial_scale=2.0 ** 10)

    _assert_close(_fitted(keras, T.wrap(scaled(), transform)),
                  _manual(keras, transform, scaled()))


def test_bad_arguments_raise(keras):
    with pytest.raises(gk.InvalidArgumentError, match="optimizer object"):
        T.wrap("adam", T.scale(1.0))
    with pytest.raises(gk.InvalidArgumentError, match="gradient transformation"):
        T.wrap(_sgd(keras), lambda g: g)
    for noisy in (T.add_noise(0.1, seed=0), T.chain(T.scale(1.0), T.add_noise(0.1)),
                  T.apply_if_finite(T.add_noise(0.1))):
        with pytest.raises(gk.InvalidArgumentError, match="add_noise"):
            T.wrap(_sgd(keras), noisy)
