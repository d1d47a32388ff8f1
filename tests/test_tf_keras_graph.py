"""tf-keras in graph mode (tf.compat.v1.disable_eager_execution) gives the eager results.

Graph mode is process-wide, so tests/_graph_mode_worker.py runs once in graph mode and once
in eager mode, each in its own process, on the same model, weights and data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradkit as gk

pytestmark = pytest.mark.flavours("tf_keras")
WORKER = Path(__file__).with_name("_graph_mode_worker.py")
RUNS = ("compiled_training", "compiled", "loss", "target")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graph_mode")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for mode in ("graph", "eager")]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    return out


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_checks_inside_each_mode(written, mode):
    checks = gk.load(written / f"{mode}-checks.npz")
    assert bool(checks["eager"]) == (mode == "eager")  # graph mode really was on
    assert bool(checks["same_state"])  # weights, BN statistics, optimizer, metrics untouched
    assert float(checks["fit_error"]) < 1e-5  # one fit step moved w by exactly -lr * g
    assert int(checks["graph_growth"]) == 0  # a new batch size reused the built tensors
    # GradientMonitor: graph mode refused with a GradkitError at fit's start, weights as they
    # were; eager mode records the step
    assert str(checks["monitored"]) == ("recorded" if mode == "eager" else "refused")
    assert bool(checks["untrained"]) == (mode == "graph")


@pytest.mark.parametrize("run", RUNS)
def test_graph_mode_matches_eager(written, run):
    graph = gk.load(written / f"graph-{run}.npz")
    eager = gk.load(written / f"eager-{run}.npz")
    assert list(graph) == list(eager)
    for key in eager:
        assert graph[key].dtype == eager[key].dtype == np.float32
        np.testing.assert_allclose(graph[key], eager[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if run == "target":  # the unused output branch came back as zeros (unconnected="zero")
        assert not graph["b/kernel"].any() and graph["a/kernel"].any()
