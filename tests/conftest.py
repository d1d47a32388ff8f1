"""One Keras flavour per pytest process, chosen by GRADKIT_FLAVOUR before Keras is imported.

GRADKIT_FLAVOUR: tensorflow | jax | torch (Keras 3 on that backend) | tf_keras (Keras 2).
`tests/run_flavours.py` runs the suite once per flavour, each in its own process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

FLAVOUR = os.environ.get("GRADKIT_FLAVOUR", "tensorflow")
if FLAVOUR not in ("tensorflow", "jax", "torch", "tf_keras"):
    raise pytest.UsageError(f"GRADKIT_FLAVOUR must be tensorflow, jax, torch or tf_keras: {FLAVOUR}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# JAX's partitionable threefry (the default) compiles each new shape of random numbers in
# seconds on CPU (6 s for a 3x3x8x16 kernel's initializer here, 0.3 s without it); the
# suite builds hundreds of models. Only the random bits differ; inherited by subprocesses.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
# JAX's persistent compilation cache, fresh for this run (removed at its end): tests rebuild
# the same small models, whose programs then compile once (about a fifth of the JAX run).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="gradkit-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_JAX_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
if FLAVOUR != "tf_keras":
    os.environ["KERAS_BACKEND"] = FLAVOUR

if FLAVOUR == "tf_keras":
    import tf_keras as keras_module
else:
    import keras as keras_module


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "flavours(*names): run the test only on these flavours"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("flavours")
        if marker and FLAVOUR not in marker.args:
            item.add_marker(pytest.mark.skip(reason=f"not for flavour {FLAVOUR}"))


def pytest_report_header(config):
    return f"gradkit flavour: {FLAVOUR} (keras {keras_module.__version__})"


@pytest.fixture
def flavour() -> str:
    return FLAVOUR


@pytest.fixture
def keras():
    """The Keras of this flavour: `keras` (Keras 3) or `tf_keras` (Keras 2)."""
    return keras_module


@pytest.fixture(autouse=True)
def _fresh_session():
    if FLAVOUR == "tf_keras":
        keras_module.backend.clear_session()
    else:  # without its full gc.collect(), 0.2-0.3 s a test; Python's own gc still runs
        keras_module.backend.clear_session(free_memory=False)
    keras_module.utils.set_random_seed(0)
    yield


@pytest.fixture
def float64(keras, flavour):
    """floatx float64 for one test (and JAX's x64 mode, without which JAX has no float64)."""
    if flavour == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    set_floatx = keras.backend.set_floatx if flavour == "tf_keras" else keras.config.set_floatx
    if flavour == "tf_keras":  # an explicit global policy would override floatx
        keras.mixed_precision.set_global_policy(None)
    set_floatx("float64")
    try:
        yield
    finally:
        set_floatx("float32")
        if flavour == "jax":
            jax.config.update("jax_enable_x64", False)


def to_numpy(value) -> np.ndarray:
    """A variable's or tensor's value as NumPy, on any flavour."""
    if FLAVOUR == "tf_keras":
        return np.array(value.numpy())
    return np.array(keras_module.ops.convert_to_numpy(value))


def trained_stateful_model(keras):
    """Dense-BatchNorm-Dropout-Dense with Adam and a metric, after one fit step, so that every
    piece of state (moving statistics, seed state, optimizer slots, metrics; on tf-keras
    the lazily built loss metrics too) holds a non-initial value. Returns (model, x, y)."""
    rng = np.random.default_rng(3)
    model = keras.Sequential(name="stateful", layers=[
        keras.Input((4,)),
        keras.layers.Dense(6, name="d1"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dropout(0.5, name="drop"),
        keras.layers.Dense(3, name="d2"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    x = rng.normal(size=(8, 4)).astype("float32") * 2 + 1
    y = rng.normal(size=(8, 3)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model, x, y


def state_snapshot(model) -> list[np.ndarray]:
    """Copies of every model variable (weights, BatchNorm statistics, seeds) and metric."""
    values = [to_numpy(v) for v in model.variables]
    for metric in model.metrics:
        values.extend(to_numpy(v) for v in metric.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "variables", None):
        opt_vars = optimizer.variables() if callable(optimizer.variables) else optimizer.variables
        values.extend(to_numpy(v) for v in opt_vars)
    if FLAVOUR != "tf_keras":
        for layer in model._flatten_layers():
            for gen in getattr(layer, "_seed_generators", []) or []:
                values.append(to_numpy(gen.state))
    return values


def assert_same_state(before, after):
    assert len(before) == len(after)
    for i, (a, b) in enumerate(zip(before, after)):
        np.testing.assert_array_equal(a, b, err_msg=f"state entry {i} changed")


@pytest.fixture(scope="session")
def cross_flavour_results(tmp_path_factory) -> Path:
    """The folder where tests/_cross_backend_worker.py wrote its results on every flavour
    (run once per test session, in the process that first asks)."""
    worker = Path(__file__).with_name("_cross_backend_worker.py")
    return run_on_every_flavour(worker, tmp_path_factory.mktemp("cross_flavour"))


def run_on_every_flavour(worker, out, flavours=("tensorflow", "jax", "torch", "tf_keras")):
    """Run ``python worker FLAVOUR out`` for each flavour at once, each in its own process
    (Keras fixes its backend at import); fail with the worker's output if one fails."""
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0",
               CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    env.pop("KERAS_BACKEND", None)
    procs = {f: subprocess.Popen([sys.executable, str(worker), f, str(out)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for f in flavours}
    for flavour, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{flavour} worker failed:\n{output[-3000:]}"
    return out


def run_mirrored_step_worker(flavour, check):
    """Run tests/_mirrored_step_worker.py (data parallel over two CPU devices) in its own
    process: the devices must be set before the framework starts."""
    import subprocess
    import sys

    worker = Path(__file__).with_name("_mirrored_step_worker.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    done = subprocess.run([sys.executable, str(worker), flavour, check], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
