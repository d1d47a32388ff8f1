"""strategy="torch.distributed": two gloo processes on their own shares equal one process.

Two local processes (tests/_torch_distributed_worker.py, one launch for every case) pass
unequal shares of one dataset to accumulate, hvp_over, hessian_trace, hessian_eigenvalues
and fisher_diagonal; the references are computed here, in this process, on the whole
dataset: gradients() and hvp() on it as one batch, a dense Hessian from hvp() columns, and
the single-process dataset functions (with the same seed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradkit as gk

sys.path.insert(0, str(Path(__file__).parent))
import _torch_distributed_worker as worker  # noqa: E402

TIMEOUT = 240


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> list[dict]:
    """Both processes' saved results: one launch for every test here (torch only)."""
    from conftest import FLAVOUR

    if FLAVOUR != "torch":
        pytest.skip("torch.distributed runs on the torch flavour only")
    return _launch(tmp_path_factory.mktemp("torch_distributed"))


def _launch(tmp_path: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    outs = [tmp_path / f"rank{rank}.npz" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, worker.__file__, str(rank), port, str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank, out in enumerate(outs)]
    try:
        logs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"the torch.distributed workers did not finish in {TIMEOUT}s")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"worker failed:\n{log[-4000:]}"
    return [dict(np.load(out)) for out in outs]


def _part(result: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in result.items() if k.startswith(name + "/")}


def _close(got: dict, want: dict, rtol: float = 2e-5) -> None:
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=rtol / 10,
                                   err_msg=key)


def _dense_trace_and_eigenvalues(net, x, y) -> tuple[float, np.ndarray]:
    template = gk.gradients(net, x, y)
    sizes = [g.size for g in template.values()]
    columns = []
    for j in range(sum(sizes)):
        basis = np.split(np.eye(sum(sizes), dtype="float32")[j], np.cumsum(sizes)[:-1])
        vector = {k: b.reshape(g.shape) for (k, g), b in zip(template.items(), basis)}
        columns.append(np.concatenate([np.ravel(h) for h in
                                       gk.hvp(net, x, y, vector=vector).values()]))
    hessian = np.stack(columns, axis=1).astype(np.float64)
    return float(np.trace(hessian)), np.linalg.eigvalsh((hessian + hessian.T) / 2)[::-1]


@pytest.mark.flavours("torch")
def test_two_processes_equal_one_process(keras, launched):
    first, second = launched
    for key in [k for k in second if not k.startswith("error/")]:  # bit-equal everywhere
        assert np.array_equal(first[key], second[key]), key
    x, y, w = worker.data()
    net = worker.model(keras)
    _close(_part(first, "accumulate"), gk.gradients(net, x, y, sample_weight=w))
    _close(_part(first, "again"), gk.gradients(net, x, y, sample_weight=w))
    _close(_part(first, "internal"), gk.gradients(net, x, y, sample_weight=w))
    _close(_part(first, "target"), gk.gradients(net, x, target=1))
    kept = np.r_[0:7, 10:worker.N]  # rank 1's second batch held a NaN: left out of N too
    _close(_part(first, "skip"), gk.gradients(net, x[kept], y[kept], sample_weight=w[kept]))
    _close(_part(first, "fisher"), gk.fisher_diagonal(net, (x, y, w), batch_size=worker.BATCH))
    _close(_part(first, "hvp"), gk.hvp(net, x, y, sample_weight=w, vector=worker.vector(net)))
    for method in ("hutch++", "hutchinson"):
        single = gk.hessian_trace(net, (x, y), samples=9, method=method, seed=worker.SEED,
                                  batch_size=worker.BATCH)
        np.testing.assert_allclose(first[f"trace/{method}"], single, rtol=1e-5)
    trace, eigenvalues = _dense_trace_and_eigenvalues(net, x, y)
    np.testing.assert_allclose(first["eig/values"], eigenvalues[:2], rtol=1e-3)
    assert abs(first["trace/hutch++"][0] - trace) < 4 * first["trace/hutch++"][1] + 1e-6
    # a one-member group (new_group([0])): rank 0's share alone
    _close(_part(first, "alone"), gk.gradients(net, x[:4], y[:4]))
    assert bool(first["state_same"])


@pytest.mark.flavours("torch")
def test_errors_raise_on_every_process(launched):
    """Each case raises on both processes, and neither waits for ever."""
    first, second = launched
    error = {rank: {k: str(v) for k, v in _part(r, "error").items()}
             for rank, r in enumerate((first, second))}
    for rank in (0, 1):  # refused before any collective
        assert error[rank]["strategy"].startswith("InvalidArgumentError: On torch, strategy=")
    assert error[1]["empty"].startswith("InvalidArgumentError: The data yielded no examples")
    assert error[0]["empty"].startswith("ProcessGroupError: Process(es) [1]")
    for case, what in [("layers", "selected weights"), ("weights", "weights"),
                       ("vector", "vector"), ("seed", "seed")]:
        for rank in (0, 1):
            assert error[rank][case].startswith("InvalidArgumentError: The processes"), case
            assert f"disagree on: {what}" in error[rank][case]
            assert "Received:" in error[rank][case]
    assert error[1]["nonmember"].startswith("InvalidArgumentError: strategy= is what")
    assert error[1]["nonfinite"].startswith("NonFiniteGradientError: Batch 2 of the data")
    assert error[0]["nonfinite"].startswith("ProcessGroupError: Process(es) [1]")


# -- in-process: what is refused before any collective ---------------------------------------


def _small(keras):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss="mse", optimizer="sgd")
    return model, np.ones((4, 3), "float32"), np.ones((4, 2), "float32")


@pytest.mark.flavours("tensorflow", "jax", "tf_keras")
def test_torch_distributed_on_another_flavour_is_refused(keras):
    model, x, y = _small(keras)
    with pytest.raises(gk.InvalidArgumentError, match="torch backend only.*Received"):
        gk.accumulate(model, (x, y), strategy="torch.distributed", progress=False)
    with pytest.raises(gk.InvalidArgumentError, match="hessian_trace.*torch backend only"):
        gk.hessian_trace(model, (x, y), strategy="data_parallel")


@pytest.mark.flavours("torch")
def test_strategy_needs_an_initialized_process_group(keras):
    import torch.distributed

    assert not torch.distributed.is_initialized()
    model, x, y = _small(keras)
    with pytest.raises(gk.InvalidArgumentError, match="init_process_group.*Received"):
        gk.accumulate(model, (x, y), strategy="torch.distributed", progress=False)
    with pytest.raises(gk.InvalidArgumentError, match="init_process_group.*Received"):
        gk.hvp_over(model, (x, y), vector={}, strategy="torch.distributed")
