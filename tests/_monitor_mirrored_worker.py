"""MirroredStrategy over two logical CPUs (TF): the monitor records global gradients.

Run as ``python _monitor_mirrored_worker.py``; exits non-zero on a mismatch."""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras  # noqa: E402

import gradkit as gk  # noqa: E402

rng = np.random.default_rng(1)
x = rng.normal(size=(32, 5)).astype("float32")
y = rng.normal(size=(32, 3)).astype("float32")


def build():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, "tanh", name="d1"),
                              keras.layers.Dense(3, name="d2")], name="m")
    model.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=0.3), loss="mse")
    return model


class Weights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append(self.model.get_weights())


keras.utils.set_random_seed(0)
ref = build()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = build()
model.set_weights(ref.get_weights())
monitor, weights = gk.GradientMonitor(every=1, writers=()), Weights()
model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
          callbacks=[weights, monitor])
h = monitor.history
assert list(h["step"]) == [0, 1], h["step"]
for k in range(2):
    ref.set_weights(weights.seen[k])
    sl = slice(16 * k, 16 * (k + 1))
    g = gk.gradients(ref, x[sl], y[sl], training=True)
    halves = [gk.gradients(ref, x[sl][8 * r:8 * (r + 1)], y[sl][8 * r:8 * (r + 1)],
                           training=True) for r in range(2)]
    for key, v in g.items():
        got = h["variables"]["norm"][key][k]
        assert abs(got - np.linalg.norm(v)) <= 1e-5 * np.linalg.norm(v), (k, key, got)
        # Keras clips each replica's share (its half of the batch, loss / 2) before summing
        shares = [half[key] / 2 for half in halves]
        applied = sum(s * min(1.0, 0.3 / np.linalg.norm(s)) for s in shares)
        got = h["variables"]["clipped_norm"][key][k]
        assert abs(got - np.linalg.norm(applied)) <= 1e-5 * np.linalg.norm(applied), (k, key)
assert "_clip_gradients" not in vars(model.optimizer)
print("ok")
