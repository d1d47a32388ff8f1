"""Run the test suite once per Keras flavour, each in its own process.

    python tests/run_flavours.py [pytest args...]

Keras fixes its backend at import, so tensorflow, jax, torch and tf_keras each get a fresh
pytest process (GRADKIT_FLAVOUR). Prints one summary line per flavour and a total line
'N passed, N failed'; exits non-zero if any flavour failed or ran no test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

FLAVOURS = ("tensorflow", "jax", "torch", "tf_keras")
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    flavours = [f for f in os.environ.get("GRADKIT_FLAVOURS", ",".join(FLAVOURS)).split(",") if f]
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    worst = 0
    for flavour in flavours:
        env = dict(os.environ, GRADKIT_FLAVOUR=flavour, TF_CPP_MIN_LOG_LEVEL="3",
                   TF_ENABLE_ONEDNN_OPTS="0", PYTHONUNBUFFERED="1")
        start = time.monotonic()
        print(f"===== flavour {flavour} =====", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        print(proc.stdout, end="", flush=True)
        counts = _counts(proc.stdout)
        for key in totals:
            totals[key] += counts.get(key, 0) + (counts.get("errors", 0) if key == "error" else 0)
        ran = counts.get("passed", 0) + counts.get("failed", 0)
        code = proc.returncode if ran else (proc.returncode or 5)
        worst = worst or code
        print(f"----- {flavour}: exit {proc.returncode}, {time.monotonic() - start:.0f}s -----",
              flush=True)
    print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, "
          f"{totals['skipped']} skipped")
    return 1 if worst else 0


def _counts(output: str) -> dict[str, int]:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
