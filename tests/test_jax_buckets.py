"""JAX batch-size buckets: a padded batch gives exactly the unpadded gradients.

gradkit pads a batch to an already compiled size and masks the padded rows out where that is
exact (gradkit._backends._buckets). The reference here is a hand-written `jax.grad` over
`stateless_call` (+ `stateless_compute_loss`, as Keras' JAX trainer) at the exact batch size.
Compilations are counted with JAX's own monitoring event.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.flavours("jax")

SIZES = (3, 9, 16, 13, 1)


@pytest.fixture
def compiles():
    """A function returning the number of XLA compilations so far in this test."""
    import jax

    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield lambda: count[0]
    jax.monitoring.unregister_event_duration_listener(listener)


def reference(model, x, y=None, sample_weight=None, loss=None, target=None, training=False):
    """Gradients at the exact batch size, written by hand."""
    import jax
    import jax.numpy as jnp

    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics = [v.value for v in model.metrics_variables]

    def objective(trainable):
        y_pred, _, losses = model.stateless_call(
            trainable, non_trainable, x, training=training, return_losses=True)
        if target is not None:
            scores = target(y_pred) if callable(target) else y_pred[:, target]
            return jnp.sum(scores * (1.0 if sample_weight is None else sample_weight))
        if loss is not None:
            return loss(y, y_pred, sample_weight=sample_weight) + sum(
                jnp.sum(extra) for extra in losses)
        model._losses_override = list(losses)
        try:
            value, _ = model.stateless_compute_loss(
                trainable, non_trainable, metrics, x=x, y=y, y_pred=y_pred,
                sample_weight=sample_weight, training=training)
        finally:
            model._losses_override = []
        return value

    grads = jax.jit(jax.grad(objective))([v.value for v in model.trainable_variables])
    return [np.asarray(g) for g in grads]


def _mlp(keras, out=4, activation="softmax", regularized=True):
    layers = keras.layers
    reg = keras.regularizers.L2(0.01) if regularized else None
    return keras.Sequential([
        keras.Input((6,)),
        layers.Dense(8, activation="relu", kernel_regularizer=reg),
        layers.Dense(out, activation=activation),
    ])


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    labels = rng.integers(0, 4, size=n)
    onehot = np.eye(4, dtype="float32")[labels]
    weights = rng.uniform(0.2, 2.0, size=n).astype("float32")
    return x, labels.astype("int32"), onehot, weights


def _case(keras, name):
    """(model, x, kwargs of gradkit.gradients, kwargs of reference) for one objective."""
    x, labels, onehot, weights = _data()
    layers = keras.layers
    if name == "compiled_scce":
        model = _mlp(keras)
        model.compile(loss="sparse_categorical_crossentropy")
        return model, x, {"y": labels}, {"y": labels}
    if name == "compiled_two_outputs_weighted":
        inputs = keras.Input((6,))
        hidden = layers.Dense(8, activation="tanh")(inputs)
        outputs = {"a": layers.Dense(3, name="a")(hidden),
                   "b": layers.Dense(1, activation="sigmoid", name="b")(hidden)}
        model = keras.Model(inputs, outputs)
        model.compile(loss={"a": "mse", "b": "binary_crossentropy"},
                      loss_weights={"a": 0.5, "b": 2.0})
        y = {"a": onehot[:, :3], "b": (labels % 2).astype("float32")[:, None]}
        return model, x, {"y": y, "sample_weight": weights}, {"y": y, "sample_weight": weights}
    if name == "loss_sum":
        loss = keras.losses.MeanSquaredError(reduction="sum")
        return _mlp(keras), x, {"y": onehot, "loss": loss}, {"y": onehot, "loss": loss}
    if name == "loss_mean_with_sample_weight":
        loss = keras.losses.CategoricalCrossentropy(reduction="mean_with_sample_weight")
        kwargs = {"y": onehot, "loss": loss, "sample_weight": weights}
        return _mlp(keras), x, kwargs, dict(kwargs)
    if name == "loss_name":
        model = _mlp(keras)
        return model, x, {"y": onehot, "loss": "mse"}, {
            "y": onehot, "loss": keras.losses.MeanSquaredError()}
    if name == "target":
        return _mlp(keras), x, {"target": 2}, {"target": 2}
    if name == "target_weighted":
        kwargs = {"target": 1, "sample_weight": weights}
        return _mlp(keras), x, kwargs, dict(kwargs)
    if name == "batchnorm_inference":
        model = keras.Sequential([keras.Input((6,)), layers.Dense(8),
                                  layers.BatchNormalization(), layers.Dense(4)])
        model.compile(loss="mse")
        return model, x, {"y": onehot}, {"y": onehot}
    if name == "masked_sequence":
        rng = np.random.default_rng(1)
        tokens = rng.integers(1, 9, size=(16, 5)).astype("int32")
        tokens[::3, 3:] = 0  # padding tokens: Keras masks these steps
        y = rng.integers(0, 4, size=(16, 5)).astype("int32")
        model = keras.Sequential([  # the output carries the Embedding's (batch, 5) mask
            keras.Input((5,), dtype="int32"), layers.Embedding(9, 4, mask_zero=True),
            layers.Dense(4, activation="softmax")])
        model.compile(loss="sparse_categorical_crossentropy")
        return model, tokens, {"y": y}, {"y": y}
    raise ValueError(name)


def _rows(kwargs, n):
    def cut(value):
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value[:n] if isinstance(value, np.ndarray) else value

    return {k: cut(v) for k, v in kwargs.items()}


def _check(model, x, kwargs, ref_kwargs, n, training=False):
    import gradkit

    got = gradkit.gradients(model, x[:n], training=training, **_rows(kwargs, n))
    expected = reference(model, x[:n], training=training, **_rows(ref_kwargs, n))
    assert len(got) == len(expected)
    for key, want in zip(got, expected):
        scale = float(np.max(np.abs(want))) + 1e-30
        np.testing.assert_allclose(got[key], want, rtol=2e-5, atol=2e-6 * scale,
                                   err_msg=f"{key} at batch size {n}")


@pytest.mark.parametrize("name", [
    "compiled_scce", "compiled_two_outputs_weighted", "loss_sum",
    "loss_mean_with_sample_weight", "loss_name", "target", "target_weighted",
    "batchnorm_inference", "masked_sequence",
])
def test_padded_batches_give_the_unpadded_gradients(keras, compiles, name):
    model, x, kwargs, ref_kwargs = _case(keras, name)
    import gradkit

    gradkit.gradients(model, x, **kwargs)  # compiles the program for 16 rows
    before = compiles()
    for n in SIZES:  # all served by the 16-row program, padded
        gradkit.gradients(model, x[:n], **_rows(kwargs, n))
        assert compiles() == before, f"batch size {n} compiled a new program"
    for n in (3, 13):
        _check(model, x, kwargs, ref_kwargs, n)


def test_compilations_stay_bounded(keras, compiles):
    import gradkit
    from gradkit._backends._buckets import REUSE

    model = _mlp(keras)
    model.compile(loss="sparse_categorical_crossentropy")
    x, labels, _, _ = _data(n=128)
    gradkit.gradients(model, x[:32], labels[:32])
    start = compiles()
    for n in (1, 2, 5, 8, 13, 20, 31, 17, 4, 30):  # ten sizes below 32: no compilation
        gradkit.gradients(model, x[:n], labels[:n])
    assert compiles() == start
    for n in (40, 70, 50, 100, 90):  # growth: powers of two, 64 and 128
        gradkit.gradients(model, x[:n], labels[:n])
    assert compiles() - start == 2
    for _ in range(REUSE + 3):  # a size used again and again gets its own program, once
        gradkit.gradients(model, x[:7], labels[:7])
    assert compiles() - start == 3
    _check(model, x, {"y": labels}, {"y": labels}, 7)
    _check(model, x, {"y": labels}, {"y": labels}, 90)


def _coupled_case(keras, name):
    x, labels, onehot, _ = _data()
    layers, ops = keras.layers, keras.ops
    if name == "callable_target":
        def target(out):
            return out[:, 0] * ops.mean(out[:, 1])
        return _mlp(keras), x, {"target": target}, {"target": target}, False
    if name == "lambda_layer":
        model = keras.Sequential([keras.Input((6,)), layers.Dense(8),
                                  layers.Lambda(lambda t: t - ops.mean(t, axis=0)),
                                  layers.Dense(4)])
    elif name == "functional_op":
        inputs = keras.Input((6,))
        hidden = layers.Dense(8)(inputs)
        model = keras.Model(inputs, layers.Dense(4)(hidden - ops.mean(hidden, axis=0)))
    elif name == "batchnorm_training":
        model = keras.Sequential([keras.Input((6,)), layers.Dense(8),
                                  layers.BatchNormalization(), layers.Dense(4)])
        model.compile(loss="mse")
        return model, x, {"y": onehot}, {"y": onehot}, True
    elif name == "rank1_output":
        inputs = keras.Input((6,))
        model = keras.Model(inputs, layers.Reshape(())(layers.Dense(1)(inputs)))
        model.compile(loss="mse")
        return model, x, {"y": onehot[:, 0]}, {"y": onehot[:, 0]}, False
    else:
        raise ValueError(name)
    model.compile(loss="mse")
    return model, x, {"y": onehot}, {"y": onehot}, False


@pytest.mark.parametrize("name", ["callable_target", "lambda_layer", "functional_op",
                                  "batchnorm_training", "rank1_output"])
def test_examples_that_see_each_other_are_never_padded(keras, name):
    """Padding would change these results (the padded rows enter a batch mean or the loss's
    own reduction), so they run at their exact size and match the reference."""
    model, x, kwargs, ref_kwargs, training = _coupled_case(keras, name)
    import gradkit

    gradkit.gradients(model, x, training=training, **kwargs)
    _check(model, x, kwargs, ref_kwargs, 5, training=training)
