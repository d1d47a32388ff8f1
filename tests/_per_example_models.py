"""Tiny models and data shared by test_per_example.py and test_norms.py (any flavour)."""

from __future__ import annotations

import numpy as np

RNG = np.random.default_rng(0)
N = 5  # examples per batch


def quartic(keras, c=0.1):
    """A custom weight regularizer c·Σw⁴."""
    total = keras.ops.sum if hasattr(keras, "ops") else keras.backend.sum
    return lambda w: c * total(w * w * w * w)


def mlp(keras):
    """Dense -> Dense, the first a Dense subclass with a call of its own (not factored: the
    materializing norm route) and a custom kernel regularizer."""
    class OwnCall(keras.layers.Dense):
        def call(self, inputs):
            return super().call(inputs)

    model = keras.Sequential([
        keras.Input((4,)),
        OwnCall(6, activation="tanh", kernel_regularizer=quartic(keras), name="hidden"),
        keras.layers.Dense(3, name="out"),
    ])
    model.compile(loss="mse")
    return model, _floats(N, 4), _floats(N, 3)


def cnn(keras):
    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3, activation="relu", name="conv"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="out"),
    ])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, _floats(N, 6, 6, 1), RNG.integers(0, 3, size=N).astype("int32")


def text(keras):
    """Embedding + pooling: token ids repeat within an example (the same-id sums matter)."""
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(7, 4, name="embed"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, name="out"),
    ])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ids = RNG.integers(0, 7, size=(N, 6)).astype("int32")
    ids[:, 1] = ids[:, 0]
    return model, ids, RNG.integers(0, 3, size=N).astype("int32")


def layernorm(keras):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, name="hidden"),
        keras.layers.LayerNormalization(name="norm"),
        keras.layers.Dense(2, activation="softmax", name="out"),
    ])
    model.compile(loss="categorical_crossentropy")
    return model, _floats(N, 4), np.eye(2, dtype="float32")[RNG.integers(0, 2, size=N)]


def sequence(keras):
    """A Dense layer on a sequence (several positions per example) and a shared Dense layer."""
    inputs = keras.Input((5, 3))
    shared = keras.layers.Dense(3, activation="relu", name="shared")
    hidden = shared(shared(inputs))
    outputs = keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(2, name="out")(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(loss="mse")
    return model, _floats(N, 5, 3), _floats(N, 2)


BUILDERS = {"mlp": mlp, "cnn": cnn, "text": text, "layernorm": layernorm, "sequence": sequence}


def _floats(*shape):
    return RNG.normal(size=shape).astype("float32")
