"""Refusing a result that cannot fit in memory, before anything is allocated.

Per-example gradients hold B x P numbers: a batch of 256 through a 25M-parameter model is
25 GiB of float32. Rather than be killed by the operating system part way, gradkit compares
the estimate with the memory available now (Linux ``/proc/meminfo`` MemAvailable, else
``os.sysconf``) and raises a `ResultTooLargeError` that says what to do instead.
"""

from __future__ import annotations

import os

from gradkit._errors import ResultTooLargeError, received


def available_bytes() -> int | None:
    """Memory the system can give this process now without swapping, or None if unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def free_bytes() -> int:
    """Unused physical memory (less than what the system can give: no page cache), or 0."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 0


def check_fits(result_bytes: int, chunk_bytes: int, batch_size: int) -> None:
    """Raise ResultTooLargeError if the result plus one chunk exceeds the available memory.
    Within half the free memory (one system call) it fits without reading /proc/meminfo
    (16 µs, a sizeable part of a small model's call)."""
    needed = result_bytes + chunk_bytes
    if needed <= free_bytes() // 2:
        return
    available = available_bytes()
    if available is None or needed <= available:
        return
    raise ResultTooLargeError(
        f"The per-example gradients would need {_gib(needed)} ({_gib(result_bytes)} of "
        f"result, {batch_size} rows of every selected variable, plus {_gib(chunk_bytes)} for "
        f"one chunk being computed), but only {_gib(available)} of memory is available. Use "
        "gradkit.per_example_norms (norms without the rows), select fewer variables with "
        "layers=, pass a smaller batch, or pass out= with arrays you allocated (e.g. "
        "np.memmap). " + received(batch_size=batch_size, needed_bytes=needed,
                                   available_bytes=available)
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
