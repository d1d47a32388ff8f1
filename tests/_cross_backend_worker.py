"""Write gradkit results of fixed models and batches, on the flavour named in argv.

    python tests/_cross_backend_worker.py FLAVOUR OUT_DIR

Run once per flavour, all four at once, by the session fixture `cross_flavour_results` in
tests/conftest.py (Keras fixes its backend at import, so each flavour needs its own
process); tests/test_cross_backend.py, tests/test_hvp.py and
tests/test_activation_gradients.py compare the files. Weights, data and vectors come from
seeded NumPy generators, so every flavour differentiates the same function at the same
point. Files: ``FLAVOUR-RUN.npz`` (gradients), ``FLAVOUR-hvp-RUN.npz`` (or ``.refused``,
the error text), ``FLAVOUR-activations.npz``.
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


def write_gradients(gk, model, flavour: str, out_dir: str) -> None:
    x, y, sample_weight = data()
    runs = {
        "compiled_training": dict(y=y, sample_weight=sample_weight, training=True),
        "compiled_inference": dict(y=y),
        "target": dict(target=1),
    }
    for name, kwargs in runs.items():
        grads = gk.gradients(model, x, **kwargs)
        gk.save(os.path.join(out_dir, f"{flavour}-{name}.npz"), grads)


def write_hvps(gk, model, flavour: str, out_dir: str) -> None:
    """Hessian-vector products with one seeded vector in `model.trainable_variables` order."""
    x, y, sample_weight = data()
    keys = list(gk.gradients(model, x, y))  # the keys in model.trainable_variables order
    rng = np.random.default_rng(11)
    vector = {key: rng.normal(size=tuple(v.shape)).astype("float32")
              for key, v in zip(keys, model.trainable_variables)}
    hidden = {k: v for k, v in vector.items() if k.startswith("hidden/")}
    runs = {
        "compiled_training": dict(y=y, sample_weight=sample_weight, training=True,
                                  vector=vector),
        "compiled_inference": dict(y=y, vector=vector),
        "target": dict(target=1, vector=vector),
        "loss_layers": dict(y=y, loss="mse", layers="hidden", vector=hidden),
    }
    for name, kwargs in runs.items():
        path = os.path.join(out_dir, f"{flavour}-hvp-{name}")
        try:
            products = gk.hvp(model, x, **kwargs)
        except gk.InvalidArgumentError as error:  # TensorFlow refuses BatchNorm in training
            with open(path + ".refused", "w") as f:
                f.write(str(error))
            continue
        gk.save(path + ".npz", products)


def activation_results(gk, keras) -> dict:
    """Input and activation gradients of one fixed residual model."""
    rng = np.random.default_rng(7)
    x_in = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, activation="tanh", name="d1")(x_in)
    r = keras.layers.Dense(6, activation="sigmoid", name="branch")(h)
    s = keras.layers.Add(name="add")([h, r])
    probs = keras.layers.Dense(3, activation="softmax", name="head")(s)
    model = keras.Model(x_in, probs, name="residual")
    model.set_weights([rng.normal(size=w.shape).astype("float32")
                       for w in model.get_weights()])
    model.compile(loss="categorical_crossentropy")
    x = rng.normal(size=(5, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=5)]
    result = {"input/loss": gk.input_gradients(model, x, y),
              "input/target": gk.input_gradients(model, x, target=2)}
    by_loss = gk.activation_gradients(model, x, y, layers=["d1", "branch", "add"])
    by_target = gk.activation_gradients(model, x, target=0, layers=["d1", "add"])
    for prefix, by_layer in (("act/loss/", by_loss), ("act/target/", by_target)):
        # A layer's key may start with the model's name (Keras 3): compared without it.
        result.update({prefix + k.removeprefix(model.name + "/"): v
                       for k, v in by_layer.items()})
    return result


def main(flavour: str, out_dir: str) -> None:
    keras = keras_for(flavour)
    import gradkit as gk

    model = build(keras)
    write_gradients(gk, model, flavour, out_dir)
    write_hvps(gk, model, flavour, out_dir)
    gk.save(os.path.join(out_dir, f"{flavour}-activations.npz"), activation_results(gk, keras))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
