"""The `gradkit` command end to end: `python -m gradkit` in a subprocess (or its `main` in
this process, where start-up is not what is tested), on Keras 3 models saved to tmp_path,
compared with closed forms and with `gradkit.gradients` computed in-process on the original
(never saved) model. The CLI is Keras 3 only: skipped on tf_keras.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gradkit

pytestmark = pytest.mark.flavours("tensorflow", "jax", "torch")


def run_cli(*args, cwd, backend=None, env_extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    env["KERAS_BACKEND"] = backend or os.environ["KERAS_BACKEND"]
    if env_extra is not None:  # a value None removes the variable
        env.update(env_extra)
        env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "gradkit", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def run_in_process(*args, cwd, monkeypatch, capsys):
    """`gradkit.main(args)` in this process (Keras already imported: no framework start-up,
    which the subprocess tests cover): (exit code, stdout, stderr)."""
    from gradkit._cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def mlp(keras, tmp_path):
    """A compiled 4-3-2 MLP saved to model.keras, and its data saved to data.npz."""
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(3, activation="tanh", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4)).astype("float32")
    y = rng.standard_normal((6, 2)).astype("float32")
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return model, x, y


def _table_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) == 5 and "/" in parts[0]:
            rows[parts[0]] = parts[1:]
    return rows


def test_grads_writes_the_gradients_and_prints_the_table(mlp, tmp_path):
    model, x, y = mlp
    proc = run_cli("grads", "model.keras", "data.npz", "-o", "out.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    written = gradkit.load(tmp_path / "out.npz")
    expected = gradkit.gradients(model, x, y)
    assert list(written) == list(expected) == [v.path for v in model.trainable_variables]
    for key in expected:
        np.testing.assert_allclose(written[key], expected[key], rtol=1e-5, atol=1e-7)
    rows = _table_rows(proc.stdout)
    assert list(rows) == list(expected)
    for key, (shape, norm, mean, peak) in rows.items():
        g = expected[key].astype(np.float64)
        assert shape == str(g.shape)
        np.testing.assert_allclose(
            [float(norm), float(mean), float(peak)],
            [np.linalg.norm(g), np.abs(g).mean(), np.abs(g).max()], rtol=1e-3)
    printed_loss = float(re.search(r"^loss:\s+(\S+)", proc.stdout, re.M).group(1))
    prediction = np.asarray(model.predict(x, verbose=0), np.float64)
    np.testing.assert_allclose(printed_loss, np.mean((prediction - y) ** 2), rtol=1e-5)
    assert "out.npz" in proc.stdout


def test_loss_option_on_an_uncompiled_linear_model_matches_the_closed_form(keras, tmp_path,
                                                                         monkeypatch, capsys):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 2)).astype("float32")
    model.layers[0].kernel.assign(w)
    x = rng.standard_normal((5, 3)).astype("float32")
    y = rng.standard_normal((5, 2)).astype("float32")
    model.save(tmp_path / "linear.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    code, _, err = run_in_process("grads", "linear.keras", "data.npz", "--loss", "mse", "-o",
                                  "g", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    (grad,) = gradkit.load(tmp_path / "g.npz").values()
    x64, y64, w64 = (a.astype(np.float64) for a in (x, y, w))
    closed_form = 2.0 / y.size * x64.T @ (x64 @ w64 - y64)  # mean over batch and outputs
    np.testing.assert_allclose(grad, closed_form, rtol=1e-5, atol=1e-7)


def test_loss_option_replaces_a_custom_compiled_loss_the_file_cannot_load(keras, tmp_path,
                                                                          monkeypatch, capsys):
    """A model compiled with an unregistered loss function: refused (safe_mode) with --loss
    as the way out; with --loss the layers load without their compile state."""
    def my_loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.abs(y_true - y_pred))

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    model.compile(loss=my_loss)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3)).astype("float32")
    y = rng.standard_normal((5, 2)).astype("float32")
    model.save(tmp_path / "custom_loss.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    code, _, err = run_in_process("grads", "custom_loss.keras", "data.npz", "-o", "g",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "'my_loss'" in err and "pass --loss NAME instead" in err, err
    code, _, err = run_in_process("grads", "custom_loss.keras", "data.npz", "--loss", "mse",
                                  "-o", "g", cwd=tmp_path, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 0, err
    (grad,) = gradkit.load(tmp_path / "g.npz").values()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    w64 = np.asarray(keras.ops.convert_to_numpy(model.layers[0].kernel), np.float64)
    np.testing.assert_allclose(grad, 2.0 / y.size * x64.T @ (x64 @ w64 - y64), rtol=1e-5,
                               atol=1e-7)


def test_named_inputs_outputs_sample_weight_training_and_layers(keras, tmp_path, monkeypatch,
                                                                capsys):
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.BatchNormalization(name="norm")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], [keras.layers.Dense(2, name="o1")(h),
                                 keras.layers.Dense(1, name="o2")(h)])
    model.compile(loss=["mse", "mae"], loss_weights=[1.0, 0.5])
    rng = np.random.default_rng(3)
    xa, xb, y1, y2 = (rng.standard_normal((5, n)).astype("float32") for n in (3, 2, 2, 1))
    sw = rng.uniform(0.5, 2.0, 5).astype("float32")
    model.save(tmp_path / "mm.keras")
    np.savez(tmp_path / "mm.npz", x_b=xb, x_a=xa, y_o2=y2, y_o1=y1, sample_weight=sw)
    code, _, err = run_in_process("grads", "mm.keras", "mm.npz", "--training", "--layers", "o*",
                                  "-o", "mm_g.npz", cwd=tmp_path, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 0, err
    written = gradkit.load(tmp_path / "mm_g.npz")
    expected = gradkit.gradients(model, [xa, xb], [y1, y2], sample_weight=sw, training=True)
    assert list(written) == ["o1/kernel", "o1/bias", "o2/kernel", "o2/bias"]
    for key in written:
        np.testing.assert_allclose(written[key], expected[key], rtol=1e-5, atol=1e-6)
    # training=True used batch statistics, which differ from the initial moving ones:
    inference = gradkit.gradients(model, [xa, xb], [y1, y2], sample_weight=sw)
    assert not np.allclose(inference["o1/kernel"], expected["o1/kernel"])


def _garbage(tmp_path):
    (tmp_path / "garbage.keras").write_bytes(b"not a zip file")


def _truncated(tmp_path):
    data = (tmp_path / "model.keras").read_bytes()
    (tmp_path / "truncated.keras").write_bytes(data[: len(data) // 3])


def _bad_data(tmp_path):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "wide_x.npz", x=rng.random((6, 5)), y=rng.random((6, 2)))
    np.savez(tmp_path / "wide_y.npz", x=rng.random((6, 4)), y=rng.random((6, 3)))
    np.savez(tmp_path / "no_x.npz", y=rng.random((6, 2)))
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object))


BAD_INPUTS = [
    # (arguments, setup, exit code, phrase the one line must contain)
    (["missing.keras", "data.npz", "-o", "o"], None, 1, "No model file"),
    (["model.keras", "missing.npz", "-o", "o"], None, 1, "No data file"),
    (["garbage.keras", "data.npz", "-o", "o"], _garbage, 1, "not a valid .keras file"),
    (["truncated.keras", "data.npz", "-o", "o"], _truncated, 1, "not a valid .keras file"),
    (["model.keras", "no_x.npz", "-o", "o"], _bad_data, 1, "needs an array x"),
    (["model.keras", "pickled.npz", "-o", "o"], _bad_data, 1, "not a readable .npz"),
    (["model.keras", "data.npz", "-o", "nowhere/o.npz"], None, 1, "does not exist"),
    (["data.npz", "model.keras", "-o", "o"], None, 1, "The model comes first"),
    (["model.keras", "data.npz"], None, 2, "-o/--output"),
    (["model.keras", "data.npz", "-o", "o", "--backend", "numpy"], None, 2, "invalid choice"),
]


@pytest.mark.parametrize("args, setup, code, phrase", BAD_INPUTS,
                         ids=[case[3] for case in BAD_INPUTS])
def test_bad_input_prints_one_line_and_exits_non_zero(mlp, tmp_path, args, setup, code,
                                                       phrase):
    if setup is not None:
        setup(tmp_path)
    proc = run_cli("grads", *args, cwd=tmp_path)
    assert proc.returncode == code
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("gradkit: error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert phrase in proc.stderr
    assert not (tmp_path / "o.npz").exists()


def _needs_code(tmp_path, keras):
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    inputs = keras.Input((4,))
    lam = keras.layers.Lambda(lambda t: 2 * t)(inputs)
    keras.Model(inputs, keras.layers.Dense(2)(lam)).save(tmp_path / "lambda.keras")
    keras.Model(inputs, keras.layers.Dense(2)(Doubler()(inputs))).save(tmp_path / "custom.keras")
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "uncompiled.keras")


IN_PROCESS_BAD_INPUTS = [
    (["model.keras", "data.npz", "-o", "o", "--layers", "hiden"], "Did you mean 'hidden'"),
    (["model.keras", "wide_x.npz", "-o", "o"], "expects (None, 4)"),
    # a failure inside the framework, its (multi-line, traced) error condensed to one line:
    (["model.keras", "wide_y.npz", "-o", "o"], "could not compute the loss"),
    (["model.keras", "data.npz", "-o", "o", "--loss", "msee"], "not a Keras loss"),
    (["model.keras", "data.npz", "-o", "g.txt"], "Name the file 'g.npz'"),
    (["lambda.keras", "data.npz", "-o", "o"], "a Python lambda"),
    (["custom.keras", "data.npz", "-o", "o"], "'Doubler'"),
    (["uncompiled.keras", "data.npz", "-o", "o"], "Pass --loss NAME"),
]


@pytest.mark.parametrize("args, phrase", IN_PROCESS_BAD_INPUTS,
                         ids=[case[1] for case in IN_PROCESS_BAD_INPUTS])
def test_bad_model_or_option_prints_one_line(mlp, keras, tmp_path, monkeypatch, capsys,
                                              args, phrase):
    """The same one-line contract, called in-process (Keras is already imported) to save
    a framework start-up per case; the subprocess tests above cover start-up output."""
    from gradkit._cli import main

    _bad_data(tmp_path)
    _needs_code(tmp_path, keras)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["grads", *args]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("gradkit: error: ") and phrase in captured.err
    assert captured.out == "" and not (tmp_path / "o.npz").exists()


_NO_TENSORFLOW = """import sys


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, _Blocker())
"""


def test_demo_trains_and_writes_gradients_of_the_demo_model(keras, flavour, tmp_path):
    from gradkit._demo import DEFAULT_OUT, build_model

    env_extra = None
    if flavour == "jax":  # a JAX-only install: no TensorFlow, no backend chosen anywhere
        (tmp_path / "blocker").mkdir()
        (tmp_path / "blocker" / "sitecustomize.py").write_text(_NO_TENSORFLOW)
        env_extra = {"KERAS_BACKEND": None, "KERAS_HOME": str(tmp_path / "blocker"),
                     "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"),
                                                    os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("demo", cwd=tmp_path, env_extra=env_extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert f"on the {flavour} backend" in proc.stdout
    written = gradkit.load(tmp_path / DEFAULT_OUT)
    reference = build_model(keras)  # same architecture, untrained: only shapes are compared
    shapes = {v.path: tuple(v.shape) for v in reference.trainable_variables}
    assert {k: g.shape for k, g in written.items()} == shapes
    for key, grad in written.items():
        assert np.all(np.isfinite(grad)) and np.any(grad != 0), key
        norm = float(_table_rows(proc.stdout)[key][1])
        np.testing.assert_allclose(norm, np.linalg.norm(grad.astype(np.float64)), rtol=1e-3)
    assert str(tmp_path / DEFAULT_OUT) in proc.stdout


def test_demo_never_replaces_a_foreign_file(tmp_path):
    foreign = tmp_path / "gradkit-demo.npz"
    foreign.write_text("my notes")
    proc = run_cli("demo", cwd=tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "-o" in proc.stderr
    assert foreign.read_text() == "my notes"


def test_nan_data_is_reported_as_one_warning_line(mlp, tmp_path, monkeypatch, capsys):
    from gradkit._cli import main

    _, x, y = mlp
    x = x.copy()
    x[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["grads", "model.keras", "nan.npz", "-o", "g.npz"]) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gradkit: warning: Non-finite gradient") and "1 NaN/Inf" in err
    assert np.isnan(gradkit.load(tmp_path / "g.npz")["out/kernel"]).any()


def test_debug_adds_the_traceback_before_the_error_line(tmp_path, monkeypatch, capsys):
    from gradkit._cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["grads", "missing.keras", "data.npz", "-o", "o", "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback")
    assert err.splitlines()[-1].startswith("gradkit: error: No model file")


def test_batch_size_accumulates_as_gradkit_accumulate(mlp, tmp_path, monkeypatch, capsys):
    from gradkit._cli import main

    model, x, y = mlp
    monkeypatch.chdir(tmp_path)
    assert main(["grads", "model.keras", "data.npz", "-o", "acc.npz", "--batch-size", "4"]) == 0
    assert "accumulated in batches of 4" in capsys.readouterr().out
    written = gradkit.load(tmp_path / "acc.npz")
    expected = gradkit.accumulate(model, (x, y), batch_size=4, progress=False)
    whole = gradkit.gradients(model, x, y)  # the mean over 6 examples, one batch
    assert list(written) == list(expected)
    for key in expected:
        np.testing.assert_allclose(written[key], expected[key], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(written[key], whole[key], rtol=1e-4, atol=1e-6)
