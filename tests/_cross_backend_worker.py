"""Write gradkit gradients of one fixed model and batch, on the flavour named in argv.

    python tests/_cross_backend_worker.py FLAVOUR OUT_DIR

Run once per flavour by tests/test_cross_backend.py (Keras fixes its backend at import, so
each flavour needs its own process). Weights and data come from a seeded NumPy generator,
so every flavour differentiates the same function at the same point.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def keras_for(flavour: str):
    """The Keras of `flavour`, imported in this process (its backend fixed first)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras
    os.environ["KERAS_BACKEND"] = flavour
    import keras

    return keras


def build(keras):
    """Conv + BatchNorm + tanh + pooling + Dense with an L2 regularizer, softmax over 3."""
    inputs = keras.Input((6, 6, 2), name="image")
    # No conv bias: before a BatchNorm in training mode its gradient is zero up to rounding.
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh", name="tanh")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    h = keras.layers.Dense(5, activation="relu", name="hidden",
                           kernel_regularizer=keras.regularizers.L2(0.01))(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs, name="net")
    rng = np.random.default_rng(42)
    weights = []
    for variable in model.weights:  # the same order on Keras 3 and tf-keras
        value = rng.normal(size=tuple(variable.shape)).astype("float32") * 0.5
        weights.append(np.abs(value) + 0.5 if "variance" in variable.name else value)
    model.set_weights(weights)
    model.compile(loss="categorical_crossentropy")
    return model


def data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=8)]
    sample_weight = rng.uniform(0.5, 2.0, size=8).astype("float32")
    return x, y, sample_weight


def main(flavour: str, out_dir: str) -> None:
    keras = keras_for(flavour)
    import gradkit as gk

    model = build(keras)
    x, y, sample_weight = data()
    runs = {
        "compiled_training": dict(y=y, sample_weight=sample_weight, training=True),
        "compiled_inference": dict(y=y),
        "target": dict(target=1),
    }
    for name, kwargs in runs.items():
        grads = gk.gradients(model, x, **kwargs)
        gk.save(os.path.join(out_dir, f"{flavour}-{name}.npz"), grads)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
