"""A progress bar for work over many batches: batches done, and examples per second.

tqdm when it is installed, else Keras' own Progbar; shown only when asked for AND the stream
(stderr by default) is an interactive terminal, so logs, pipes and CI stay clean. The first
batch pays for compilation, so rates and the ETA are measured from its end: the tqdm bar
opens after it (at 1), and Progbar leaves the first step out of its ETA itself.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import numpy as np

from gradkit._errors import InvalidArgumentError, received


def check_progress(progress: Any) -> None:
    """Raise unless ``progress=`` is True or False (checked before any work starts)."""
    if not isinstance(progress, (bool, np.bool_)):
        raise InvalidArgumentError("progress= must be True or False. "
                                   + received(progress=progress))


class Progress:
    """``with Progress(total, enabled) as bar: bar.update(examples)`` once per batch."""

    def __init__(self, total: int | None, enabled: bool, *, description: str = "gradkit",
                 stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled) and callable(isatty) and bool(isatty())
        self.total = total
        self.description = description
        self.batches = 0
        self.examples = 0
        self._start = time.perf_counter()
        self._bar: Any = None
        self._kind = ""
        self._first = 0

    def __enter__(self) -> Progress:
        if self.enabled:
            self._kind = "tqdm" if _has_tqdm() else "progbar"
            if self._kind == "progbar":
                self._bar = _progbar(self.total)
        self._start = time.perf_counter()
        return self

    def update(self, examples: int) -> None:
        """Record one finished batch of `examples` examples."""
        self.batches += 1
        self.examples += int(examples)
        now = time.perf_counter()
        if self.batches == 1:  # compilation ends with the first batch: measure after it
            self._start, self._first = now, self.examples
            if self.enabled and self._kind == "tqdm":
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, initial=1, desc=self.description,
                                 unit="batch", file=self.stream)
            return
        if self._bar is None:
            return
        rate = (self.examples - self._first) / max(now - self._start, 1e-9)
        if self._kind == "tqdm":
            self._bar.set_postfix_str(f"{rate:,.0f} examples/s", refresh=False)
            self._bar.update(1)
        else:
            self._bar.update(self.batches, values=[("examples/s", rate)])

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None and self._kind == "tqdm":
            self._bar.close()
        self._bar = None


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _progbar(total: int | None) -> Any:
    try:
        from keras.utils import Progbar
    except ImportError:
        from tf_keras.utils import Progbar
    return Progbar(total, unit_name="batch", stateful_metrics=["examples/s"])
