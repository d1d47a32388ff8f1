"""Shared helpers of the benchmark scripts: flavour subprocesses, timing, tables.

Every benchmark compares gradkit with a hand-written baseline measured in the same process,
interleaving the two so that machine noise (other processes, frequency changes) hits both
alike, and reports the median of many repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

FLAVOURS = ("tensorflow", "jax", "torch", "tf_keras")


def flavour_env(flavour: str, threads: int = 0) -> dict[str, str]:
    """The environment of a subprocess that runs one Keras flavour (`threads` > 0: that many
    compute threads in every framework, for a machine shared with other work)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0",
               PYTHONUNBUFFERED="1")
    if flavour != "tf_keras":
        env["KERAS_BACKEND"] = flavour
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   XLA_FLAGS=f"--xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
                             f"intra_op_parallelism_threads={threads}")
    return env


def setup_flavour(flavour: str, threads: int = 0):
    """Set the environment for `flavour` and import its Keras (call before any framework)."""
    os.environ.update(flavour_env(flavour, threads))
    if threads and flavour in ("tensorflow", "tf_keras"):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    if threads and flavour == "torch":
        import torch

        torch.set_num_threads(threads)
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    if keras.backend.backend() != flavour:
        raise SystemExit(f"keras was imported with backend {keras.backend.backend()}")
    return keras


def run_worker(script: str, flavour: str, args: Sequence[str], threads: int = 0) -> dict:
    """Run `script --worker FLAVOUR args...` in a fresh process; return its JSON result.

    The worker prints one line starting with ``RESULT `` followed by JSON.
    """
    proc = subprocess.run(
        [sys.executable, script, "--worker", flavour, *args],
        env=flavour_env(flavour, threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def benchmark_parser(doc: str, **defaults: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: --flavours, the hidden --worker, and an int option
    per keyword (``repeats=30`` gives ``--repeats``, default 30; ``threads`` means compute
    threads per framework, 0 for the framework's own)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--flavours", default=",".join(FLAVOURS))
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def run_flavours(script: str, args: argparse.Namespace, options: Sequence[str],
                 extra: Sequence[str] = ()) -> tuple[list[tuple[str, dict]], bool]:
    """Run `script`'s worker once per flavour of ``args.flavours``, passing the named
    options of `args` (and `extra`); return ([(flavour, result)], whether one failed), each
    failure printed on stderr."""
    threads = getattr(args, "threads", 0)
    forwarded = [item for name in options for item in (f"--{name}", str(getattr(args, name)))]
    results, failed = [], False
    for flavour in [f for f in args.flavours.split(",") if f]:
        r = run_worker(os.path.abspath(script), flavour, [*forwarded, *extra], threads)
        if "error" in r:
            print(f"{flavour}: FAILED {r['error']}", file=sys.stderr)
            failed = True
            continue
        results.append((flavour, r))
    return results, failed


def threads_label(threads: int) -> str:
    return f"{threads} thread(s)" if threads else "default threads"


def emit(result: dict) -> None:
    """Print a worker's result for `run_worker` to read."""
    print("RESULT " + json.dumps(result), flush=True)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 5,
                inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (see `samples`)."""
    return {name: median(values)
            for name, values in samples(fns, repeats, warmup, inner).items()}


def samples(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 5,
            inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, the functions timed in turn.

    Each round runs every function `inner` times, in a new random order (seeded), so drift,
    load from other processes and the after-effects of the previous call (a large free, cold
    caches) are shared between them; summarize with `median` or `paired_ratio`.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        order = list(names)
        shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median over rounds of numerator/denominator measured in the same round: robust
    to load that changes between rounds (a shared machine)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats as given (format them before)."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def tf_tracing_count(model) -> int:
    """How many times the tf.functions gradkit holds for `model` were traced (TensorFlow and
    tf-keras alike): a retrace check across batch sizes."""
    from gradkit._backends import _cache

    total = 0
    for entry in _cache.for_model(model).values():
        for part in entry if isinstance(entry, tuple) else (entry,):
            total += sum(fn.experimental_get_tracing_count()
                         for fn in getattr(part, "functions", {}).values())
    return total
