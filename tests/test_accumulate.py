"""gradkit.accumulate against gradients() of the whole dataset as one batch, on every flavour.

The reference is the gradient of the concatenated data computed in one call (itself checked
against closed forms in test_gradients.py); accumulation must reproduce it for any batch
partition and any data source, with sample weights and regularizers.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import gradkit as gk
from conftest import assert_same_state, state_snapshot, to_numpy
from gradkit._progress import Progress

RNG = np.random.default_rng(3)
N = 23
X = RNG.normal(size=(N, 4)).astype("float32")
Y = RNG.normal(size=(N, 2)).astype("float32")
SW = RNG.uniform(0.1, 2.0, size=N).astype("float32")


def _model(keras, *, regularized=True):
    reg = keras.regularizers.l2(0.05) if regularized else None
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, activation="tanh", kernel_regularizer=reg, name="hidden"),
        keras.layers.Dense(2, name="out"),
    ])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _key(grads, suffix):
    """The key ending in `suffix` (Keras 3 prefixes the model name, tf-keras does not)."""
    (key,) = [k for k in grads if k.endswith(suffix)]
    return key


def _close(got, expected, rtol=1e-5, atol=1e-6):
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("batch_size", [1, 7, 100])
def test_equals_one_big_batch_for_any_partition(keras, batch_size):
    model = _model(keras)
    expected = gk.gradients(model, X, Y, sample_weight=SW)
    _close(gk.accumulate(model, (X, Y, SW), batch_size=batch_size), expected)


def test_uneven_batches_from_a_generator_are_weighted_by_their_size(keras):
    model = _model(keras)
    cuts = [0, 1, 9, 12, N]  # sizes 1, 8, 3, 11: an unweighted mean of batches would differ
    batches = ((X[a:b], Y[a:b], SW[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    expected = gk.gradients(model, X, Y, sample_weight=SW)
    _close(gk.accumulate(model, batches), expected)
    per_batch = [gk.gradients(model, X[a:b], Y[a:b], sample_weight=SW[a:b])
                 for a, b in zip(cuts[:-1], cuts[1:])]
    key = _key(expected, "out/kernel")
    unweighted = np.mean([g[key] for g in per_batch], axis=0)
    assert not np.allclose(unweighted, expected[key], rtol=1e-3)


def _sources(keras, flavour):
    yield "list", [(X[i:i + 6], Y[i:i + 6]) for i in range(0, N, 6)]
    base = keras.utils.Sequence if flavour == "tf_keras" else keras.utils.PyDataset

    class Data(base):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return X[6 * i:6 * i + 6], Y[6 * i:6 * i + 6]

    yield "pydataset", Data()
    if "tensorflow" in sys.modules or flavour in ("tensorflow", "tf_keras"):
        import tensorflow as tf

        yield "tf.data", tf.data.Dataset.from_tensor_slices((X, Y)).batch(6)
    if flavour == "torch":
        import torch

        data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
        yield "DataLoader", torch.utils.data.DataLoader(data, batch_size=6)


def test_every_data_source(keras, flavour):
    pytest.importorskip("tensorflow")
    import tensorflow  # noqa: F401  (tf.data is a source on every flavour here)

    model = _model(keras)
    expected = gk.gradients(model, X, Y)
    names = []
    for name, data in _sources(keras, flavour):
        names.append(name)
        _close(gk.accumulate(model, data), expected)
    assert "tf.data" in names


def test_target_sums_over_examples_from_x_only_batches(keras):
    model = _model(keras)
    expected = gk.gradients(model, X, target=1)
    _close(gk.accumulate(model, (X[i:i + 4] for i in range(0, N, 4)), target=1), expected,
           rtol=1e-5, atol=1e-5)
    _close(gk.accumulate(model, X, target=1, batch_size=10), expected, rtol=1e-5, atol=1e-5)


def test_explicit_loss_and_layers(keras):
    model = _model(keras)
    expected = gk.gradients(model, X, Y, loss="mae", layers="out")
    got = gk.accumulate(model, (X, Y), loss="mae", layers="out", batch_size=6)
    assert [k.rpartition("/")[0].rpartition("/")[2] for k in got] == ["out", "out"]
    _close(got, expected)


def _snapshot(model):
    """state_snapshot once the loss has run: tf-keras lists its loss metric only then."""
    gk.gradients(model, X[:2], Y[:2])
    return state_snapshot(model)


def test_compiled_never_fit_model_keeps_zero_loss_metrics(keras):
    model = _model(keras)
    gk.accumulate(model, (X, Y), batch_size=10)
    gk.accumulate(model, (X, Y), batch_size=10)
    values = [to_numpy(v) for metric in model.metrics for v in metric.variables]
    assert all(np.all(v == 0) for v in values)


def test_state_unchanged_with_training_true(keras):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(2),
    ])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model.optimizer.build(model.trainable_variables)  # optimizer state to watch (no fit: slow)
    norm = model.layers[1]
    norm.moving_mean.assign(RNG.normal(size=5).astype("float32"))
    norm.moving_variance.assign(RNG.uniform(0.5, 2.0, size=5).astype("float32"))
    before = _snapshot(model)
    x, y = X[:20], Y[:20]
    grads = gk.accumulate(model, (x, y), batch_size=10, training=True)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert_same_state(before, state_snapshot(model))
    # training=False uses the moving statistics, so batches add up exactly.
    _close(gk.accumulate(model, (x, y), batch_size=10), gk.gradients(model, x, y))


@pytest.mark.flavours("torch")
def test_torch_global_rng_is_restored(keras):
    import torch

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    model.compile(loss="mse")
    before = torch.get_rng_state().clone()
    gk.accumulate(model, (X, Y), batch_size=8, training=True)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.flavours("torch")
def test_torch_finite_flag_is_exact():
    import torch

    from gradkit._backends.torch import TorchPrimitives

    _all_finite = TorchPrimitives().all_finite

    g = torch.zeros(100, 10)
    g[3, 4] = g[5, 6] = 3e38  # a finite g whose float32 sum overflows
    assert bool(_all_finite(g))
    for bad in (float("inf"), float("-inf"), float("nan")):
        g[7, 1] = bad
        assert not bool(_all_finite(g))


def test_keyboard_interrupt_leaves_the_model_untouched(keras):
    model = _model(keras)
    before = _snapshot(model)

    def interrupted():
        for i in range(0, N, 4):
            if i == 12:
                raise KeyboardInterrupt
            yield X[i:i + 4], Y[i:i + 4]

    with pytest.raises(KeyboardInterrupt):
        gk.accumulate(model, interrupted())
    assert_same_state(before, state_snapshot(model))
    _close(gk.accumulate(model, (X, Y), batch_size=4), gk.gradients(model, X, Y))


def _with_nan_batch(bad=2):
    x = X.copy()
    x[4 * bad + 1, 0] = np.nan
    return [(x[i:i + 4], Y[i:i + 4]) for i in range(0, N, 4)], x


def test_nonfinite_raise_names_batch_and_variables(keras):
    batches, _ = _with_nan_batch()
    with pytest.raises(gk.NonFiniteGradientError,
                       match=r"Batch 2 .*hidden/kernel.*1 NaN/Inf value.*batch_index=2"):
        gk.accumulate(_model(keras), batches)


def test_nonfinite_raise_stops_the_pass_early(keras):
    x = X.copy()
    x[5, 0] = np.inf
    pulled = []

    def batches():  # 40 batches of 2 (the data cycles): the Inf is in batch 2
        for b in range(40):
            pulled.append(b)
            i = 2 * b % 22
            yield x[i:i + 2], Y[i:i + 2]

    with pytest.raises(gk.NonFiniteGradientError, match="Batch 2 "):
        gk.accumulate(_model(keras), batches())
    assert len(pulled) < 40


def test_nonfinite_skip_leaves_the_batch_out_and_reports_once(keras):
    model = _model(keras)
    batches, _ = _with_nan_batch()
    with pytest.warns(gk.NonFiniteGradientWarning, match=r"left out.*\[2\]") as record:
        got = gk.accumulate(model, batches, on_nonfinite="skip")
    assert len(record) == 1
    keep = np.r_[0:8, 12:N]
    _close(got, gk.gradients(model, X[keep], Y[keep]))


def test_nonfinite_warn_keeps_the_batch(keras):
    batches, _ = _with_nan_batch(bad=0)
    with pytest.warns(gk.NonFiniteGradientWarning, match="Batch 0 .*included") as record:
        got = gk.accumulate(_model(keras), batches, on_nonfinite="warn")
    assert len(record) == 1
    assert np.isnan(got[_key(got, "hidden/kernel")]).any()


def test_all_batches_nonfinite_with_skip_raises(keras):
    x = X.copy()
    x[:, 0] = np.inf
    with pytest.raises(gk.NonFiniteGradientError, match=r"Every batch.*\[0, 1, 2\]"):
        gk.accumulate(_model(keras), (x, Y), batch_size=8, on_nonfinite="skip")


def test_unconnected_variable_raises(keras):
    class TwoHeads(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.Dense(2, name="used")
            self.unused = keras.layers.Dense(2, name="unused")

        def call(self, x):
            return self.used(x)

    model = TwoHeads()
    model(X[:1])
    model.unused.build((None, 4))
    model.compile(loss="mse")
    with pytest.raises(gk.UnconnectedGradientError, match="2 selected variable.*do not affect"):
        gk.accumulate(model, (X, Y), batch_size=8)


def test_data_that_does_not_fit_fails_before_any_work(keras):
    pulled = []

    def batches():
        for i in range(3):
            pulled.append(i)
            yield X[:4, :3], Y[:4]

    with pytest.raises(gk.DataShapeError, match=r"Batch 0 .*expects \(None, 4\)"):
        gk.accumulate(_model(keras), batches())
    assert pulled == [0]


def test_argument_errors(keras, flavour):
    model = _model(keras)
    with pytest.raises(gk.InvalidArgumentError, match="on_nonfinite="):
        gk.accumulate(model, (X, Y), on_nonfinite="ignore")
    with pytest.raises(gk.InvalidArgumentError, match="y is required"):
        gk.accumulate(model, X, batch_size=4)
    with pytest.raises(gk.InvalidArgumentError, match="y is not used with target="):
        gk.accumulate(model, (X, Y), target=0)
    # TF/JAX replicas sum unseen batches: "raise" only; torch.distributed skips per process
    match = "On torch, strategy= takes" if flavour == "torch" else "strategy= sums"
    with pytest.raises(gk.InvalidArgumentError, match=match):
        gk.accumulate(model, (X, Y), strategy="data_parallel", on_nonfinite="skip")
    losses = keras.losses
    with pytest.raises(gk.InvalidArgumentError, match="reduction='sum'"):
        gk.accumulate(model, (X, Y), loss=losses.MeanSquaredError(reduction="sum"))
    for call in (gk.accumulate, gk.gradient_stats):  # before any work, on both
        with pytest.raises(gk.InvalidArgumentError, match="Received: progress='yes'$"):
            call(model, (X, Y), batch_size=4, progress="yes")


def test_float64_model_gives_float64(keras, flavour):
    if flavour == "jax":
        pytest.skip("JAX runs without x64 by default")
    if flavour == "tf_keras":
        keras.backend.set_floatx("float64")
    else:
        keras.config.set_floatx("float64")
    try:
        model = _model(keras)
        expected = gk.gradients(model, X.astype("float64"), Y.astype("float64"))
        got = gk.accumulate(model, (X.astype("float64"), Y.astype("float64")), batch_size=5)
    finally:
        if flavour == "tf_keras":
            keras.backend.set_floatx("float32")
        else:
            keras.config.set_floatx("float32")
    assert got[_key(got, "out/kernel")].dtype == np.float64
    # Keras 3's torch matmul is only float32-accurate on float64 (keras.ops.matmul of
    # float64 tensors is off by ~1e-7), so torch gets float32 tolerances.
    tol = 1e-5 if flavour == "torch" else 1e-12
    _close(got, expected, rtol=tol, atol=tol)


class _Terminal:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize("tty, enabled", [(True, True), (False, True), (True, False)])
def test_progress_bar_only_on_a_terminal_when_asked(tty, enabled):
    pytest.importorskip("tqdm")
    stream = _Terminal(tty)
    with Progress(3, enabled, stream=stream) as bar:
        for _ in range(3):
            bar.update(10)
    assert bar.batches == 3 and bar.examples == 30
    shown = tty and enabled
    assert ("examples/s" in stream.text) == shown
    assert ("3/3" in stream.text) == shown


def test_progress_falls_back_to_progbar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with Progress(2, True, stream=_Terminal(True)) as bar:
        bar.update(5)
        bar.update(5)
    assert "examples/s" in capsys.readouterr().out


def test_progress_rate_and_eta_exclude_the_compiling_first_batch():
    pytest.importorskip("tqdm")
    import time

    with Progress(4, True, stream=_Terminal(True)) as bar:
        time.sleep(0.3)  # the first batch: tracing and compilation
        bar.update(10)
        bar.update(10)
        meter = bar._bar.format_dict
        assert meter["n"] == 2 and meter["initial"] == 1
        assert meter["elapsed"] < 0.3  # the bar's clock (rate, ETA) starts after batch 1
