"""GradientMonitor records the gradients `fit` applies: checked against gradkit.gradients of
the same batch at the same weights, the weights followed by an independent SGD loop."""

import json
import types
import warnings

import numpy as np
import pytest
from conftest import run_mirrored_step_worker, to_numpy

import gradkit as gk
from gradkit import transforms as T

LR, BATCH, STEPS = 0.1, 8, 4


def _data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH * STEPS, 5)).astype("float32")
    y = rng.normal(size=(BATCH * STEPS, 3)).astype("float32")
    return x, y


def _model(keras, optimizer=None, dropout=False):
    layers = [keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1")]
    layers += [keras.layers.Dropout(0.3, name="drop")] if dropout else []
    model = keras.Sequential(layers + [keras.layers.Dense(3, name="d2")], name="m")
    model.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse")
    return model


def _reference(keras, model, x, y, n_batch, clip=None):
    """(gradient sets per update, weights before each update) by an SGD loop on a copy."""
    ref = _model(keras)
    ref.set_weights([to_numpy(v) for v in model.trainable_variables])
    grads_seq, weights_seq = [], []
    for k in range(STEPS * BATCH // n_batch):
        sl = slice(k * n_batch, (k + 1) * n_batch)
        g = gk.gradients(ref, x[sl], y[sl], training=True)
        w = [to_numpy(v) for v in ref.trainable_variables]
        grads_seq.append(g)
        weights_seq.append(w)
        applied = clip(g) if clip else list(g.values())
        ref.set_weights([wi - LR * gi for wi, gi in zip(w, applied)])
    return grads_seq, weights_seq


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _check_record(h, r, g, w, clipped=None):
    for i, (key, gv) in enumerate(g.items()):
        v = gv.astype(np.float64)
        var = h["variables"]
        assert _rel(var["norm"][key][r], np.linalg.norm(v)) < 1e-5, key
        assert _rel(var["max_abs"][key][r], np.abs(v).max()) < 1e-5, key
        assert abs(var["mean"][key][r] - v.mean()) < 1e-5 * np.abs(v).max()
        assert _rel(var["std"][key][r], v.std()) < 1e-4, key
        assert _rel(var["weight_norm"][key][r], np.linalg.norm(w[i])) < 1e-6
        lo, hi = var["histogram_range"][key][r]
        assert _rel(lo, v.min()) < 1e-5 and _rel(hi, v.max()) < 1e-5
        expected = np.histogram(v, bins=30, range=(v.min(), v.max()))[0]
        np.testing.assert_array_equal(var["histogram"][key][r], expected, err_msg=key)
        if clipped is not None:
            assert _rel(var["clipped_norm"][key][r], np.linalg.norm(clipped[i])) < 1e-5, key
    total = np.sqrt(sum(np.sum(gv.astype(np.float64) ** 2) for gv in g.values()))
    assert _rel(h["total"]["norm"][r], total) < 1e-5
    layer = np.sqrt(sum(np.sum(gv.astype(np.float64) ** 2)
                        for k, gv in g.items() if k.rsplit("/", 1)[0].endswith("d1")))
    d1 = next(k for k in h["layers"]["norm"] if k.endswith("d1"))
    assert _rel(h["layers"]["norm"][d1][r], layer) < 1e-5


def _clip_norm(c):
    return lambda g: [v * min(1.0, c / np.linalg.norm(v)) for v in g.values()]


def _clip_global(c):
    def clip(g):
        total = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
        return [v * min(1.0, c / total) for v in g.values()]
    return clip


def _clip_value(c):
    return lambda g: [np.clip(v, -c, c) for v in g.values()]


CASES = {"plain": ({}, None), "clipnorm": ({"clipnorm": 0.3}, _clip_norm(0.3)),
         "global_clipnorm": ({"global_clipnorm": 0.4}, _clip_global(0.4)),
         "clipvalue": ({"clipvalue": 0.05}, _clip_value(0.05))}


@pytest.mark.parametrize("case", list(CASES))
def test_records_are_the_applied_gradients(keras, case):
    options, clip = CASES[case]
    x, y = _data()
    model = _model(keras, keras.optimizers.SGD(LR, **options))
    grads_seq, weights_seq = _reference(keras, model, x, y, BATCH, clip)
    monitor = gk.GradientMonitor(every=1)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    h = monitor.history
    np.testing.assert_array_equal(h["step"], np.arange(STEPS))
    for r in range(STEPS):
        g = grads_seq[r]
        _check_record(h, r, g, weights_seq[r], clip(g) if clip else None)
        ratio = LR * np.sqrt(sum(np.sum(c.astype(np.float64) ** 2)
                                 for c in (clip(g) if clip else g.values())))
        ratio /= np.sqrt(sum(np.sum(w.astype(np.float64) ** 2) for w in weights_seq[r]))
        assert _rel(h["total"]["update_ratio"][r], ratio) < 1e-4
    if clip is None:
        assert "clipped_norm" not in h["total"]
    final = [to_numpy(v) for v in model.trainable_variables]
    expected = [w - LR * gi for w, gi in zip(weights_seq[-1], (
        clip(grads_seq[-1]) if clip else grads_seq[-1].values()))]
    for a, b in zip(final, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_wrapped_optimizer_records_the_gradients_before_its_transform(keras):
    """`norm` & co. are the step's own gradients (what `gradients()` gives), before the
    transform of `transforms.wrap` changes them; `clipped_*` what the optimizer applies."""
    transform = T.clip_by_global_norm(0.02)

    def applied(g):
        changed, _ = transform.update(g, transform.init(g))
        return _clip_norm(0.012)(changed)

    x, y = _data()
    model = _model(keras, T.wrap(keras.optimizers.SGD(LR, clipnorm=0.012), transform))
    grads_seq, weights_seq = _reference(keras, model, x, y, BATCH, applied)
    monitor = gk.GradientMonitor(every=1, writers=())
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    h = monitor.history
    for r in range(STEPS):
        g = grads_seq[r]
        assert np.sqrt(sum(np.sum(v ** 2) for v in g.values())) > 0.1  # the transform acts
        _check_record(h, r, g, weights_seq[r], applied(g))


@pytest.mark.flavours("torch")
def test_torch_compile_runs_the_hooks_eagerly_without_graph_break_warnings(keras):
    """Keras' jit_compile=True on torch: torch.compile would break its graph (and warn
    through torch's own loggers) at each host read of the monitor's hooks; they run eagerly,
    the records as without it."""
    import logging

    warned = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warned.append
    logging.getLogger("torch._dynamo").addHandler(handler)
    x, y = _data()
    model = _model(keras)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=True)
    grads_seq, weights_seq = _reference(keras, model, x, y, BATCH)
    monitor = gk.GradientMonitor(every=1, writers=())
    try:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[monitor])
    except Exception as error:  # noqa: BLE001 - no C++ toolchain for torch.compile here
        if "inductor" not in repr(error).lower() and "compil" not in repr(error).lower():
            raise
        pytest.skip(f"torch.compile does not run on this machine: {error!r:.200}")
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert not [r.getMessage() for r in warned]
    for r in range(STEPS):
        _check_record(monitor.history, r, grads_seq[r], weights_seq[r])


@pytest.mark.flavours("tensorflow", "tf_keras")
def test_train_step_compiled_by_xla(keras):
    """jit_compile=True (Keras' choice on a GPU): the in-step statistics compile with the step."""
    x, y = _data()
    model = _model(keras)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=True)
    grads_seq, weights_seq = _reference(keras, model, x, y, BATCH)
    monitor = gk.GradientMonitor(every=2, writers=())
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert getattr(model, "jit_compile", getattr(model, "_jit_compile", None)) is True
    h = monitor.history
    np.testing.assert_array_equal(h["step"], [0, 2])
    for r, step in enumerate(h["step"]):
        _check_record(h, r, grads_seq[step], weights_seq[step])


