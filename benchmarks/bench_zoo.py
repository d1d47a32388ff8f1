"""Per-example gradients and norms over a model zoo, against a loop of compiled gradients.

    python benchmarks/bench_zoo.py [--flavours tensorflow,jax,torch,tf_keras] [--batch 16]
                                   [--repeats 5] [--route vectorized|mapped|loop]
                                   [--models mlp,cnn,mobilenet,transformer,rnn,decoder]

Models: an MLP (64-256-256-10), a small CNN (28x28, two Conv2D), MobileNetV2 at 96x96
(weights=None), a transformer block (Embedding, MultiHeadAttention, LayerNormalization, a
Dense feed-forward), stacked LSTM -> GRU, and a small encoder-decoder (16x16x4: a strided
Conv2D, a grouped Conv2D, two Conv2DTranspose). Each flavour runs in its own process. The
baseline is the plain recipe a user would write: a Python loop over the batch calling a
compiled single-example gradient (`tf.function` over a GradientTape / `jax.jit` of
`jax.value_and_grad` over `stateless_call` / torch autograd), each gradient to NumPy, then
`np.stack`. Reported: gradkit's time divided by the loop's, for `per_example_gradients` and
`per_example_norms`, medians over rounds of the ratio in the same round (after a warm-up in
which gradkit chooses its route: see gradkit._routes), and the route taken. "batch floor" is
the user's same compiled gradient called once on the whole batch, over the loop: per-example
gradients sum to the batch gradient, so no per-example route can cost less than that.
"hand-written vectorized" (MLP, CNN, transformer) is the best per-example recipe a skilled
user writes, over the loop: the framework's vectorizer over the single-example gradient,
compiled (`vectorized_gradient`); "fails" where the framework's vectorizer raises on the
model (torch's vmap on a channels-last convolution). ``--route`` times that route instead of the
one gradkit chooses (``loop``: gradkit's own loop of single-example gradients, the route of
last resort, against the user's loop).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    FLAVOURS,
    emit,
    markdown_table,
    paired_ratio,
    run_worker,
    samples,
    setup_flavour,
)

MODELS = ("mlp", "cnn", "mobilenet", "transformer", "rnn", "decoder")
#: The models with the 0.3 target, where the hand-written vectorized recipe is timed too
VECTORIZED_BASELINE = ("mlp", "cnn", "transformer")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", default=",".join(FLAVOURS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--route", choices=("vectorized", "mapped", "loop"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        emit(worker(args.worker, args.models.split(","), args.batch, args.repeats,
                    args.route))
        return 0
    rows = []
    for flavour in [f for f in args.flavours.split(",") if f]:
        for name in args.models.split(","):
            r = run_worker(os.path.abspath(__file__), flavour,
                           ["--models", name, "--batch", str(args.batch),
                            "--repeats", str(args.repeats)]
                           + (["--route", args.route] if args.route else []))
            if "error" in r:
                print(f"{flavour} {name}: FAILED {r['error']}", file=sys.stderr)
                rows.append([name, flavour, "failed", "", "", "", "", ""])
                continue
            m = r[name]
            rows.append([name, flavour, f"{m['loop_ms']:.0f}", f"{m['rows']:.2f}",
                         f"{m['norms']:.2f}", f"{m['floor']:.2f}", m["vectorized"] or "—",
                         m["route"]])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print(f"batch {args.batch}; gradkit / loop of compiled single-example gradients (median "
          f"of {args.repeats} rounds)\n")
    print(markdown_table(["model", "flavour", "loop (ms)", "per_example_gradients",
                          "per_example_norms", "batch floor", "hand-written vectorized",
                          "route"], rows))
    return 0


def build(keras, name: str, batch: int):
    import numpy as np

    L, rng = keras.layers, np.random.default_rng(0)
    if name == "mlp":
        model = keras.Sequential([keras.Input((64,)), L.Dense(256, activation="relu"),
                                  L.Dense(256, activation="relu"), L.Dense(10)])
        x = rng.normal(size=(batch, 64))
    elif name == "cnn":
        model = keras.Sequential([
            keras.Input((28, 28, 1)), L.Conv2D(16, 3, activation="relu"), L.MaxPooling2D(),
            L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(), L.Flatten(), L.Dense(10)])
        x = rng.normal(size=(batch, 28, 28, 1))
    elif name == "mobilenet":
        model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None,
                                               classes=10)
        x = rng.normal(size=(batch, 96, 96, 3))
    elif name == "transformer":
        inputs = keras.Input((16,), dtype="int32")
        h = L.Embedding(1000, 64)(inputs)
        h = L.LayerNormalization()(h + L.MultiHeadAttention(4, 16)(h, h))
        h = L.LayerNormalization()(h + L.Dense(64)(L.Dense(128, activation="relu")(h)))
        model = keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling1D()(h)))
        x = rng.integers(0, 1000, size=(batch, 16))
    elif name == "decoder":  # grouped and transposed convolutions
        model = keras.Sequential([
            keras.Input((16, 16, 4)), L.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
            L.Conv2D(16, 3, padding="same", groups=4, activation="relu"),
            L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu"),
            L.Conv2DTranspose(4, 2, activation="relu"), L.GlobalAveragePooling2D(), L.Dense(10)])
        x = rng.normal(size=(batch, 16, 16, 4))
    else:
        model = keras.Sequential([keras.Input((20,), dtype="int32"), L.Embedding(1000, 32),
                                  L.LSTM(64, return_sequences=True), L.GRU(64), L.Dense(10)])
        x = rng.integers(0, 1000, size=(batch, 20))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=name != "mobilenet")
    model.compile(loss=loss)
    x = x.astype("int32" if x.dtype.kind == "i" else "float32")
    return model, loss, x, rng.integers(0, 10, size=batch).astype("int32")


def single_gradient(flavour: str, keras, model, loss):
    """The user's compiled single-example gradient: (x, y) -> [NumPy gradient per variable]."""
    if flavour in ("tensorflow", "tf_keras"):
        import tensorflow as tf

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                value = loss(y, model(x, training=False))
            return tape.gradient(value, model.trainable_variables)

        return lambda x, y: [tf.convert_to_tensor(g).numpy() for g in step(x, y)]
    if flavour == "jax":
        import jax

        def objective(trainable, non_trainable, x, y):
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return loss(y, y_pred)

        jitted = jax.jit(jax.grad(objective))
        return lambda x, y: jax.device_get(jitted(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables], x, y))
    import torch

    def run(x, y):
        value = loss(torch.from_numpy(y), model(torch.from_numpy(x), training=False))
        return [g.numpy() for g in torch.autograd.grad(
            value, [v.value for v in model.trainable_variables])]

    return run


