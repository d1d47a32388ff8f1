"""Gradient sets on disk: `.npz` files, written atomically, read without pickle.

Keys are variable paths such as ``"dense/kernel"``; each becomes the zip member
``dense/kernel.npy``, which ``np.load`` reads back under the same key, so keys, their order,
values and dtypes survive a round trip. Only arrays are stored: a ``None`` entry (an
unconnected variable under ``unconnected="none"``) is refused rather than silently dropped.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradkit._errors import GradkitFileError, InvalidArgumentError, received


def save(path: str | os.PathLike, grads: Mapping[str, Any]) -> Path:
    """Write `grads` to `path` atomically; return the path. The file is an ``.npz``: a path
    without a suffix gets ``.npz`` appended (as ``np.savez`` does), any other suffix
    (``g.txt``) is refused rather than written under a name it does not have.

    The file appears complete or not at all: it is written to a temporary file in the same
    folder, flushed to disk, then renamed over `path`; if anything fails, an existing file
    at `path` is left untouched and the temporary file is removed. Arrays are stored as
    they are (values and dtypes), never pickled.
    """
    path = npz_path(path)
    arrays = _checked_arrays(grads)
    if not path.parent.is_dir():
        raise GradkitFileError(
            f"Cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist. "
            "Create it first or choose another path. " + received(path=str(path))
        )
    try:
        _write_atomically(path, arrays)
    except OSError as exc:
        raise GradkitFileError(
            f"Could not write {str(path)!r} ({exc}); nothing was written there. Check that "
            "the path is a writable file (not a folder) and that the disk has room. "
            + received(path=str(path))
        ) from exc
    return path


def npz_path(path: str | os.PathLike, option: str = "path") -> Path:
    """`path` as the ``.npz`` file save() writes: ``.npz`` appended when it has no suffix;
    raises InvalidArgumentError for another suffix, GradkitFileError for a folder (checked
    before any work is done)."""
    path = Path(path)
    if path.is_dir():  # not a sibling file named after it
        raise GradkitFileError(
            f"{str(path)!r} is a folder. Name the .npz file to write in it, e.g. "
            f"{str(path / 'gradients.npz')!r}. " + received(**{option: str(path)})
        )
    if path.suffix == ".npz":
        return path
    if path.suffix:
        raise InvalidArgumentError(
            f"gradkit writes gradient sets as .npz files, so it will not write {str(path)!r} "
            f"under the suffix {path.suffix!r}. Name the file {path.stem + '.npz'!r}. "
            + received(**{option: str(path)})
        )
    return path.with_name(path.name + ".npz")


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_npz(handle, arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_npz(handle: Any, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes, without its keyword arguments shadowing keys like "file"."""
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a gradient set written by `save` (or any ``.npz`` of arrays), without pickle.

    Keys and their order, values and dtypes come back exactly as saved.
    """
    path = Path(path)
    if not path.is_file():
        raise GradkitFileError(
            f"No gradient file at {str(path)!r}. Check the path (gradkit.save writes .npz "
            "files). " + received(path=str(path))
        )
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise GradkitFileError(
            f"{str(path)!r} is not a readable .npz of arrays ({exc}). It may be truncated, "
            "not an .npz file, or hold pickled objects, which gradkit never loads. "
            + received(path=str(path))
        ) from None


def _checked_arrays(grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(grads, Mapping):
        raise InvalidArgumentError(
            "save() takes a gradient dict {name: array}, as gradkit.gradients returns. "
            + received(grads=type(grads).__name__)
        )
    arrays = {}
    for key, value in grads.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(
                "Every key of a gradient dict must be a string (a variable path). "
                + received(key=key)
            )
        if value is None:
            raise InvalidArgumentError(
                f"The gradient of {key!r} is None (an unconnected variable); a file can hold "
                "only arrays. Drop the entry, or compute with unconnected='zero'. "
                + received(key=key)
            )
        array = np.asarray(value)
        if array.dtype == object:
            raise InvalidArgumentError(
                f"The gradient of {key!r} is not a numeric array. " + received(key=key)
            )
        arrays[key] = array
    return arrays
