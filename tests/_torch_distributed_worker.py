"""One of two torch.distributed (gloo) processes, started by tests/test_torch_distributed.py.

    python tests/_torch_distributed_worker.py RANK PORT OUT.npz

Each process passes only its own, unequal share of one dataset to the collective calls
(``strategy="torch.distributed"``: accumulate, the dataset curvature functions and
fisher_diagonal) and saves what it got; the test compares both processes
with each other and with single-process references it computes itself. Then the error
cases, each raising on BOTH processes (the message is saved), and one more good call that
shows the processes are still in step. Importing this module has no side effects: the test
builds the same model and data from `model()` and `data()`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

N = 13
SHARES = [(0, 4), (4, N)]  # unequal shares: batches of 3 -> sizes 3, 1 | 3, 3, 3
BATCH = 3
SEED = 5


def data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, 3)).astype("float32")
    y = rng.normal(size=(N, 2)).astype("float32")
    w = rng.uniform(0.2, 2.0, size=N).astype("float32")
    return x, y, w


def model(keras, shift: float = 0.0):
    """A small tanh MLP with an L2 regularizer and fixed weights (no global seed)."""
    net = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", name="hidden",
                           kernel_regularizer=keras.regularizers.L2(0.1)),
        keras.layers.Dense(2, name="out"),
    ])
    net.compile(loss="mse", optimizer="sgd")
    rng = np.random.default_rng(3)
    net.set_weights([rng.normal(size=v.shape).astype("float32") + shift for v in net.weights])
    return net


def vector(net):
    rng = np.random.default_rng(11)
    return {v.path: rng.normal(size=v.shape).astype("float32") for v in net.trainable_variables}


def _results(gk, net, x, y, w, rank):
    lo, hi = SHARES[rank]
    mine, dist = (x[lo:hi], y[lo:hi], w[lo:hi]), {"strategy": "torch.distributed"}
    out = {}

    def put(name, grads):
        out.update({f"{name}/{k}": v for k, v in grads.items()})

    put("accumulate", gk.accumulate(net, mine, batch_size=BATCH, progress=False, **dist))
    put("target", gk.accumulate(net, x[lo:hi], target=1, batch_size=BATCH, progress=False,
                                **dist))
    bad = mine[0].copy()
    if rank == 1:
        bad[3] = np.nan  # the share's second batch (examples 7..9) is left out
    put("skip", gk.accumulate(net, (bad,) + mine[1:], batch_size=BATCH, progress=False,
                              on_nonfinite="skip", **dist))
    put("internal", _internal(net, mine))
    put("fisher", gk.fisher_diagonal(net, mine, batch_size=BATCH, **dist))
    put("hvp", gk.hvp_over(net, mine, vector=vector(net), batch_size=BATCH, **dist))
    for method in ("hutch++", "hutchinson"):
        out[f"trace/{method}"] = np.array(gk.hessian_trace(
            net, mine[:2], samples=9, method=method, seed=SEED, batch_size=BATCH, **dist))
    out["trace/shared_seed"] = np.array(gk.hessian_trace(net, mine[:2], samples=6,
                                                         batch_size=BATCH, **dist))
    eig = gk.hessian_eigenvalues(net, mine[:2], k=2, batch_size=BATCH, **dist)
    out["eig/values"], out["eig/hvps"] = eig.values, np.array(eig.hvps)
    return out


def _internal(net, mine):
    """The engine's distributed_sum (what TF/JAX strategies run), here on torch.distributed."""
    from gradkit._data import prepare_batch
    from gradkit._distributed import accumulate_distributed
    from gradkit._request import prepare

    request = prepare(net, y=mine[1], data=False)
    cuts = range(0, len(mine[0]), BATCH)
    batches = [prepare_batch(net, *(a[i:i + BATCH] for a in mine), "float32") for i in cuts]
    sums, count = accumulate_distributed(request, batches, "torch.distributed")
    return {key: s / count for key, s in zip(request.keys, sums)}


def _errors(gk, keras, net, x, y, rank):
    """Each case raises on both processes; the saved text is 'ErrorType: message'."""
    lo, hi = SHARES[rank]
    mine, dist = (x[lo:hi], y[lo:hi]), {"strategy": "torch.distributed", "progress": False}
    nan = x[lo:hi].copy()
    nan[-1] = np.nan  # in the last batch of each share
    cases = {
        "strategy": lambda: gk.accumulate(net, mine, strategy="data_parallel", progress=False),
        "empty": lambda: gk.accumulate(net, mine if rank == 0 else (x[:0], y[:0]), **dist),
        "layers": lambda: gk.accumulate(net, mine, layers="out" if rank else None, **dist),
        "weights": lambda: gk.accumulate(model(keras, shift=0.5 * rank), mine, **dist),
        "vector": lambda: gk.hvp_over(net, mine, strategy="torch.distributed", vector={
            k: v + rank for k, v in vector(net).items()}),
        "seed": lambda: gk.hessian_trace(net, mine, samples=6, seed=rank,
                                         strategy="torch.distributed"),
        "nonfinite": lambda: gk.accumulate(net, (nan if rank else mine[0], mine[1]),
                                           batch_size=BATCH, **dist),
    }
    out = {}
    for name, case in cases.items():
        try:
            case()
            out[f"error/{name}"] = np.array("no error")
        except gk.GradkitError as error:
            out[f"error/{name}"] = np.array(f"{type(error).__name__}: {error}")
    return out


def main(rank: int, port: str, path: str) -> None:
    os.environ.update(KERAS_BACKEND="torch", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    import keras

    import gradkit as gk

    x, y, w = data()
    net = model(keras)
    before = [np.array(v.numpy()) for v in net.variables]
    out = _results(gk, net, x, y, w, rank)
    out.update(_errors(gk, keras, net, x, y, rank))
    alone = torch_dist.new_group([0])  # rank 0 alone; rank 1 gets a non-member marker
    try:
        put = gk.accumulate(net, (x[:4], y[:4]), strategy=alone, progress=False)
        out.update({f"alone/{k}": v for k, v in put.items()})
    except gk.GradkitError as error:
        out["error/nonmember"] = np.array(f"{type(error).__name__}: {error}")
    lo, hi = SHARES[rank]  # still in step after every error: the same result again
    again = gk.accumulate(net, (x[lo:hi], y[lo:hi], w[lo:hi]), batch_size=BATCH,
                          progress=False, strategy="torch.distributed")
    out.update({f"again/{k}": v for k, v in again.items()})
    out["state_same"] = np.array(all(np.array_equal(a, np.array(v.numpy()))
                                     for a, v in zip(before, net.variables)))
    np.savez(path, **out)
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
