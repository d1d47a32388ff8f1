"""The case the examples share: the question gradkit answers, and the code it replaces.

The question (Keras 2 / TF 2.4): "model.optimizer.get_gradients(model.total_loss,
model.trainable_weights) gives symbolic tensors; how do I get NumPy arrays?" Keras 3 removed
`get_gradients`, `total_loss` and `K.function`, so the usual answer is a hand-written
recipe per backend. `gradient_function` below is that recipe, the reference the examples
check gradkit against:

- TensorFlow: a GradientTape inside a tf.function (the accepted answer);
- JAX: jax.grad over model.stateless_call, jitted;
- PyTorch: torch.autograd.grad over the model's call.

The loss is the mean over the batch of the categorical cross-entropy of model(x), with
training=False, which is also what the model's compiled loss computes.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def model_and_data(seed: int = 0):
    """The question's model (10 -> 32 relu -> 5 softmax, Adam, categorical cross-entropy)
    and a batch of 32 random examples with one-hot labels."""
    init = keras.initializers.GlorotUniform  # seeded here: no global seed needed
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(32, activation="relu", kernel_initializer=init(seed), name="dense_1"),
        keras.layers.Dense(5, activation="softmax", kernel_initializer=init(seed + 1),
                           name="dense_2"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.001),
                  loss="categorical_crossentropy")
    rng = np.random.default_rng(seed)
    x = rng.random((32, 10), dtype=np.float32)
    y = np.eye(5, dtype=np.float32)[rng.integers(0, 5, size=32)]
    return model, x, y


def gradient_function(model, variables):
    """The hand-written recipe: a function (x, y) -> [NumPy gradient per variable]."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow(model, variables)
    if backend == "jax":
        return _jax(model, variables)
    if backend == "torch":
        return _torch(model, variables)
    raise SystemExit(f"no hand-written recipe for the {backend!r} backend")


def _mean_crossentropy(y, predictions):
    return keras.ops.mean(keras.losses.categorical_crossentropy(y, predictions))


def _tensorflow(model, variables):
    import tensorflow as tf

    @tf.function
    def get_gradients(x, y):
        with tf.GradientTape() as tape:
            loss = _mean_crossentropy(y, model(x))
        return tape.gradient(loss, variables)

    return lambda x, y: [g.numpy() for g in get_gradients(x, y)]


def _jax(model, variables):
    import jax

    def loss_fn(trainable_values, non_trainable_values, x, y):
        predictions, _ = model.stateless_call(trainable_values, non_trainable_values, x)
        return _mean_crossentropy(y, predictions)

    grad_fn = jax.jit(jax.grad(loss_fn))
    ids = [id(v) for v in model.trainable_variables]
    positions = [ids.index(id(v)) for v in variables]

    def get_gradients(x, y):
        grads = grad_fn([v.value for v in model.trainable_variables],
                        [v.value for v in model.non_trainable_variables], x, y)
        return [np.asarray(grads[i]) for i in positions]

    return get_gradients


def _torch(model, variables):
    import torch

    def get_gradients(x, y):
        loss = _mean_crossentropy(torch.as_tensor(y), model(torch.as_tensor(x)))
        grads = torch.autograd.grad(loss, [v.value for v in variables])
        return [g.detach().cpu().numpy() for g in grads]

    return get_gradients
