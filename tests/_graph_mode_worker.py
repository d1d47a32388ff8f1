"""tf-keras gradients in graph mode or eager mode, for tests/test_tf_keras_graph.py.

    python tests/_graph_mode_worker.py graph|eager OUT_DIR

Graph mode (tf.compat.v1.disable_eager_execution) is process-wide, so it runs in its own
process. The same model, weights and data are used in both modes; the test compares the
files. In-process checks (state untouched, one fit step is w - lr * g, no graph growth on a
new batch size, a GradientMonitor refused in graph mode before any step) are written to
OUT_DIR/MODE-checks.npz.
"""

from __future__ import annotations

import os
import sys

import numpy as np

LR = 0.5


def build(keras):
    inputs = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, name="d", kernel_regularizer=keras.regularizers.L2(0.1))(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out_a = keras.layers.Dense(2, name="a")(h)
    out_b = keras.layers.Dense(1, name="b")(h)
    model = keras.Model(inputs, [out_a, out_b])
    rng = np.random.default_rng(0)
    weights = []
    for variable in model.weights:
        value = rng.normal(size=tuple(variable.shape)).astype("float32") * 0.5
        weights.append(np.abs(value) + 0.5 if "variance" in variable.name else value)
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.legacy.SGD(LR), loss=["mse", "mae"],
                  loss_weights=[0.5, 2.0], metrics=["mae"])
    return model


def main(mode: str, out: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    if mode == "graph":
        tf.compat.v1.disable_eager_execution()
    import tf_keras as keras
    from tf_keras.src import backend

    import gradkit as gk

    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3)).astype("float32")
    y = [rng.normal(size=(6, 2)).astype("float32"), rng.normal(size=(6, 1)).astype("float32")]
    sw = rng.uniform(0.5, 2, size=6).astype("float32")
    model = build(keras)
    model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)  # builds all state
    state = model.variables + model.optimizer.variables() + [
        v for m in model.metrics for v in m.variables]
    before = backend.batch_get_value(state)
    runs = {
        "compiled_training": gk.gradients(model, x, y, sample_weight=sw, training=True),
        "compiled": gk.gradients(model, x, y),
        "loss": gk.gradients(model, x, y, loss="mse", layers=["a", "d"]),
        "target": gk.gradients(model, x, target=lambda outs: outs[0][:, 1],
                               unconnected="zero"),
    }
    same_state = all(np.array_equal(a, b) for a, b in zip(before, backend.batch_get_value(state)))
    ops = len(tf.compat.v1.get_default_graph().get_operations()) if mode == "graph" else 0
    gk.gradients(model, x[:4], [a[:4] for a in y], sample_weight=sw[:4], training=True)
    grown = len(tf.compat.v1.get_default_graph().get_operations()) - ops if mode == "graph" else 0
    w0 = backend.batch_get_value(model.trainable_variables)
    model.fit(x, y, sample_weight=[sw, sw], batch_size=6, epochs=1, shuffle=False, verbose=0)
    w1 = backend.batch_get_value(model.trainable_variables)
    fit_error = max(float(np.abs((a - b) / LR - g).max())
                    for a, b, g in zip(w0, w1, runs["compiled_training"].values()))
    monitor = gk.GradientMonitor(every=1, writers=())
    try:  # graph mode: refused at the start of fit, before any step
        model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        monitored = "recorded" if len(monitor.history["step"]) == 1 else "nothing recorded"
    except gk.UnsupportedModelError as error:
        monitored = "refused" if "eager execution is disabled" in str(error) else str(error)
    untrained = all(np.array_equal(a, b) for a, b in zip(
        w1, backend.batch_get_value(model.trainable_variables)))
    for name, grads in runs.items():
        gk.save(os.path.join(out, f"{mode}-{name}.npz"), grads)
    gk.save(os.path.join(out, f"{mode}-checks.npz"), {
        "same_state": np.array(same_state), "graph_growth": np.array(grown),
        "fit_error": np.array(fit_error), "eager": np.array(tf.executing_eagerly()),
        "monitored": np.array(monitored), "untrained": np.array(untrained)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
