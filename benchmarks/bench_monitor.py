"""What `gradkit.GradientMonitor` costs `fit`: epoch time with it at every=100 and every=1
divided by epoch time without it, per flavour.

    python benchmarks/bench_monitor.py [--flavours tensorflow,jax,torch,tf_keras]
                                       [--examples 60000] [--batch 256] [--rounds 2]

Model: the 784-512-512-10 MLP (relu, softmax), SGD, sparse categorical cross-entropy, on
random MNIST-shaped arrays. One fresh process per flavour; after a warm-up fit, each round
runs `fit(epochs=2)` without a monitor, with `GradientMonitor(every=100)` and with
`GradientMonitor(every=1)` (no files written), in alternating order, and times each epoch
with a callback. The first epoch of a monitored fit includes the one-time retrace/compile
of the train step that installing the hook needs (a plain fit of a warm model has none);
the second epoch is the steady state. Reported: the best (least disturbed) epoch time of
each kind over the rounds, and the ratios monitored / plain for epoch 1 and epoch 2; "CPU":
the same ratio of the steady epoch's process CPU time (best over rounds), which other
tenants of a shared machine disturb less than wall time; "paired": the median over rounds
of each round's steady ratio (monitored / the plain fit of the same round, run next to it),
which a host whose speed drifts during the run disturbs least.
Targets (steady state): <= 1.05 at every=100, <= 1.3 at every=1.

"hand-written stats": the same statistics as a skilled user would write them per update with
the backend's own ops (TF: one tf.function; JAX: one jit; torch: eager ops), timed alone on
gradients of the model's shapes: per variable the sum, min, max, shifted sum of squares,
zero count, a 30-bin histogram, the weights' and the update's sums of squares, results read
to the host. It has no gating, no state and no records; on TF and JAX, where one compiled
function leaves little to win, it is close to a floor for any in-step monitor.
"hand-written ratio" = (plain step + hand-written stats) / plain step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import FLAVOURS, emit, markdown_table, run_worker, setup_flavour  # noqa: E402

CONFIGS = ("plain", "every=100", "every=1")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", default=",".join(FLAVOURS))
    parser.add_argument("--examples", type=int, default=60000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.examples, args.batch, args.rounds))
        return 0
    rows, failed = [], False
    for flavour in [f for f in args.flavours.split(",") if f]:
        result = run_worker(os.path.abspath(__file__), flavour, [
            "--examples", str(args.examples), "--batch", str(args.batch),
            "--rounds", str(args.rounds)])
        if "error" in result:
            print(f"{flavour}: FAILED {result['error']}", file=sys.stderr)
            failed = True
            continue
        print(f"{flavour}: {result}", file=sys.stderr, flush=True)
        plain = result["plain"]
        steps = -(-args.examples // args.batch)
        row = [flavour, f"{plain[1]:.2f}"]
        for config in CONFIGS[1:]:
            first, second = result[config]
            row += [f"{first / plain[0]:.2f}", f"{second / plain[1]:.3f}",
                    f"{result['paired'][config]:.3f}",
                    f"{result['cpu'][config] / result['cpu']['plain']:.3f}",
                    f"{(second - plain[1]) / steps * 1e3:+.2f}"]
        step_ms = plain[1] / steps * 1e3
        by_hand = result["hand_written_ms"]
        rows.append(row + [f"{by_hand:.2f}", f"{(step_ms + by_hand) / step_ms:.3f}"])
    print(f"784-512-512-10 MLP, {args.examples:,} examples, batch {args.batch}, best of "
          f"{args.rounds} rounds (paired: median over them); ratio = epoch time with the "
          "monitor / without.\n")
    print(markdown_table(
        ["flavour", "plain epoch (s)", "every=100 epoch 1", "every=100 steady",
         "every=100 paired", "every=100 steady CPU", "every=100 ms/step", "every=1 epoch 1",
         "every=1 steady", "every=1 paired", "every=1 steady CPU", "every=1 ms/step",
         "hand-written stats ms/step", "hand-written ratio"], rows))
    return 1 if failed else 0


def _model(keras):
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return model


def worker(flavour: str, examples: int, batch: int, rounds: int) -> dict:
    keras = setup_flavour(flavour)
    import numpy as np

    import gradkit as gk

    rng = np.random.default_rng(0)
    x = rng.random((examples, 784), dtype=np.float32)
    y = rng.integers(0, 10, examples).astype("int32")
    model = _model(keras)
    model.fit(x[:4 * batch], y[:4 * batch], batch_size=batch, epochs=1, verbose=0)

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start[0])
            self.cpu.append(time.process_time() - self.start[1])

    def run(config: str) -> list:
        clock = Clock()
        clock.times, clock.cpu = [], []
        callbacks = [] if config == "plain" else [
            gk.GradientMonitor(every=int(config.split("=")[1]), writers=())]
        model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0,
                  callbacks=callbacks + [clock])
        return clock.times, clock.cpu[1]

    best = {c: [float("inf"), float("inf")] for c in CONFIGS}
    cpu = {c: float("inf") for c in CONFIGS}  # of the steady epoch
    steady: dict = {c: [] for c in CONFIGS}  # per round
    for r in range(rounds):
        for config in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
            times, steady_cpu = run(config)
            best[config] = [min(a, b) for a, b in zip(best[config], times)]
            cpu[config] = min(cpu[config], steady_cpu)
            steady[config].append(times[1])
    paired = {c: float(np.median(np.divide(steady[c], steady["plain"]))) for c in CONFIGS}
    return dict(best, cpu=cpu, paired=paired, hand_written_ms=_hand_written(flavour, model))


def _hand_written(flavour: str, model, bins: int = 30, repeats: int = 300) -> float:
    """ms per update of the hand-written statistics (see the module docstring), median."""
    import numpy as np

    rng = np.random.default_rng(1)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    grads = [rng.normal(size=s).astype("float32") * 1e-3 for s in shapes]
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    if flavour in ("tensorflow", "tf_keras"):
        fn = _tf_by_hand(grads, weights, bins)
    elif flavour == "jax":
        fn = _jax_by_hand(grads, weights, bins)
    else:
        fn = _torch_by_hand(grads, weights, bins)
    times = []
    for _ in range(repeats + 10):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times[10:]) * 1e3)


def _tf_by_hand(grads, weights, bins):
    import tensorflow as tf

    g = [tf.constant(a.ravel()) for a in grads]
    w = [tf.Variable(a.ravel()) for a in weights]

    @tf.function
    def stats():
        rows, hists = [], []
        for gi, wi in zip(g, w):
            total, lo, hi = tf.reduce_sum(gi), tf.reduce_min(gi), tf.reduce_max(gi)
            old = tf.identity(wi.read_value())
            rows.append(tf.stack([
                total, lo, hi, tf.reduce_sum(tf.math.squared_difference(gi, total / gi.shape[0])),
                tf.cast(tf.reduce_sum(tf.cast(tf.equal(gi, 0.0), tf.int32)), tf.float32),
                tf.reduce_sum(tf.square(wi)), tf.reduce_sum(tf.math.squared_difference(wi, old))]))
            hists.append(tf.histogram_fixed_width(gi, tf.stack([lo, hi]), bins))
        return tf.stack(rows), tf.stack(hists)

    return lambda: [x.numpy() for x in stats()]


def _jax_by_hand(grads, weights, bins):
    import jax
    import jax.numpy as jnp

    g = [jnp.asarray(a.ravel()) for a in grads]
    w = [jnp.asarray(a.ravel()) for a in weights]

    @jax.jit
    def stats(g, w, old):
        rows, hists = [], []
        for gi, wi, oi in zip(g, w, old):
            total, lo, hi = jnp.sum(gi), jnp.min(gi), jnp.max(gi)
            index = jnp.minimum((gi - lo) * (bins / (hi - lo)), bins - 1.0).astype("int32")
            rows.append(jnp.stack([
                total, lo, hi, jnp.sum((gi - total / gi.shape[0]) ** 2),
                jnp.sum(gi == 0).astype("float32"), jnp.sum(wi * wi),
                jnp.sum((wi - oi) ** 2)]))
            hists.append(jnp.bincount(index, length=bins))
        return jnp.stack(rows), jnp.stack(hists)

    old = [x + 1.0 for x in w]
    return lambda: jax.device_get(stats(g, w, old))


def _torch_by_hand(grads, weights, bins):
    import torch

    g = [torch.tensor(a.ravel()) for a in grads]
    w = [torch.tensor(a.ravel()) for a in weights]

    def stats():
        rows, hists = [], []
        for gi, wi in zip(g, w):
            total, (lo, hi) = torch.sum(gi), torch.aminmax(gi)
            old = wi.clone()
            d = gi - total / gi.numel()
            index = torch.sub(gi, lo).mul_(bins / (hi - lo)).clamp_(max=bins - 1.0)
            rows.append(torch.stack([
                total, lo, hi, torch.dot(d, d), (gi.numel() - torch.count_nonzero(gi)).float(),
                torch.dot(wi, wi), torch.dist(wi, old) ** 2]))
            hists.append(torch.bincount(index.to(torch.uint8), minlength=bins))
        return torch.stack(rows).numpy(), torch.stack(hists).numpy()

    return stats


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