@pytest.mark.flavours("tensorflow", "jax", "torch")
def test_gradient_accumulation_records_the_averaged_update(keras):
    x, y = _data()
    model = _model(keras, keras.optimizers.SGD(LR, gradient_accumulation_steps=2))
    grads_seq, weights_seq = _reference(keras, model, x, y, 2 * BATCH)  # mean of 2 = concat
    monitor = gk.GradientMonitor(every=1, writers=())
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    h = monitor.history
    np.testing.assert_array_equal(h["step"], [0, 1])
    np.testing.assert_array_equal(h["batch"], [1, 3])
    for r in range(2):
        _check_record(h, r, grads_seq[r], weights_seq[r])


def test_loss_scaling_is_undone(keras):
    """Compared at fit's own weights of each step: a reference SGD loop drifts from fit by
    float32 rounding, which the float16 forward pass turns into ~1e-3 differences."""
    from gradkit._backends._step_state import read_state

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = _data()
        model = _model(keras, keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(LR)))
        ref = _model(keras)  # compile wraps its SGD in a LossScaleOptimizer as well
        seen = []

        class Weights(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):  # JAX: the state fit carries
                seen.append(read_state(model, model.trainable_variables))

        monitor = gk.GradientMonitor(every=1, writers=())
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[Weights(), monitor])
        h = monitor.history
        np.testing.assert_array_equal(h["step"], np.arange(STEPS))
        for r in range(STEPS):
            ref.set_weights(seen[r])
            sl = slice(r * BATCH, (r + 1) * BATCH)
            _check_record(h, r, gk.gradients(ref, x[sl], y[sl], training=True), seen[r])
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_watching_never_changes_training(keras, tmp_path):
    x, y = _data()
    finals = []
    for watch in (False, True):
        keras.utils.set_random_seed(0)
        model = _model(keras, keras.optimizers.Adam(1e-2, clipnorm=1.0), dropout=True)
        callbacks = [gk.GradientMonitor(every=2, log_dir=tmp_path, writers=("jsonl",))
                     ] if watch else []
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                  callbacks=callbacks)
        finals.append([to_numpy(v) for v in model.variables])
        n_opt = len(model.optimizer.variables() if callable(model.optimizer.variables)
                    else model.optimizer.variables)
        finals[-1].append(np.array(n_opt))
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)
    assert "_clip_gradients" not in vars(model.optimizer)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # still trains, hook gone
    again = gk.GradientMonitor(every=1, log_dir=tmp_path, writers=("jsonl",))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[again])
    assert len(again.records) == STEPS
    lines = (tmp_path / "gradients.jsonl").read_text().splitlines()  # appended: 4 + 4
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4, 6, 12, 13, 14, 15]


