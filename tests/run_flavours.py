"""Run the test suite once per Keras flavour, each in its own process.

    python tests/run_flavours.py [pytest args...]

Keras fixes its backend at import, so tensorflow, jax, torch and tf_keras each get a fresh
pytest process (GRADKIT_FLAVOUR). Two flavour processes run at a time (the longest first;
``GRADKIT_TEST_JOBS=1`` runs them one after another), since most test time is one-threaded
Python and tracing. Each flavour's output is printed whole when it ends, then one summary
line per flavour and a total line 'N passed, N failed'; exits non-zero if any flavour failed
or ran no test. ``GRADKIT_FLAVOURS=jax,torch`` runs only those.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

FLAVOURS = ("jax", "tensorflow", "tf_keras", "torch")  # longest first
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    flavours = [f for f in os.environ.get("GRADKIT_FLAVOURS", ",".join(FLAVOURS)).split(",") if f]
    jobs = max(1, int(os.environ.get("GRADKIT_TEST_JOBS", "2")))
    start = time.monotonic()
    results = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run_flavour, flavour, argv): flavour for flavour in flavours}
        for future in as_completed(futures):
            flavour = futures[future]
            returncode, output, seconds = future.result()
            print(f"===== flavour {flavour} =====", flush=True)
            print(output, end="", flush=True)
            print(f"----- {flavour}: exit {returncode}, {seconds:.0f}s -----", flush=True)
            results[flavour] = (returncode, _counts(output))
    return _summarize(results, time.monotonic() - start)


def _run_flavour(flavour: str, argv: list[str]) -> tuple[int, str, float]:
    env = dict(os.environ, GRADKIT_FLAVOUR=flavour, TF_CPP_MIN_LOG_LEVEL="3",
               TF_ENABLE_ONEDNN_OPTS="0", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc.returncode, proc.stdout, time.monotonic() - start


def _summarize(results: dict, seconds: float) -> int:
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    worst = 0
    for returncode, counts in results.values():
        for key in totals:
            totals[key] += counts.get(key, 0) + (counts.get("errors", 0) if key == "error" else 0)
        ran = counts.get("passed", 0) + counts.get("failed", 0)
        worst = worst or (returncode if ran else (returncode or 5))
    for flavour, (returncode, counts) in results.items():
        print(f"{flavour}: exit {returncode}, " + ", ".join(f"{n} {w}" for w, n in counts.items()))
    print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, "
          f"{totals['skipped']} skipped, in {seconds / 60:.1f} min")
    return 1 if worst else 0


def _counts(output: str) -> dict[str, int]:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
