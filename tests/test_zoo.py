"""Every built-in layer a user trains, on every flavour: per-example rows equal a loop of
single-example gradients(), norms equal those rows' norms, and nothing crashes the process.

TensorFlow's vectorizer crashes (or returns wrong rows) through EinsumDense and
MultiHeadAttention with its oneDNN kernels on: that case runs in a subprocess with oneDNN on,
so a crash fails one test, not the suite. Sizes are tiny: the point is coverage, not speed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from _zoo_models import attention, images, mobilenet, recurrent, volumes

import gradkit as gk

HERE = os.path.dirname(os.path.abspath(__file__))


def check_against_loop(model, x, y, rtol=1e-4, atol=1e-5, training=False):
    """Rows against one gradients() call per example; norms against the rows' norms."""
    rows = gk.per_example_gradients(model, x, y, training=training)
    n = len(y)
    for i in range(n):
        xi = [a[i:i + 1] for a in x] if isinstance(x, list) else x[i:i + 1]
        one = gk.gradients(model, xi, y[i:i + 1], training=training)
        assert list(one) == list(rows)
        for key, value in one.items():
            np.testing.assert_allclose(rows[key][i], value, rtol=rtol, atol=atol, err_msg=key)
    expected = np.sqrt(sum((v.reshape(n, -1).astype("float64") ** 2).sum(1)
                           for v in rows.values()))
    np.testing.assert_allclose(gk.per_example_norms(model, x, y, training=training), expected,
                               rtol=1e-4)
    return rows


@pytest.mark.parametrize("builder", [images, volumes], ids=lambda b: b.__name__)
def test_convolutions_pooling_and_normalization(keras, builder):
    check_against_loop(*builder(keras))


def test_recurrent_layers_decide_their_route_once(keras, flavour, caplog):
    model, x, y = recurrent(keras)
    with caplog.at_level(logging.WARNING, logger="gradkit"):
        check_against_loop(model, x, y)
        gk.per_example_norms(model, x, y)
    falls_back = [r for r in caplog.records if "loop over examples" in r.getMessage()]
    # TensorFlow's pfor cannot convert the while loops: decided up front, logged once
    assert len(falls_back) == (1 if flavour in ("tensorflow", "tf_keras") else 0)
    if falls_back:
        assert "op While" in falls_back[0].getMessage()
    assert not [r for r in caplog.records if r.name == "tensorflow"]


