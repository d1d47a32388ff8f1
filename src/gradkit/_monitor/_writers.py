"""Monitor records to files: JSON Lines, CSV, TensorBoard event files (no TensorFlow needed).

- ``gradients.jsonl``: one record (see `_history`) per line, histograms included.
- ``gradients.csv``: the scalar entries, one column each, the header written once.
Both are appended to (a second `fit` continues the file) with ONE ``write`` of a whole line
on a file opened with O_APPEND, so a reader never sees half a record (on local disks).
- TensorBoard: ``events.out.tfevents.*`` written by tensorboardX (the ``monitor`` extra), the
  scalars under their record names and the histograms as TensorBoard histograms whose
  buckets are the record's bins; flushed after every record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gradkit._errors import GradkitFileError, InvalidArgumentError, received

JSONL, CSV = "gradients.jsonl", "gradients.csv"
WRITERS = ("jsonl", "csv", "tensorboard")


def writer_names(writers: Any) -> tuple:
    """``writers=`` as a tuple of known names (one name may come as a str), or raise."""
    names = (writers,) if isinstance(writers, str) else (
        tuple(writers) if isinstance(writers, (list, tuple)) else None)
    if names is None or any(n not in WRITERS for n in names):
        raise InvalidArgumentError(f"writers= takes a name or a list of names from {WRITERS}. "
                                   + received(writers=writers))
    return names


def open_writers(log_dir: Any, names: tuple) -> list:
    folder = Path(log_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradkitFileError(f"Cannot create the log folder {str(folder)!r} ({exc}). Choose "
                               "a writable log_dir. " + received(log_dir=str(log_dir))) from exc
    kinds = {"jsonl": JsonlWriter, "csv": CsvWriter, "tensorboard": TensorBoardWriter}
    return [kinds[n](folder) for n in names]


def _append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


class JsonlWriter:
    def __init__(self, folder: Path) -> None:
        self.path = folder / JSONL

    def write(self, record: dict) -> None:
        _append_line(self.path, json.dumps(record) + "\n")

    def close(self) -> None:
        return None


class CsvWriter:
    """Scalar entries only; the columns of an existing file are kept (missing cells empty)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CSV
        self.columns: list | None = None
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, encoding="utf-8") as f:
                self.columns = f.readline().rstrip("\n").split(",")

    def write(self, record: dict) -> None:
        if self.columns is None:
            self.columns = [k for k, v in record.items() if not isinstance(v, list)]
            if any("," in c for c in self.columns):
                raise GradkitFileError("A variable path holds a comma, which CSV cannot store; "
                                       "use the jsonl writer. " + received(writers="csv"))
            _append_line(self.path, ",".join(self.columns) + "\n")
        cells = [_cell(record.get(c)) for c in self.columns]
        _append_line(self.path, ",".join(cells) + "\n")

    def close(self) -> None:
        return None


def _cell(value: Any) -> str:
    return "" if value is None or isinstance(value, list) else repr(value)


class TensorBoardWriter:
    def __init__(self, folder: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as exc:
            raise InvalidArgumentError(
                "writers= includes 'tensorboard', which needs the tensorboardX package (no "
                "TensorFlow needed). Install it with pip install 'gradkit[monitor]', or drop "
                "'tensorboard' from writers=. " + received(writers="tensorboard")) from exc
        self.writer = SummaryWriter(logdir=str(folder), flush_secs=10_000)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for name, value in record.items():
            if name in ("step", "epoch", "batch") or "/histogram_range/" in name:
                continue
            if "/histogram/" in name:
                self._histogram(name, record, step)
            else:
                self.writer.add_scalar(name, float(value), global_step=step)
        self.writer.flush()

    def _histogram(self, name: str, record: dict, step: int) -> None:
        key = name.split("/histogram/", 1)[1]
        counts = np.asarray(record[name], dtype=np.float64)
        lo, hi = record[f"variables/histogram_range/{key}"]
        limits = lo + (hi - lo) * np.arange(1, len(counts) + 1) / len(counts)
        num = float(counts.sum())
        mean = record.get(f"variables/mean/{key}", 0.0)
        norm = record.get(f"variables/norm/{key}", 0.0)
        self.writer.add_histogram_raw(name, min=lo, max=hi, num=num, sum=mean * num,
                                      sum_squares=norm ** 2, bucket_limits=limits.tolist(),
                                      bucket_counts=counts.tolist(), global_step=step)

    def close(self) -> None:
        self.writer.close()