def test_recorded_updates_wait_in_a_ring_read_when_full(keras, monkeypatch):
    """The step writes recorded update k into slot (k // every) % slots of a ring that the
    host reads when it is full, at the end of the epoch, or when `records` is asked for:
    here 3 slots, 16 updates, every=2, the records asked for after batch 9 (5 settled):
    reads after updates 4, 8 (asked) and 14, and every record is its own update's."""
    from gradkit._monitor import _recorder

    monkeypatch.setattr(_recorder, "_ring_size", lambda *args: 3)
    reads, read = [], _recorder.Recorder.read
    monkeypatch.setattr(_recorder.Recorder, "read", lambda self: reads.append(1) or read(self))
    x, y = _data()
    model = _model(keras)
    grads_seq, weights_seq = _reference(keras, model, x, y, 2)
    monitor, seen = gk.GradientMonitor(every=2, writers=()), []

    class Ask(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 9:
                seen.append([r["step"] for r in monitor.records])

    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor, Ask()])
    assert seen == [[0, 2, 4, 6, 8]]
    assert len(reads) == 3
    h = monitor.history
    np.testing.assert_array_equal(h["step"], np.arange(0, 16, 2))
    np.testing.assert_array_equal(h["batch"], np.arange(0, 16, 2))
    for r, step in enumerate(h["step"]):
        _check_record(h, r, grads_seq[step], weights_seq[step])


@pytest.mark.flavours("tf_keras")
def test_batch_logs_stay_tensors_on_tf_keras(keras):
    """tf-keras turns every batch's logs into NumPy, waiting for the step, unless each
    callback with batch hooks takes tensors: the monitor takes them, so a callback beside it
    that takes them too still gets tensors, and fit runs ahead of the host."""
    x, y = _data()
    kinds = []

    class Probe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True

        def on_train_batch_end(self, batch, logs=None):
            kinds.append(type(logs["loss"]).__name__)

    _model(keras).fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                      callbacks=[gk.GradientMonitor(every=2, writers=()), Probe()])
    assert len(kinds) == STEPS and "float" not in kinds, kinds


@pytest.mark.flavours("tensorflow", "jax", "tf_keras")  # (torch: one step per call)
def test_several_steps_per_call_record_each_update(keras, monkeypatch):
    """With steps_per_execution=3 one call of the train function takes 3 of the 16 updates
    (the last call 1): every=2 records updates 0, 2, ..., 14, each its own. A call can take
    2 recorded updates; the ring has 4 slots, so it is read after every other call, before
    the next call could overwrite an unread slot (reading only when full loses update 0)."""
    from gradkit._monitor import _recorder

    monkeypatch.setattr(_recorder, "_ring_size", lambda *args: 4)
    x, y = _data()
    model = _model(keras)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", steps_per_execution=3)
    grads_seq, weights_seq = _reference(keras, model, x, y, 2)
    monitor = gk.GradientMonitor(every=2, writers=())
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    h = monitor.history
    np.testing.assert_array_equal(h["step"], np.arange(0, 16, 2))
    np.testing.assert_array_equal(h["batch"], np.arange(0, 16, 2))
    for r, step in enumerate(h["step"]):
        _check_record(h, r, grads_seq[step], weights_seq[step])


