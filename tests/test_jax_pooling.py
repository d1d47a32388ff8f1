"""JAX: max pooling in gradkit's programs takes its fast form, with Keras' own numbers.

Where the windows tile the input, gradkit's JAX programs pool with a reshape and a max whose
derivative is the tangent at each window's first maximum (gradkit._backends.jax_pooling),
instead of XLA's select-and-scatter. The reference is Keras' own call, differentiated by a
hand-written `jax.jit(jax.grad)` / `jax.jvp` over `stateless_call`: gradients and
Hessian-vector products must be equal to rounding (XLA may fuse the two programs differently),
ties included: the pooled values are small integers, so most windows hold their maximum more
than once, and another choice of maximum (`jnp.max`'s rule shares the tangent among ties)
would move them by about 0.1.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.flavours("jax")

# (pooling layer, its options, input shape of one example); "fast": the windows tile it
CASES = [
    ("MaxPooling2D", {}, (6, 7, 3), True),  # an odd width: the last column is dropped
    ("MaxPooling2D", {"pool_size": (2, 3)}, (6, 7, 3), True),
    ("MaxPooling2D", {"data_format": "channels_first"}, (6, 8, 3), True),  # pools (8, 3)
    ("MaxPooling2D", {"padding": "same"}, (6, 8, 3), True),  # divisible: "same" pads nothing
    ("MaxPooling1D", {"pool_size": 3}, (10, 3), True),
    ("MaxPooling3D", {}, (4, 5, 4, 2), True),
    ("MaxPooling2D", {"padding": "same"}, (5, 7, 3), False),  # pads: Keras' own call
    ("MaxPooling2D", {"pool_size": 3, "strides": 2}, (7, 7, 3), False),  # windows overlap
]


def build(keras, layer, options, shape):
    keras.utils.set_random_seed(0)
    L = keras.layers
    inputs = keras.Input(shape)
    first = L.Dense(3)
    h = getattr(L, layer)(**options, name="pool")(first(inputs))
    h = L.Dense(4, activation="tanh")(h)  # smooth, so second derivatives are not all zero
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(h)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # small integers in, small integer weights: the pooled values tie in most windows
    rng = np.random.default_rng(0)
    first.set_weights([rng.integers(-1, 2, size=(shape[-1], 3)).astype("float32"),
                       np.zeros(3, "float32")])
    return model


def keras_own(model, x, y):
    """Gradient and HVP functions through Keras' own pooling call, compiled by hand."""
    import jax

    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        return model.loss(y, model.stateless_call(trainable, non_trainable, x)[0])

    gradient = jax.jit(jax.grad(loss))
    product = jax.jit(lambda p, t: jax.jvp(jax.grad(loss), (p,), (t,))[1])
    return gradient, product


@pytest.mark.parametrize("layer,options,shape,fast", CASES)
def test_gradients_and_products_equal_keras_own_pooling(keras, monkeypatch, layer,
                                                                 options, shape, fast):
    import gradkit as gk
    from gradkit._backends import jax_pooling

    used = []
    tiled = jax_pooling.tiled_max
    monkeypatch.setattr(jax_pooling, "tiled_max", lambda *a: used.append(1) or tiled(*a))
    model = build(keras, layer, options, shape)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(5, *shape)).astype("float32")  # ties in most windows
    y = rng.integers(0, 3, size=5)
    values = [v.value for v in model.trainable_variables]
    tangents = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
    gradient, product = keras_own(model, x, y)

    got = gk.gradients(model, x, y)
    products = gk.hvp(model, x, y, vector={v.path: t for v, t in
                                           zip(model.trainable_variables, tangents)})
    assert bool(used) == fast
    for variable, g, hv in zip(model.trainable_variables, gradient(values),
                               product(values, tangents)):
        np.testing.assert_allclose(got[variable.path], np.asarray(g), rtol=1e-5, atol=1e-7,
                                   err_msg=variable.path)
        np.testing.assert_allclose(products[variable.path], np.asarray(hv), rtol=1e-5,
                                   atol=1e-7, err_msg=variable.path)
    assert np.any(np.asarray(product(values, tangents)[0]))  # the products are not all zero
    assert all("call" not in vars(layer) for layer in model.layers)  # Keras' call is back


def test_per_example_rows_equal_a_loop_through_keras_own_pooling(keras):
    import gradkit as gk

    model = build(keras, "MaxPooling2D", {}, (6, 7, 3))
    rng = np.random.default_rng(2)
    x = rng.integers(0, 3, size=(4, 6, 7, 3)).astype("float32")
    y = rng.integers(0, 3, size=4)
    values = [v.value for v in model.trainable_variables]
    rows = gk.per_example_gradients(model, x, y)
    for i in range(4):
        gradient, _ = keras_own(model, x[i:i + 1], y[i:i + 1])
        for variable, g in zip(model.trainable_variables, gradient(values)):
            np.testing.assert_allclose(rows[variable.path][i], np.asarray(g), rtol=1e-5,
                                       atol=1e-6, err_msg=variable.path)


def test_a_pooling_layer_whose_output_is_tapped_keeps_its_tap(keras):
    """Activation gradients of the pooling layer itself (its call is shadowed by the tap
    before gradkit traces): the gradient of the loss at its output, by hand, and the
    gradients of the layers around it."""
    import jax

    import gradkit as gk

    model = build(keras, "MaxPooling2D", {}, (6, 7, 3))
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(4, 6, 7, 3)).astype("float32")
    y = rng.integers(0, 3, size=4)
    got = gk.activation_gradients(model, x, y, layers=["pool", "dense"])
    names = [layer.name for layer in model.layers]
    pooled = keras.Model(model.inputs, model.get_layer("pool").output)(x)

    def loss_at(h, start):
        for layer in model.layers[start:]:
            h = layer(h)
        return model.loss(y, h)

    expected = jax.grad(loss_at)(pooled, names.index("pool") + 1)
    np.testing.assert_allclose(got["pool"], np.asarray(expected), rtol=1e-5, atol=1e-7)
    assert got["dense"].shape == (4, 6, 7, 3)  # the Dense before the pooling
    assert np.any(got["pool"]) and np.any(got["dense"])