def test_a_custom_recurrent_cell_with_dense_layers(keras, flavour, caplog):
    """Dense layers inside a custom RNN cell run in the framework's loop over time steps,
    where a factor tap's recording cannot leave the loop: they are differentiated directly,
    so JAX and torch vectorize the model and TensorFlow's compiled loop runs (both once fell
    back to the plain loop, after the vectorizer and the compiled loop failed on the taps)."""
    L = keras.layers

    class Cell(L.Layer):
        def __init__(self, units=3, **kwargs):
            super().__init__(**kwargs)
            self.units = self.state_size = self.output_size = units
            self.step_in = L.Dense(units, name="step_in")
            self.step_back = L.Dense(units, use_bias=False, name="step_back")
            self.act = L.Activation("tanh")

        def build(self, input_shape):
            self.step_in.build((None, input_shape[-1]))
            self.step_back.build((None, self.units))
            self.built = True

        def call(self, inputs, states):
            h = self.act(self.step_in(inputs) + self.step_back(states[0]))
            return h, [h]

    model = keras.Sequential([keras.Input((4, 2)), L.RNN(Cell()), L.Dense(2, name="out")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(5).normal(size=(3, 4, 2)).astype("float32")
    with caplog.at_level(logging.WARNING, logger="gradkit"):
        check_against_loop(model, x, np.array([0, 1, 1]))
    said = [r.getMessage() for r in caplog.records if r.name == "gradkit"]
    assert not [m for m in said if "compiled loop over examples failed" in m], said
    if flavour in ("jax", "torch"):  # TensorFlow's pfor cannot convert the while loop
        assert not said, said


def test_token_ids_that_arrive_as_floats(keras):
    """`keras.Input((T,))` without dtype="int32" in front of an Embedding (common in text
    models): the ids reach the layer as floats and Keras casts them; the rows once failed
    with NumPy's "arrays used as indices must be of integer type"."""
    L = keras.layers
    model = keras.Sequential([keras.Input((5,)), L.Embedding(7, 3, name="embed"),
                              L.GlobalAveragePooling1D(), L.Dense(2, name="out")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.array([[1, 1, 4, 0, 6], [2, 3, 3, 3, 5], [6, 0, 0, 1, 2]], "float32")
    rows = check_against_loop(model, x, np.array([0, 1, 1]))
    assert np.any(rows[next(k for k in rows if "embed" in k)][1, 3])  # id 3, three times


def test_layers_that_fold_time_into_the_batch(keras, monkeypatch):
    """tf-keras' TimeDistributed calls its layer once on (n·T, ...) rows: one pass over the
    batch would take those rows for examples (it once returned wrong rows and norms, with
    nothing said). Keras 3's calls it once per step on (n, ...). Either way the rows equal
    the loop's, and a selection whose layers fold is not run in one pass a second time."""
    from gradkit._backends import _batched

    L = keras.layers
    inputs = keras.Input((5, 4))
    steps = L.TimeDistributed(L.Dense(6, activation="tanh", name="per_step"), name="steps")
    outputs = L.Dense(3, name="out")(L.Flatten()(steps(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    runs = []
    one_pass = _batched.run_batched
    monkeypatch.setattr(_batched, "run_batched", lambda *a: runs.append(1) or one_pass(*a))
    x = np.random.default_rng(4).normal(size=(4, 5, 4)).astype("float32")
    check_against_loop(model, x, np.arange(4) % 3)
    if keras.__name__ == "tf_keras":  # found on the first run, then never tried again
        assert len(runs) == 1
        gk.per_example_gradients(model, x, np.arange(4) % 3)
        assert len(runs) == 1
    # one example's rows are those of a batch of one too (n·T = T rows for n = 1)
    check_against_loop(model, x[:1], np.zeros(1, "int64"))


def test_layers_a_backend_computes_otherwise_take_its_own_gradient(keras, flavour, caplog):
    """Where a backend computes a layer differently from its documented formula for some
    shapes, the rows are still the gradients of what the model computes (what `fit`
    differentiates): Keras 3 on TensorFlow adds a bias shaped (C, 1, 1) along the last axis
    when that axis also has C entries (keras.ops.add's bias_add guess: an EinsumDense bias
    on a leading axis here, a channels-first convolution's alike), and on torch a
    LayerNormalization over axis 1 of a cube normalizes the last axis. The factors' rows
    once disagreed with gradients() there (by about their own size), silently."""
    L = keras.layers
    rng = np.random.default_rng(5)
    leading_bias = keras.Sequential([keras.Input((6, 6, 4)), L.EinsumDense(
        "abcd,de->abce", output_shape=(6, 6, 6), bias_axes="b", activation="tanh",
        name="lead"), L.Flatten(), L.Dense(3, name="out")])
    cube = keras.Sequential([keras.Input((6, 6, 6)), L.Dense(6, use_bias=False, name="mix"),
                             L.LayerNormalization(axis=1, name="norm"), L.Flatten(),
                             L.Dense(3, name="out")])
    for model, shape in ((leading_bias, (6, 6, 4)), (cube, (6, 6, 6))):
        model.compile(loss="mse")
        for variable in model.trainable_weights[:-2]:  # biases and β away from 0
            variable.assign(rng.normal(size=tuple(variable.shape)).astype("float32"))
        x = rng.normal(size=(4, *shape)).astype("float32")
        with caplog.at_level(logging.WARNING, logger="gradkit"):
            check_against_loop(model, x, rng.normal(size=(4, 3)).astype("float32"))
    computed_otherwise = {"tensorflow": "lead/bias", "torch": "norm/"}.get(flavour)
    warned = [r.getMessage() for r in caplog.records if "computes that layer" in r.getMessage()]
    if computed_otherwise is None:
        assert not warned
    else:
        assert len(warned) == 1 and computed_otherwise in warned[0], warned


def test_a_route_whose_rows_disagree_is_not_taken(keras, flavour, monkeypatch, caplog):
    """A route is checked once, on its first chunk, against the framework's own gradient of
    its first example: a factor formula that is not the model's (here a Dense bias writer
    made wrong on purpose) sends the call to the next route, logged once with the
    variable, and the rows are right."""
    from gradkit._factors import _registry

    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="tanh", name="hidden"),
                              L.Dense(2, name="out")])
    model.compile(loss="mse")
    role = _registry.ROLES["bias"]

    def doubled(part, out, product=None):
        finite = role.rows(part, out, product)
        out *= 2
        return finite

    monkeypatch.setitem(_registry.ROLES, "bias", role._replace(rows=doubled))
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 4)).astype("float32"), rng.normal(size=(6, 2)).astype("float32")
    with caplog.at_level(logging.WARNING, logger="gradkit"):
        for _ in range(3):
            rows = gk.per_example_gradients(model, x, y)
    monkeypatch.undo()
    expected = [gk.gradients(model, x[i:i + 1], y[i:i + 1]) for i in range(6)]
    for key in rows:
        np.testing.assert_allclose(rows[key], np.stack([e[key] for e in expected]),
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    warned = [r.getMessage() for r in caplog.records if "computes that layer" in r.getMessage()]
    assert len(warned) >= 1 and "bias" in warned[0], warned
    assert len(warned) == len({w.split("(", 1)[0] for w in warned})  # each route once


@pytest.mark.flavours("jax", "torch")
def test_attention_layers(keras):
    check_against_loop(*attention(keras))


@pytest.mark.flavours("tensorflow", "tf_keras")
def test_attention_with_onednn_on_runs_in_a_subprocess(flavour):
    """At a size where TF 2.21's pfor crashes with oneDNN: in inference the one-pass route
    vectorizes no layer (nothing logged); in training mode gradkit does not take the
    vectorizer (logged once, naming the op) but a loop."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    code = ("import sys, test_zoo, _zoo_models as z; "
            f"test_zoo.attention_worker({flavour!r})")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert "ZOO OK" in done.stdout and err.count("op Einsum") == 1, err[-3000:]
    assert err.index("INFERENCE OK") < err.index("op Einsum"), err[-3000:]


def attention_worker(flavour):
    import conftest  # noqa: F401 - sets the backend (KERAS_BACKEND) for this flavour

    keras = conftest.keras_module
    logging.basicConfig(level=logging.WARNING)
    model, x, y = attention(keras, batch=16, length=16, width=32)
    # oneDNN rounds a batch of 16 and a batch of one differently: about 1 in 8 runs, entries
    # of 0.01 differed by 1.5e-5 from the loop's (a wrong row, e.g. zeros, is far outside)
    check_against_loop(model, x, y, rtol=1e-3, atol=1e-4)
    print("INFERENCE OK", file=sys.stderr, flush=True)
    check_against_loop(model, x, y, rtol=1e-3, atol=1e-4, training=True)
    print("ZOO OK", flush=True)


@pytest.mark.flavours("torch")  # the compiling flavours take 45-90 s to compile it
def test_keras_applications_model(keras):
    check_against_loop(*mobilenet(keras), rtol=1e-3, atol=1e-5)


def test_rows_that_cannot_fit_are_refused_with_the_size(keras, monkeypatch):
    from gradkit import _memory

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="d")])
    model.compile(loss="mse")
    x, y = np.ones((3, 4), "float32"), np.ones((3, 8), "float32")
    monkeypatch.setattr(_memory, "available_bytes", lambda: 500)  # needs 2 x 3 x 40 floats
    monkeypatch.setattr(_memory, "free_bytes", lambda: 500)
    with pytest.raises(gk.ResultTooLargeError, match="per_example_norms.*layers=") as error:
        gk.per_example_gradients(model, x, y)
    assert isinstance(error.value, MemoryError) and "GiB" in str(error.value)
    assert gk.per_example_norms(model, x, y).shape == (3,)  # norms keep no rows
