"""Data parallel over two CPU devices: what the optimizer step hook sees and returns.

    python _mirrored_step_worker.py FLAVOUR CHECK     (FLAVOUR: tensorflow | tf_keras | jax;
                                                       CHECK: monitor | wrap | apply)

TensorFlow and tf-keras: a MirroredStrategy over two logical CPUs; JAX: Keras'
``DataParallel`` distribution over two forced host devices (one SPMD step: the gradient it
differentiates is already global).

monitor: `GradientMonitor` records the global gradients of each step (summed over the
replicas) and, after the optimizer's ``clipnorm``, what it applied: Keras 3 clips each
replica's share before its all-reduce, tf-keras all-reduces first and clips the sum (as does
JAX's global step).
wrap: `fit` with a `transforms.wrap`ped optimizer equals a manual single-device loop of
``gradients -> transform.update -> apply``, for a transform that is not linear (a global
norm clip), so that the hook must see the sum and hand back exactly its result.
apply: `gradients` then `apply` on a model built for the devices, called outside the
strategy's scope and inside it, equal the same on a model built without them, with every
replica's copy of the weights and of the optimizer's slots kept equal.
Prints "ok"; exits non-zero on a mismatch.
"""

import os
import sys

FLAVOUR, CHECK = sys.argv[1], sys.argv[2]
if FLAVOUR == "tf_keras":
    os.environ.pop("KERAS_BACKEND", None)
else:
    os.environ["KERAS_BACKEND"] = FLAVOUR
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import contextlib  # noqa: E402

import numpy as np  # noqa: E402

if FLAVOUR == "jax":
    import jax  # noqa: E402
    import keras  # noqa: E402
else:
    import tensorflow as tf  # noqa: E402

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    if FLAVOUR == "tf_keras":
        import tf_keras as keras  # noqa: E402
    else:
        import keras  # noqa: E402
    STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

import gradkit as gk  # noqa: E402
from gradkit import transforms as T  # noqa: E402

rng = np.random.default_rng(1)
x = rng.normal(size=(32, 5)).astype("float32")
y = rng.normal(size=(32, 3)).astype("float32")


def build(optimizer):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, "tanh", name="d1"),
                              keras.layers.Dense(3, name="d2")], name="m")
    model.compile(optimizer=optimizer, loss="mse")
    return model


class Weights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append(self.model.get_weights())


@contextlib.contextmanager
def distributed():
    """Models built inside train data parallel over the two devices."""
    if FLAVOUR == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        try:
            yield
        finally:
            keras.distribution.set_distribution(None)
        return
    with STRATEGY.scope():
        yield


def close(got, expected, what):
    assert abs(got - expected) <= 1e-5 * abs(expected), (what, got, expected)


def batch(k, part=slice(None)):
    sl = slice(16 * k, 16 * (k + 1))
    return x[sl][part], y[sl][part]


def twins(optimizer):
    """(a model built without the devices, one built for them), with the same weights;
    `optimizer()` makes each one's optimizer."""
    keras.utils.set_random_seed(0)
    ref = build(optimizer())
    with distributed():
        model = build(optimizer())
        model.set_weights(ref.get_weights())
    return ref, model


def check_monitor():
    ref, model = twins(lambda: keras.optimizers.SGD(0.1, clipnorm=0.3))
    with distributed():  # (JAX shards the batches of a fit under the distribution)
        monitor, weights = gk.GradientMonitor(every=1, writers=()), Weights()
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[weights, monitor])
    h = monitor.history
    assert list(h["step"]) == [0, 1], h["step"]
    for k in range(2):
        ref.set_weights(weights.seen[k])
        g = gk.gradients(ref, *batch(k), training=True)
        halves = [gk.gradients(ref, *batch(k, slice(8 * r, 8 * (r + 1))), training=True)
                  for r in range(2)]
        for key, v in g.items():
            close(h["variables"]["norm"][key][k], np.linalg.norm(v), (k, key, "norm"))
            if FLAVOUR != "tensorflow":  # the sum clipped
                applied = v * min(1.0, 0.3 / np.linalg.norm(v))
            else:  # each replica's share (its half of the batch, loss / 2) clipped, summed
                shares = [half[key] / 2 for half in halves]
                applied = sum(s * min(1.0, 0.3 / np.linalg.norm(s)) for s in shares)
            close(h["variables"]["clipped_norm"][key][k], np.linalg.norm(applied),
                  (k, key, "clipped_norm"))
    assert "_clip_gradients" not in vars(model.optimizer)


def check_wrap():
    transform = T.clip_by_global_norm(0.2)
    ref, model = twins(lambda: keras.optimizers.SGD(0.1))
    with distributed():
        model.compile(optimizer=T.wrap(keras.optimizers.SGD(0.1), transform), loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    clipped = 0
    for k in range(2):
        g = gk.gradients(ref, *batch(k), training=True)
        clipped += np.sqrt(sum(np.sum(v ** 2) for v in g.values())) > 0.2
        g, _ = transform.update(g, transform.init(g))
        gk.apply(ref, g)
    assert clipped == 2, "the transform must change these gradients"
    for got, expected in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def copies(variable):
    """The replicas' copies of a MirroredStrategy's variable (one: none to compare)."""
    inner = variable if FLAVOUR == "tf_keras" else getattr(variable, "value", variable)
    return [np.asarray(c) for c in getattr(inner, "values", [inner])]


def check_apply():
    ref, model = twins(lambda: keras.optimizers.Adam(0.1, clipnorm=0.3))
    for k, scope in enumerate([contextlib.nullcontext, distributed]):
        expected = gk.gradients(ref, *batch(k), training=True)
        with scope():
            g = gk.gradients(model, *batch(k), training=True)
            for key, v in expected.items():
                np.testing.assert_allclose(g[key], v, rtol=1e-5, atol=1e-7, err_msg=key)
            gk.apply(model, g)
        gk.apply(ref, expected)
    assert int(model.optimizer.iterations.numpy()) == 2
    pairs = list(zip(model.weights, ref.weights)) + list(zip(
        model.optimizer.variables, ref.optimizer.variables))
    for got, expected in pairs:
        kept = copies(got)
        for copy in kept:
            np.testing.assert_array_equal(copy, kept[0], err_msg=got.name)
        np.testing.assert_allclose(kept[0], np.asarray(expected), rtol=1e-5, atol=1e-6,
                                   err_msg=got.name)


{"monitor": check_monitor, "wrap": check_wrap, "apply": check_apply}[CHECK]()
print("ok")
