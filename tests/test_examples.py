"""The migration examples run as scripts and exit 0; each one asserts inside that gradkit
agrees with the hand-written per-backend recipe it replaces (examples/seed_question.py).

To save time (each is a process of its own that imports its framework), each Keras 3 flavour
runs a share of them, so every example runs once and every backend's hand-written recipe
is checked: the first on TensorFlow (the examples' default backend), the second on JAX, the
last two on PyTorch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CASES = [
    pytest.param("01_all_weights.py", "agree on all 4 variables",
                 marks=pytest.mark.flavours("tensorflow")),
    pytest.param("02_one_layer.py", "agree on the 2 variables of layer 'dense_1'",
                 marks=pytest.mark.flavours("jax")),
    pytest.param("03_manual_descent.py", "after 5 clipped steps",
                 marks=pytest.mark.flavours("torch")),
    pytest.param("04_dp_sgd.py", "agrees with the hand-written recipe",
                 marks=pytest.mark.flavours("torch")),
]


@pytest.mark.parametrize("script, agreement", CASES)
def test_example_runs_and_agrees_with_the_hand_written_recipe(script, agreement):
    env = dict(os.environ, KERAS_BACKEND=os.environ["KERAS_BACKEND"],
               TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    proc = subprocess.run([sys.executable, script], cwd=EXAMPLES, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert agreement in proc.stdout
    assert proc.stderr == ""
