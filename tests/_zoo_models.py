"""A small zoo of built-in Keras layers inside a few tiny models (any flavour).

Each builder returns (model, x, y) with a batch of B examples. Together they hold every layer
a user trains: Dense, EinsumDense, Embedding, Conv1D/2D/3D (strides, dilation, groups, both
paddings), the transposed convolutions, DepthwiseConv2D, SeparableConv2D, Layer-, Group- and
BatchNormalization (inference), MultiHeadAttention, Attention, SimpleRNN/LSTM/GRU with
Bidirectional, pooling, and a keras.applications model.
"""

from __future__ import annotations

import numpy as np

RNG = np.random.default_rng(3)
B = 3  # examples per batch


def images(keras):
    """4x4 images: strided/dilated/grouped/depthwise/separable/transposed convolutions."""
    L = keras.layers
    inputs = keras.Input((4, 4, 2))
    grouped = L.Conv2D(4, 3, padding="same", dilation_rate=2, groups=2, activation="relu",
                       name="grouped")(inputs)
    strided = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="strided")(inputs)
    depthwise = L.DepthwiseConv2D(2, padding="valid", name="depthwise")(grouped)
    separable = L.SeparableConv2D(3, 2, padding="same", name="separable")(depthwise)
    up = L.Conv2DTranspose(3, 2, strides=2, name="up")(strided)
    left = L.GlobalAveragePooling2D()(L.GroupNormalization(groups=3, name="gn")(separable))
    right = L.BatchNormalization(name="bn")(L.MaxPooling2D(2)(up))
    right = L.Flatten()(L.AveragePooling2D(2)(right))
    outputs = L.Dense(3, name="out")(L.Concatenate()([left, right]))
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, _floats(B, 4, 4, 2), RNG.integers(0, 3, size=B).astype("int32")


def volumes(keras):
    """4x4x4 volumes and a 1-D signal: Conv3D, Conv3DTranspose, Conv1D (causal, dilated)."""
    L = keras.layers
    cube, signal = keras.Input((4, 4, 4, 1)), keras.Input((4, 2))
    c = L.Conv3D(2, 2, activation="relu", name="conv3d")(cube)
    c = L.Conv3DTranspose(2, 2, name="up3d")(L.MaxPooling3D(2)(c))
    s = L.Conv1D(3, 2, padding="causal", dilation_rate=2, activation="tanh", name="causal")(signal)
    s = L.Conv1DTranspose(2, 2, strides=2, name="up1d")(s)
    merged = L.Concatenate()([L.GlobalAveragePooling3D()(c), L.GlobalMaxPooling1D()(s)])
    model = keras.Model([cube, signal], L.Dense(2, name="out")(merged))
    model.compile(loss="mse")
    return model, [_floats(B, 4, 4, 4, 1), _floats(B, 4, 2)], _floats(B, 2)


def recurrent(keras):
    """Token ids through Embedding, SimpleRNN, Bidirectional(LSTM) and GRU."""
    L = keras.layers
    model = keras.Sequential([
        keras.Input((3,), dtype="int32"),
        L.Embedding(5, 4, name="embed"),
        L.SimpleRNN(3, return_sequences=True, name="rnn"),
        L.Bidirectional(L.LSTM(2, return_sequences=True), name="bilstm"),
        L.GRU(2, name="gru"),
        L.Dense(2, name="out"),
    ])
    model.compile(loss="mse")
    return model, RNG.integers(0, 5, size=(B, 3)).astype("int32"), _floats(B, 2)


def attention(keras, batch=B, length=3, width=4):
    """EinsumDense, LayerNormalization, MultiHeadAttention and Attention on sequences."""
    L = keras.layers
    inputs = keras.Input((length, width))
    h = L.EinsumDense("abc,cd->abd", output_shape=(length, width), bias_axes="d",
                      name="einsum")(inputs)
    h = L.LayerNormalization(name="ln")(h)
    h = L.MultiHeadAttention(2, width // 2, name="mha")(h, h)
    h = L.Attention(name="dot")([h, h])
    model = keras.Model(inputs, L.Dense(2, name="out")(L.GlobalMaxPooling1D()(h)))
    model.compile(loss="mse")
    return model, _floats(batch, length, width), _floats(batch, 2)


def mobilenet(keras):
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=3)
    model.compile(loss="sparse_categorical_crossentropy")
    return model, _floats(2, 32, 32, 3), RNG.integers(0, 3, size=2).astype("int32")


def _floats(*shape):
    return RNG.normal(size=shape).astype("float32")