def vectorized_gradient(flavour: str, keras, model, loss):
    """The best hand-written per-example recipe: the framework's vectorizer over the
    single-example gradient, compiled (`tf.vectorized_map` in a `tf.function` / `jax.jit` of
    `jax.vmap(jax.grad)` / `torch.func.vmap(torch.func.grad)` over `stateless_call`):
    (x, y) -> [NumPy (n, *shape) per variable]."""
    if flavour in ("tensorflow", "tf_keras"):
        import tensorflow as tf

        @tf.function
        def step(x, y):
            def one(example):
                with tf.GradientTape() as tape:
                    value = loss(example[1][None], model(example[0][None], training=False))
                return tape.gradient(value, model.trainable_variables)

            return tf.vectorized_map(one, (x, y))

        return lambda x, y: [tf.convert_to_tensor(g).numpy() for g in step(x, y)]

    def objective(trainable, non_trainable, x, y):
        y_pred, _ = model.stateless_call(trainable, non_trainable, x[None], training=False)
        return loss(y[None], y_pred)

    if flavour == "jax":
        import jax

        jitted = jax.jit(jax.vmap(jax.grad(objective), in_axes=(None, None, 0, 0)))
        return lambda x, y: jax.device_get(jitted(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables], x, y))
    import torch

    mapped = torch.func.vmap(torch.func.grad(objective), in_dims=(None, None, 0, 0))
    return lambda x, y: [g.numpy() for g in mapped(
        [v.value.detach() for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables], torch.from_numpy(x),
        torch.from_numpy(y))]


def worker(flavour: str, names: list[str], batch: int, repeats: int,
           forced: str | None = None) -> dict:
    keras = setup_flavour(flavour)
    import numpy as np

    import gradkit
    from gradkit import _routes

    logging.getLogger("gradkit").setLevel(logging.ERROR)
    keras.utils.set_random_seed(0)
    result = {}
    for name in names:
        model, loss, x, y = build(keras, name, batch)
        single = single_gradient(flavour, keras, model, loss)

        def loop():
            rows = [single(x[i:i + 1], y[i:i + 1]) for i in range(batch)]
            return [np.stack([row[j] for row in rows]) for j in range(len(rows[0]))]

        fns = {"loop": loop, "batch": lambda: single(x, y),
               "rows": lambda: gradkit.per_example_gradients(model, x, y),
               "norms": lambda: gradkit.per_example_norms(model, x, y)}
        vectorized = "" if name not in VECTORIZED_BASELINE else "fails"
        if vectorized:
            hand_written = vectorized_gradient(flavour, keras, model, loss)
            try:
                rows = hand_written(x, y)  # compiled here
                expected = gradkit.per_example_gradients(model, x, y)
                if all(np.allclose(a, b, rtol=1e-4, atol=1e-5)
                       for a, b in zip(rows, expected.values())):
                    fns["vectorized"] = lambda: hand_written(x, y)
                else:
                    vectorized = "wrong rows"
            except Exception:  # noqa: BLE001 - the framework's vectorizer has a gap here
                pass
        route = _routes.route_of(gradkit._request.prepare(model, x, y))
        for operation in ("rows", "norms"):  # gradkit decides its route in <= 15 calls
            for _ in range(20):
                if operation in route.chosen:
                    break
                fns[operation]()
            if forced:
                route.chosen[operation] = forced
                fns[operation]()  # compiled for the batch on that route
        times = samples(fns, repeats, warmup=1)
        taken = "/".join(route.chosen.get(op, "?") for op in ("rows", "norms"))
        if "vectorized" in times:
            vectorized = f"{paired_ratio(times['vectorized'], times['loop']):.2f}"
        result[name] = {"loop_ms": float(np.median(times["loop"])) * 1e3,
                        "rows": paired_ratio(times["rows"], times["loop"]),
                        "norms": paired_ratio(times["norms"], times["loop"]),
                        "floor": paired_ratio(times["batch"], times["loop"]),
                        "vectorized": vectorized, "route": taken}
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
