"""Plots of a monitor's history (matplotlib, the ``plots`` extra, imported inside).

A source is a `GradientMonitor`, its ``history`` dict, or a log folder holding the
``gradients.jsonl`` a monitor wrote. Figures are returned; with ``path=`` they are also
saved (any matplotlib format, by the suffix) and closed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gradkit._errors import GradkitFileError, InvalidArgumentError, received
from gradkit._monitor._history import history_of
from gradkit._monitor._writers import JSONL


def load_history(source: Any) -> dict:
    """The history of a monitor, a history dict, or a log folder (its gradients.jsonl)."""
    if isinstance(source, dict) and "step" in source:
        return source
    if hasattr(source, "records"):
        return history_of(source.records)
    if isinstance(source, (str, Path)):
        folder = Path(source)
        path = folder / JSONL if folder.is_dir() else folder
        if not path.is_file():
            raise GradkitFileError(
                f"No monitor log at {str(path)!r}: expected the {JSONL} a GradientMonitor "
                "writes into its log_dir (writers including 'jsonl'). "
                + received(source=str(source)))
        lines = path.read_text(encoding="utf-8").splitlines()
        return history_of([json.loads(line) for line in lines if line.strip()])
    raise InvalidArgumentError("source= must be a GradientMonitor, its history, or a log "
                               "folder. " + received(source=source))


def _pyplot() -> Any:
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg",) and not _has_display():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidArgumentError("Plots need matplotlib: pip install 'gradkit[plots]'. "
                                   + received(matplotlib=None)) from exc
    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _figure_path(path: Any) -> Path | None:
    """`path` checked before anything is drawn: an existing folder, a folder that does not
    exist and a suffix matplotlib cannot write are refused (no suffix: matplotlib's PNG)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise GradkitFileError(f"{str(path)!r} is a folder. Name the image file to write in "
                               f"it, e.g. {str(path / 'gradients.png')!r}. "
                               + received(path=str(path)))
    if not path.parent.is_dir():
        raise GradkitFileError(f"Cannot write {str(path)!r}: the folder {str(path.parent)!r} "
                               "does not exist. Create it first or choose another path. "
                               + received(path=str(path)))
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise InvalidArgumentError(f"matplotlib cannot write {path.suffix!r} images; use one "
                                   f"of {sorted(formats)} (e.g. {path.stem + '.png'!r}). "
                                   + received(path=str(path)))
    return path


def _finish(fig: Any, path: Path | None) -> Any:
    if path is not None:
        fig.savefig(path)
        _pyplot().close(fig)
    return fig


def plot_gradient_flow(source: Any, *, path: Any = None, stat: str = "norm") -> Any:
    """Per-layer gradient `stat` over steps (log scale) and a layer x step heat map."""
    history, path = load_history(source), _figure_path(path)
    layers = history["layers"].get(stat)
    if not layers:
        raise InvalidArgumentError(f"The history has no per-layer {stat!r} (recorded: "
                                   f"{sorted(history['layers'])}). " + received(stat=stat))
    plt = _pyplot()
    steps = history["step"]
    names = list(layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), constrained_layout=True)
    for name in names:
        top.plot(steps, np.abs(layers[name]), label=name)
    top.set_yscale("log")
    top.set(xlabel="step", ylabel=f"gradient {stat}", title="Gradient flow per layer")
    top.legend(fontsize="small", loc="best")
    grid = np.log10(np.maximum(np.abs(np.array([layers[n] for n in names])), 1e-30))
    image = bottom.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    bottom.set_yticks(range(len(names)), names, fontsize="small")
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int)
    bottom.set_xticks(ticks, [str(steps[t]) for t in ticks])
    bottom.set(xlabel="step", title=f"log10 gradient {stat}")
    fig.colorbar(image, ax=bottom)
    return _finish(fig, path)


def plot_histograms(source: Any, *, path: Any = None, variables: Any = None) -> Any:
    """Each variable's gradient histogram over steps: one panel per variable, step on y."""
    history, path = load_history(source), _figure_path(path)
    hists = history["variables"].get("histogram")
    if not hists:
        raise InvalidArgumentError("The history holds no histograms: record them with "
                                   "stats= including 'histogram'. " + received(source=source))
    keys = list(hists) if variables is None else (
        [variables] if isinstance(variables, str) else list(variables))
    unknown = [key for key in keys if key not in hists]
    if unknown or not keys:
        raise InvalidArgumentError(
            f"variables= names variables of the history: {list(hists)}; "
            f"{unknown or 'none'} are not among them. " + received(variables=variables))
    plt = _pyplot()
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False,
                             constrained_layout=True)
    ranges = history["variables"]["histogram_range"]
    colors = plt.get_cmap("viridis")
    for ax, key in zip(axes.ravel(), keys):
        counts = np.atleast_2d(np.array(hists[key].tolist()))
        for r, (row, (lo, hi)) in enumerate(zip(counts, np.array(ranges[key].tolist()))):
            centers = lo + (hi - lo) * (np.arange(len(row)) + 0.5) / len(row)
            ax.plot(centers, row, color=colors(r / max(len(counts) - 1, 1)), lw=1)
        ax.set_title(key, fontsize="small")
        ax.set_xlabel("gradient value (early: dark, late: light)")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    return _finish(fig, path)