@pytest.mark.flavours("tensorflow", "jax", "tf_keras")  # (torch: one step per call)
@pytest.mark.parametrize("skipped", [(2,), (1, 3)], ids=["last-of-call", "first-and-middle"])
def test_updates_skipped_by_loss_scaling_inside_a_call_lose_no_record(keras, flavour, skipped):
    """mixed_float16, steps_per_execution=3 (calls of batches 0-2, 3-5, ...), every=1: the
    `skipped` batches overflow float16, so the LossScaleOptimizer skips their updates inside
    calls the host had planned with one more update each. Keras 3 does not count a skipped
    update (the updates are numbered 0, 1, ... over the applied ones); tf-keras counts it
    (updates are numbered by batch). Every applied update is recorded, with its own batch."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = _data()
        for batch in skipped:
            x[batch * 2 + 1, 0] = 1e30  # inf in float16: that batch (of 2 examples) is skipped
        model = _model(keras, keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(LR)))
        model.compile(optimizer=model.optimizer, loss="mse", steps_per_execution=3)
        monitor = gk.GradientMonitor(every=1, writers=())
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        h = monitor.history
        batches = [b for b in range(16) if b not in skipped]
        np.testing.assert_array_equal(h["batch"], batches)
        np.testing.assert_array_equal(h["step"], batches if flavour == "tf_keras"
                                      else np.arange(len(batches)))
    finally:
        keras.mixed_precision.set_global_policy(policy)


@pytest.mark.parametrize("action", ["warn", "stop", "raise"])
def test_nonfinite_gradient_is_reported_at_its_step(keras, action):
    x, y = _data()
    x[2 * BATCH + 1, 0] = np.nan  # batch 2 -> update 2
    model = _model(keras)
    seen = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    monitor = gk.GradientMonitor(every=100, on_nonfinite=action, writers=())
    fit = lambda: model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False,  # noqa: E731
                            verbose=0, callbacks=[monitor, Count()])
    if action == "raise":
        with pytest.raises(gk.NonFiniteGradientError, match="update 2"):
            fit()
        assert "_clip_gradients" not in vars(model.optimizer)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit()
        ours = [str(w.message) for w in caught if w.category is gk.NonFiniteGradientWarning]
        assert len(ours) == 1 and "update 2 (epoch 0, batch 2)" in ours[0]
    alarm = monitor.alarms[0]
    assert alarm["step"] == 2 and alarm["batch"] == 2
    d1 = [k for k in alarm["variables"] if "d1" in k]
    assert sorted(d1) and alarm["variables"][d1[0]][0] > 0
    assert seen == {"warn": [0, 1, 2, 3], "stop": [0, 1, 2], "raise": [0, 1]}[action]


def test_a_nonfinite_update_raises_no_norm_alarm(keras):
    """Recorded, a NaN update's layers have no gradient norm (over its finite entries it is
    0 when every entry is NaN): the NaN alarm reports it, not a "vanishing" warning."""
    x, y = _data()
    x[2 * BATCH:3 * BATCH] = np.nan  # every gradient entry of update 2 is NaN
    monitor = gk.GradientMonitor(every=1, writers=())  # default thresholds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _model(keras).fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                          callbacks=[monitor])
    assert [a["kind"] for a in monitor.alarms] == ["nonfinite"]
    assert not [w for w in caught if w.category is gk.GradientNormWarning]


@pytest.mark.flavours("jax")
def test_jax_with_64_bit_types_on(keras):
    """With JAX's 64-bit types on (set by a user or another library), integer sums default
    to int64: the in-step counts and ring indices stay int32, and the records are right."""
    import jax

    from gradkit._check._copy import _jax_x64

    x, y = _data()
    model = _model(keras, optimizer=keras.optimizers.SGD(0.0))  # weights stay put
    expected = gk.gradients(model, x[:BATCH], y[:BATCH], training=True)
    x[2 * BATCH] = np.nan
    monitor = gk.GradientMonitor(every=1, writers=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _jax_x64():
            assert jax.config.jax_enable_x64
            model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                      callbacks=[monitor])
        norms = monitor.history["variables"]["norm"]
    assert [w.category for w in caught] == [gk.NonFiniteGradientWarning]
    for key, g in expected.items():
        np.testing.assert_allclose(norms[key][0], np.linalg.norm(g), rtol=1e-5)
    assert [(a["kind"], a["step"]) for a in monitor.alarms] == [("nonfinite", 2)]


def test_writers_round_trip(keras, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    x, y = _data()
    model = _model(keras)
    monitor = gk.GradientMonitor(every=2, log_dir=tmp_path,
                                 writers=("jsonl", "csv", "tensorboard"))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    lines = (tmp_path / "gradients.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == monitor.records
    rows = (tmp_path / "gradients.csv").read_text().splitlines()
    header = rows[0].split(",")
    for line, record in zip(rows[1:], monitor.records):
        for name, cell in zip(header, line.split(",")):
            assert float(cell) == record[name]
    h = monitor.history
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    key = next(iter(h["variables"]["norm"]))
    events = acc.Scalars(f"variables/norm/{key}")
    assert [e.step for e in events] == [0, 2]
    np.testing.assert_allclose([e.value for e in events], h["variables"]["norm"][key],
                               rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("total/norm")],
                               h["total"]["norm"], rtol=1e-6)
    hist = acc.Histograms(f"variables/histogram/{key}")
    np.testing.assert_array_equal(hist[1].histogram_value.bucket,
                                  h["variables"]["histogram"][key][1])
    from gradkit._cli import main

    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "flow.png")]) == 0
    assert _png_size(tmp_path / "flow.png") == (800, 700)
    gk.plot_histograms(monitor, path=tmp_path / "hist.png")
    assert _png_size(tmp_path / "hist.png") == (1200, 6 * 100)
    _bad_plot_paths_and_variables_are_refused(monitor, tmp_path)


def _bad_plot_paths_and_variables_are_refused(monitor, tmp_path):
    """Refused before drawing, nothing written: a folder (not a sibling folder.png), a
    missing folder, a suffix matplotlib cannot write, an unknown variable."""
    before = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / "plots").mkdir()
    for path, error, pattern in [
            ("plots", gk.GradkitFileError, r"is a folder.*plots/gradients.png"),
            ("nowhere/flow.png", gk.GradkitFileError, r"does not exist"),
            ("flow.txt", gk.InvalidArgumentError, r"cannot write '.txt'.*'flow.png'")]:
        with pytest.raises(error, match=pattern + r".*Received: path="):
            gk.plot_gradient_flow(monitor, path=tmp_path / path)
    with pytest.raises(gk.InvalidArgumentError, match=r"\['nope'\] are not among"):
        gk.plot_histograms(monitor, variables=["nope"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["plots"])
    one = next(iter(monitor.history["variables"]["histogram"]))  # one key as a str
    assert len(gk.plot_histograms(monitor, variables=one).axes) == 1


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_train_step_that_skips_the_optimizer_is_reported(keras, flavour):
    """The monitor watches model.optimizer's updates: a train_step that changes the weights
    another way (here: not at all) leaves nothing to record, and that is said, not silent."""
    if flavour == "tf_keras":
        import tensorflow as tf

        zero = tf.zeros
    else:
        zero = keras.ops.zeros
    if flavour == "jax":
        def train_step(self, state, data):
            return {"zero": zero(())}, state
    else:
        def train_step(self, data):
            return {"zero": zero(())}

    model = _model(keras)
    model.train_step = types.MethodType(train_step, model)
    x, y = _data()
    monitor = gk.GradientMonitor(every=1, writers=())
    with warnings.catch_warnings(record=True) as seen:  # (pytest.warns would re-raise the
        warnings.simplefilter("always")                  # frameworks' own deprecations)
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    said = [str(w.message) for w in seen if w.category is gk.CustomTrainStepWarning]
    assert len(said) == 1 and "applied no update in 4 batches" in said[0], said
    assert len(monitor.history["step"]) == 0


def test_one_monitor_keeps_one_history(keras):
    """A second fit of the same model adds to the history; a fit of a model with other
    variables is refused before its first step, and the records held stay as they were."""
    x, y = _data()
    model, monitor = _model(keras), gk.GradientMonitor(every=1, writers=())
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=BATCH, epochs=2, initial_epoch=1, shuffle=False, verbose=0,
              callbacks=[monitor])
    history = monitor.history
    assert list(history["step"]) == list(range(2 * STEPS))
    assert list(history["epoch"]) == [0] * STEPS + [1] * STEPS
    other = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="other")])
    other.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    weights = [to_numpy(v) for v in other.trainable_variables]
    with pytest.raises(gk.InvalidArgumentError, match=r"holds the records of other variables"):
        other.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    assert all(np.array_equal(a, to_numpy(b)) for a, b in zip(weights, other.trainable_variables))
    again = monitor.history
    assert list(again["step"]) == list(history["step"])
    for key, values in history["variables"]["norm"].items():
        np.testing.assert_array_equal(again["variables"]["norm"][key], values)


@pytest.mark.flavours("tensorflow", "jax", "torch")
def test_a_checkpoint_saved_during_a_monitored_fit_restores_the_optimizer(keras, tmp_path):
    """The monitor's in-step state (on JAX, variables of the optimizer during fit) is not
    saved with the optimizer: the checkpoint loads its Adam state as a plain fit's would."""
    x, y = _data()
    model = _model(keras, optimizer=keras.optimizers.Adam(1e-2))
    path = tmp_path / "m.keras"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[
            gk.GradientMonitor(every=1, writers=()), keras.callbacks.ModelCheckpoint(path)])
        loaded = keras.models.load_model(path)
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert "save_own_variables" not in vars(model.optimizer)  # the shadow goes with fit

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    def resumable(*extra):  # the monitor first: its state exists when the backup loads
        return [gk.GradientMonitor(every=1, writers=()),
                keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), *extra]

    first = _model(keras, optimizer=keras.optimizers.Adam(1e-2))
    with pytest.raises(KeyboardInterrupt):
        first.fit(x, y, batch_size=BATCH, epochs=4, verbose=0, callbacks=resumable(Interrupt()))
    again = _model(keras, optimizer=keras.optimizers.Adam(1e-2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.fit(x, y, batch_size=BATCH, epochs=4, verbose=0, callbacks=resumable())
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert int(to_numpy(again.optimizer.iterations)) == 4 * STEPS  # 2 restored, 2 run


def test_bad_options_raise():
    for options in ({"every": 0}, {"on_nonfinite": "ignore"}, {"stats": ("norms",)},
                    {"writers": ["xml"]}, {"writers": None}):  # writers: checked without log_dir
        with pytest.raises(gk.InvalidArgumentError, match="Received"):
            gk.GradientMonitor(**options)
    # one name is one name, not its letters
    one = gk.GradientMonitor(writers="csv", stats="norm")
    assert one.writer_names == ("csv",) and one.stats == ("norm",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gk.GradientMonitor().mode == "step"


@pytest.mark.flavours("tensorflow", "tf_keras", "jax")
def test_data_parallel_fit_records_global_gradients(flavour):
    """MirroredStrategy over two logical CPUs (TF, tf-keras), DataParallel over two host
    devices (JAX)."""
    run_mirrored_step_worker(flavour, "monitor")


def test_exploding_rising_and_vanishing_norms_are_warned_once_per_layer(keras):
    x, y = _data()
    y[3 * BATCH:] *= 1e4  # update 3: the error, so every layer's gradient, jumps ~1e4-fold
    model = _model(keras, optimizer=keras.optimizers.SGD(0.0))  # weights stay put
    monitor = gk.GradientMonitor(every=1, writers=(), thresholds={
        "explode": None, "growth": 100.0, "vanish": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                  callbacks=[monitor])
    layers = sorted(monitor.history["layers"]["norm"])
    assert [a["kind"] for a in monitor.alarms] == ["growth"] * len(layers) == ["growth"] * 2
    assert sorted(a["layer"] for a in monitor.alarms) == layers
    assert {a["step"] for a in monitor.alarms} == {3}  # not again in the second epoch
    for layer in layers:
        norms = monitor.history["layers"]["norm"][layer]
        assert norms[3] > 100 * norms[2]
    ours = [str(w.message) for w in caught if w.category is gk.GradientNormWarning]
    assert len(ours) == 2 and all("update 3" in text for text in ours)

    for kind, bound in (("explode", 1e-9), ("vanish", 1e9)):  # every layer, once each
        monitor = gk.GradientMonitor(every=1, writers=(), stats=("norm",), thresholds={
            "explode": None, "growth": None, "vanish": None, kind: bound})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
        assert sorted(a["layer"] for a in monitor.alarms) == layers
        assert {a["kind"] for a in monitor.alarms} == {kind}
        assert set(monitor.history["layers"]) == {"norm"}  # no update snapshots, histograms
        assert sum(w.category is gk.GradientNormWarning for w in caught) == len(layers)
    with pytest.raises(gk.InvalidArgumentError, match="thresholds"):
        gk.GradientMonitor(thresholds={"explode": -1.0})
    with pytest.raises(gk.InvalidArgumentError, match="thresholds"):
        gk.GradientMonitor(thresholds={"exploding": 1.0})


def test_in_step_sums_give_exact_statistics_of_awkward_gradients(flavour):
    """NaN/Inf, huge, tiny and far-from-zero-mean gradients: the step's sums and counts give
    the float64 NumPy statistics of the finite entries (masked and scaled paths)."""
    from gradkit._monitor import _history, _ingraph, _ops

    rng = np.random.default_rng(3)
    huge = rng.normal(size=50) * 1e20
    huge[[3, 7, 9]] = np.nan, np.inf, 0.0
    large = rng.standard_t(3, size=(257, 257)) + 2.0  # odd, over _ingraph.PAIRED: paired
    masked = large * 1e20                                # counts
    masked[5, [3, 7, 9]] = np.nan, np.inf, 0.0
    cases = [[huge], [rng.normal(size=40) * 1e-25, rng.normal(size=(6, 5)) + 5.0],
             [large, masked]]
    xp = _ops.namespace("tf_keras" if flavour == "tf_keras" else "keras3")
    if flavour == "tf_keras":
        import tensorflow as tf

        tensor = tf.constant
    else:
        from keras import ops

        tensor = ops.convert_to_tensor
    for arrays in cases:
        grads = [tensor(a.astype("float32")) for a in arrays]
        sums, finite = _ingraph.finite_sums(xp, grads)
        rows, counts = _ingraph.variable_rows(xp, grads, grads, sums, finite, 10)
        rows, counts = (np.asarray(to_numpy(x)) for x in (rows, counts))
        one_bin = np.asarray(to_numpy(_ingraph.variable_rows(xp, grads, grads, sums, finite,
                                                             1)[1]))
        finite_counts = [np.isfinite(a.astype("float32")).sum() for a in arrays]
        np.testing.assert_array_equal(one_bin[:, 3], finite_counts)  # no pass, same count
        stats = _history.variable_stats(rows, counts, np.zeros(len(arrays)), None,
                                        [a.size for a in arrays], True)
        for a, s in zip(arrays, stats):
            f = a.astype("float32").astype(np.float64).ravel()
            fin = f[np.isfinite(f)]
            assert (s["nan_count"], s["inf_count"]) == (np.isnan(f).sum(), np.isinf(f).sum())
            assert s["zero_fraction"] == np.mean(f == 0)
            for name, want in (("norm", np.linalg.norm(fin)), ("max_abs", np.abs(fin).max()),
                               ("mean", fin.mean()), ("std", fin.std())):
                assert _rel(s[name], want) < 1e-5, (name, s[name], want)
            expected = np.histogram(fin, bins=10, range=(fin.min(), fin.max()))[0]
            np.testing.assert_array_equal(s["histogram"], expected)


@pytest.mark.flavours("torch")
def test_eager_torch_rows_equal_the_graph_rows():
    """torch's eager statistics (`_eager.EagerStats`, the path every finite torch update
    takes) give the same counts and extremes as the backend-neutral `_ingraph` ones, bit for
    bit, the same sums of squares to float32 rounding (small variables are summed by NumPy,
    `_eager.host_stats`), and the float64 NumPy statistics; its reused buffers do not leak
    between updates."""
    import torch

    from gradkit._monitor import _eager, _history, _ingraph, _ops

    rng = np.random.default_rng(4)
    relu_like = np.maximum(rng.normal(size=(300, 7)), 0.0) * 1e-3  # many exact zeros
    arrays = [relu_like, rng.normal(size=40) + 5.0, rng.normal(size=25) * 1e-25,
              np.zeros(9), np.full(6, -2.5), rng.normal(size=(4, 3)) * 1e20,
              rng.standard_t(3, size=(257, 257))]  # odd, over _ingraph.PAIRED: paired counts
    grads = [torch.tensor(a.astype("float32")) for a in arrays]
    weights = [torch.tensor(rng.normal(size=a.shape).astype("float32")) for a in arrays]
    xp = _ops.namespace("keras3")
    eager = _eager.EagerStats(xp, 10)
    for update in range(2):  # the second one runs on the buffers the first one left
        if update:
            grads, weights = grads[::-1], weights[::-1]
        sums, finite = _ingraph.finite_sums(xp, grads)
        want = _ingraph.variable_rows(xp, grads, weights, sums, finite, 10)
        got = eager.rows([g.reshape(-1) for g in grads], [w.reshape(-1) for w in weights],
                         sums)
        _assert_same_rows(got, want)
    stats = _history.variable_stats(got[0].numpy(), got[1].numpy(), np.zeros(len(grads)),
                                    None, [g.numel() for g in grads], True)
    for g, s in zip(grads, stats):
        f = g.numpy().astype(np.float64).ravel()
        assert s["zero_fraction"] == np.mean(f == 0)
        assert _rel(s["norm"], np.linalg.norm(f)) < 1e-5 and _rel(s["std"], f.std()) < 1e-4
        expected = np.histogram(f, bins=10, range=(f.min(), f.max()))[0]
        if f.min() == f.max():  # one value: counted in the last bin (see variable_stats)
            expected = np.eye(10, dtype=int)[-1] * f.size
        np.testing.assert_array_equal(s["histogram"], expected)
    one_bin = _eager.EagerStats(xp, 1).rows([g.reshape(-1) for g in grads],
                                            [w.reshape(-1) for w in weights], sums)[1]
    np.testing.assert_array_equal(one_bin[:, 3].numpy(), [g.numel() for g in grads])
    for bins in (181, 300):  # 181: paired in _ingraph, not here (182² > int16); 300: neither
        got = _eager.EagerStats(xp, bins).rows([g.reshape(-1) for g in grads],
                                               [w.reshape(-1) for w in weights], sums)[1]
        want = _ingraph.variable_rows(xp, grads, weights, sums, finite, bins)[1]
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    scaled = [float(g.abs().max()) for g, w, total in zip(grads, weights, sums)
              if _eager.host_stats(g.numpy().ravel(), w.numpy().ravel(), total.numpy(), 10)
              is None]  # left to torch's scaled path: the 1e-25 and 1e20 gradients only
    assert len(scaled) == 2 and all(big < 1e-17 or big > 1e17 for big in scaled), scaled
    old = eager.snapshot(weights)
    new = [w + 0.5 * i for i, w in enumerate(weights)]
    expected = [np.sum((n.numpy().astype(np.float64) - w.numpy()) ** 2)
                for n, w in zip(new, weights)]
    np.testing.assert_allclose(eager.update_squares(old, new).numpy(), expected, rtol=1e-5)


def _assert_same_rows(got: tuple, want: tuple) -> None:
    """Counts and the ROW columns before the sums of squares bit for bit; those to rounding."""
    (rows, counts), (want_rows, want_counts) = ((a.numpy(), b.numpy()) for a, b in (got, want))
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(rows[:, :5], want_rows[:, :5])
    np.testing.assert_allclose(rows[:, 5:], want_rows[:, 5:], rtol=1e-6)


@pytest.mark.flavours("tensorflow", "jax")
def test_updates_not_recorded_are_traced_without_statistics(keras, monkeypatch):
    """On Keras 3 with TensorFlow or JAX the train step is traced once for recorded updates
    and once for the others: only the first computes statistics, and neither holds a cond
    for them (every `_when` sees a Python True)."""
    from gradkit._monitor import _ingraph, _recorder

    traced, whens, rows = [], [], _ingraph.variable_rows
    before, when = _recorder.Recorder._before, _recorder.Recorder._when
    monkeypatch.setattr(_recorder.Recorder, "_before", lambda self, *args: traced.append(
        self.recording) or before(self, *args))
    monkeypatch.setattr(_recorder.Recorder, "_when", staticmethod(
        lambda xp, due, then, otherwise: whens.append(due) or when(xp, due, then, otherwise)))
    monkeypatch.setattr(_ingraph, "variable_rows", lambda *args: traced.append("rows") or rows(
        *args))
    x, y = _data()
    monitor = gk.GradientMonitor(every=2, writers=())
    _model(keras).fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                      callbacks=[monitor])
    assert list(monitor.history["step"]) == [0, 2, 4, 6]
    assert sorted(set(traced), key=str) == [False, True, "rows"]
    assert whens and all(due is True for due in whens)
    assert traced.count("rows") == traced.count(True)  # statistics in that trace only


@pytest.mark.flavours("tensorflow", "tf_keras")
def test_tensorflow_conditionals_stay_functional_if_ops():
    """The monitor's conds in a TensorFlow step are kept as `If` ops (not lowered to
    Switch/Merge, whose untaken branch costs every step), and they still pick the branch."""
    import tensorflow as tf

    from gradkit._monitor import _ops

    xp = _ops.namespace("tf_keras")

    @tf.function
    def pick(flag, x):
        return xp.cond(flag, lambda: xp.sum(x * x), lambda: xp.sum(x))

    x = tf.constant([1.0, 2.0, 3.0])
    assert float(pick(tf.constant(True), x)) == 14.0 and float(pick(tf.constant(False), x)) == 6.0
    graph = pick.get_concrete_function(tf.constant(True), x).graph
    ifs = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert ifs and not any(lowered(op) for op in ifs)
    outside = tf.function(lambda f: tf.cond(f, lambda: 1.0, lambda: 2.0))  # left as it was
    plain = [op for op in outside.get_concrete_function(tf.constant(True)).graph
             .get_operations() if op.type in ("If", "StatelessIf")]
    assert plain and all(lowered(op) for op in plain)


def lowered(op):
    """Whether TensorFlow will lower this If op to Switch/Merge (the attr is absent if not)."""
    try:
        return bool(op.get_attr("_lower_using_switch_merge"))
    except ValueError:
        return False


@pytest.mark.flavours("tensorflow", "jax", "torch")
def test_warning_mode_keeps_keras_asynchronous_batch_end_dispatch(keras):
    """Keras 3 dispatches batch-end callbacks on a thread (fit runs on without waiting for
    each step's logs) unless a callback has batch-end hooks of its own. In "warn" mode the
    monitor has none, so it keeps what a plain callback gets; "stop" must act after each
    step, so it gives that up."""
    plain = keras.callbacks.CallbackList([keras.callbacks.Callback()])._async_train
    warned = keras.callbacks.CallbackList([gk.GradientMonitor()])._async_train
    stopping = keras.callbacks.CallbackList([gk.GradientMonitor(on_nonfinite="stop")])
    assert warned == plain
    assert stopping._async_train is False
