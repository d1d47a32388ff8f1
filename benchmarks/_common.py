"""Shared helpers of the benchmark scripts: flavour subprocesses, timing, tables.

Every benchmark compares gradkit with a hand-written baseline measured in the same process,
interleaving the two so that machine noise (other processes, frequency changes) hits both
alike, and reports the median of many repetitions.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

FLAVOURS = ("tensorflow", "jax", "torch", "tf_keras")


def flavour_env(flavour: str) -> dict[str, str]:
    """The environment of a subprocess that runs one Keras flavour."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0",
               PYTHONUNBUFFERED="1")
    if flavour != "tf_keras":
        env["KERAS_BACKEND"] = flavour
    return env


def setup_flavour(flavour: str):
    """Set the environment for `flavour` and import its Keras (call before any framework)."""
    os.environ.update(flavour_env(flavour))
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    if keras.backend.backend() != flavour:
        raise SystemExit(f"keras was imported with backend {keras.backend.backend()}")
    return keras


def run_worker(script: str, flavour: str, args: Sequence[str]) -> dict:
    """Run `script --worker FLAVOUR args...` in a fresh process; return its JSON result.

    The worker prints one line starting with ``RESULT `` followed by JSON.
    """
    proc = subprocess.run(
        [sys.executable, script, "--worker", flavour, *args],
        env=flavour_env(flavour), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def emit(result: dict) -> None:
    """Print a worker's result for `run_worker` to read."""
    print("RESULT " + json.dumps(result), flush=True)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 5,
                inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation.

    Each round runs every function `inner` times in turn (the order rotating by round), so
    drift and load from other processes are shared between them.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


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
