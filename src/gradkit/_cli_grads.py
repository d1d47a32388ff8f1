"""`gradkit grads MODEL DATA -o OUT.npz`: load a saved model and a batch, write its gradients.

MODEL is a Keras 3 ``.keras`` file loaded with ``safe_mode=True`` (no code from the file is
run: a Lambda or an unregistered custom class is refused) and ``compile=True`` (the compiled
loss is what is differentiated). DATA is an ``.npz`` read with ``allow_pickle=False``::

    x | x_<input name> ...      the inputs (one array, or one per named input)
    y | y_<output name> ...     the targets (one array, or one per named output)
    sample_weight               optional, one weight per example

Cheap checks (files, keys, output folder) run before Keras is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradkit._errors import DataShapeError, GradkitError, GradkitFileError, received


def add_grads_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``grads`` sub-command to the parser's `commands`."""
    grads = commands.add_parser(
        "grads", parents=[common], help="gradients of a saved model on a batch of data",
        description="Gradients of a saved Keras model's loss with respect to its trainable "
                    "weights, on one batch. The loss is the compiled loss as fit() "
                    "differentiates it (reduction as compiled: by default the mean over the "
                    "batch, plus regularization losses), unscaled, in float32.")
    grads.add_argument("model", metavar="MODEL", help="a .keras file (loaded with safe_mode)")
    grads.add_argument("data", metavar="DATA",
                       help="a .npz with x and y (or x_<input>/y_<output> per input/output), "
                            "optionally sample_weight")
    grads.add_argument("-o", "--output", metavar="OUT.npz", required=True,
                       help="where to write the gradients (atomically; .npz)")
    grads.add_argument("--layers", metavar="PATTERN", nargs="+", action="extend",
                       help="only these layers' weights: names, nested paths or globs")
    grads.add_argument("--loss", metavar="NAME",
                       help="a Keras loss name instead of the compiled loss, e.g. mse")
    grads.add_argument("--batch-size", metavar="N", type=int,
                       help="accumulate over DATA in batches of N examples (for a DATA too "
                            "large for one batch): the gradient of the mean loss over all "
                            "examples, as gradkit.accumulate")
    grads.add_argument("--training", action="store_true",
                       help="training mode (dropout on, batch statistics); no state is kept")
    grads.set_defaults(run=run_grads)


def run_grads(args: argparse.Namespace) -> int:
    from gradkit._cli import checked_output
    from gradkit._io import save
    from gradkit._table import summary

    out = checked_output(args.output)
    keras, model, x, y, sample_weight = load_inputs(args)
    loss, grads, size = _loss_and_gradients(model, x, y, sample_weight, args)
    what = (f"loss {args.loss!r} plus regularization losses" if args.loss else
            "the compiled loss as fit() differentiates it")
    print(f"model: {args.model} (Keras {keras.__version__}, {keras.backend.backend()} backend)")
    if loss is None:
        print(f"loss:  {what}, its mean over {size} examples accumulated in batches of "
              f"{args.batch_size} (training={args.training})\n")
    else:
        print(f"loss:  {loss:.6g} ({what}; {size} examples, training={args.training})\n")
    print(summary(grads))
    written = save(out, grads)
    print(f"\nwrote {len(grads)} gradient arrays to {written}")
    return 0


def load_inputs(args: argparse.Namespace) -> tuple:
    """(keras, model, x, y, sample_weight) from ``args.model``, ``args.data`` and
    ``args.loss``, every cheap check first; one clear error for anything wrong."""
    from gradkit._cli import import_keras

    check_model_file(Path(args.model))
    x, y, sample_weight = load_data(Path(args.data))
    keras = import_keras()
    model = load_model(keras, Path(args.model), loss_given=args.loss is not None)
    x, y = _match_names(model, x, y)
    _check_loss_available(model, args.loss, y)
    return keras, model, x, y, sample_weight


def load_data(path: Path) -> tuple[Any, Any, Any]:
    """(x, y, sample_weight) from an .npz; x and y are arrays or {name: array} dicts."""
    if not path.is_file():
        raise GradkitFileError(
            f"No data file at {str(path)!r}. DATA must be an .npz with arrays x and y, e.g. "
            "written by numpy.savez('data.npz', x=x, y=y). " + received(data=str(path))
        )
    arrays = _read_npz(path)
    known = {"x", "y", "sample_weight"}
    unknown = [k for k in arrays if k not in known and not k.startswith(("x_", "y_"))]
    if unknown:
        raise GradkitFileError(
            f"DATA {str(path)!r} holds arrays gradkit does not know: {unknown}. Expected keys: "
            "x (or x_<input name> per input), y (or y_<output name> per output) and "
            "optionally sample_weight. " + received(keys=sorted(arrays))
        )
    x = _group(arrays, "x", path)
    if x is None:
        raise GradkitFileError(
            f"DATA {str(path)!r} has no inputs: it needs an array x (or x_<input name> per "
            "model input). Save it with numpy.savez('data.npz', x=x, y=y). "
            + received(keys=sorted(arrays))
        )
    return x, _group(arrays, "y", path), arrays.get("sample_weight")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError(f"it holds one {type(data).__name__}, not named arrays")
        with data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise GradkitFileError(
            f"DATA {str(path)!r} is not a readable .npz of arrays ({exc}). Write it with "
            "numpy.savez('data.npz', x=x, y=y); object arrays are never loaded (no pickle). "
            + received(data=str(path))
        ) from None


def _group(arrays: dict[str, np.ndarray], prefix: str, path: Path) -> Any:
    named = {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "_")}
    if prefix in arrays and named:
        raise GradkitFileError(
            f"DATA {str(path)!r} holds both {prefix!r} and {prefix}_<name> arrays; use one "
            f"{prefix} for a single {'input' if prefix == 'x' else 'output'}, or one "
            f"{prefix}_<name> per named one. " + received(keys=sorted(arrays))
        )
    return arrays.get(prefix, named or None)


def check_model_file(path: Path) -> None:
    """Raise if `path` is missing, a folder, or a .keras file that is not a zip archive."""
    if not path.exists():
        raise GradkitFileError(
            f"No model file at {str(path)!r}. MODEL must be a Keras model saved with "
            "model.save('model.keras'). " + received(model=str(path))
        )
    if path.suffix == ".npz":
        raise GradkitFileError(
            f"MODEL {str(path)!r} is a NumPy .npz, which holds data, not a saved model. The "
            "model comes first, then the data: gradkit <command> model.keras data.npz. "
            + received(model=str(path))
        )
    if path.is_dir() or (path.suffix == ".keras" and not zipfile.is_zipfile(path)):
        raise GradkitFileError(
            f"{str(path)!r} is not a valid .keras file (a .keras file is a zip archive; this "
            "one may be truncated, or another format such as a SavedModel folder). Save the "
            "model with model.save('model.keras'). " + received(model=str(path))
        )


def load_model(keras: Any, path: Path, loss_given: bool = False) -> Any:
    """A Keras 3 model from a .keras file with safe_mode=True, or one clear error. With
    `loss_given` (--loss, which replaces the compiled loss), a compile state that needs code
    outside Keras (a custom loss) is left out rather than refused."""
    check_model_file(path)
    failures = (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile)
    try:
        model = keras.saving.load_model(str(path), compile=True, safe_mode=True)
    except failures as exc:
        if not (loss_given and _needs_code(exc)):
            raise GradkitFileError(_load_failure(path, exc)) from None
        try:  # the layers alone: a custom layer is refused here as before
            model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        except failures as again:
            raise GradkitFileError(_load_failure(path, again)) from None
    if not isinstance(model, keras.Model):
        raise GradkitFileError(
            f"{str(path)!r} holds a {type(model).__name__}, not a Keras model. "
            + received(model=str(path))
        )
    return model


def _needs_code(exc: Exception) -> bool:
    """Whether loading failed on code outside Keras (a custom object, a lambda)."""
    text = str(exc)
    return bool(re.search(r"Could not locate (?:class|function) '", text)) or "safe_mode" in text


def _load_failure(path: Path, exc: Exception) -> str:
    from gradkit._cli import describe

    text = str(exc)
    missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if _needs_code(exc):
        what = f"the custom object {missing.group(1)!r}" if missing else "a Python lambda"
        return (
            f"The model in {str(path)!r} needs {what}, i.e. code that is not part of Keras; "
            "gradkit loads models with safe_mode=True and runs no code from the file. Use "
            "built-in layers only (a custom compiled loss: pass --loss NAME instead), or load "
            "the model yourself in Python (with its custom objects) and call "
            "gradkit.gradients. " + received(model=str(path))
        )
    return (
        f"{str(path)!r} could not be loaded as a Keras 3 model ({describe(exc)}). Save it "
        "with model.save('model.keras'). " + received(model=str(path))
    )


def _match_names(model: Any, x: Any, y: Any) -> tuple[Any, Any]:
    """Check x_<name>/y_<name> keys against the model's input and output names."""
    if isinstance(x, dict):
        inputs = [getattr(t, "name", None) for t in model.inputs]
        _check_names("x", x, inputs)
        x = {name: x[name] for name in inputs}
    if isinstance(y, dict):
        outputs = list(model.output_names)
        _check_names("y", y, outputs)
        y = {name: y[name] for name in outputs}
    return x, y


def _check_names(prefix: str, given: dict, expected: list) -> None:
    if sorted(given) != sorted(expected):
        kind = "input" if prefix == "x" else "output"
        raise DataShapeError(
            f"DATA names the model {kind}s {sorted(given)} ({prefix}_<name> keys), but the "
            f"model's {kind}s are {expected}. Use one {prefix}_<name> array per model {kind}. "
            + received(**{f"{prefix}_names": sorted(given)})
        )


def _check_loss_available(model: Any, loss: str | None, y: Any) -> None:
    if loss is None and (not getattr(model, "compiled", False) or model.loss is None):
        raise GradkitError(
            f"The model {model.name!r} was saved without a compiled loss, so there is nothing "
            "to differentiate. Pass --loss NAME (a Keras loss such as mse or "
            "sparse_categorical_crossentropy). " + received(loss=None)
        )
    if y is None:
        raise GradkitFileError(
            "DATA has no targets, but the loss compares predictions with them. Add an array y "
            "(or y_<output name> per output) to the .npz. " + received(y=None)
        )


def _loss_and_gradients(model: Any, x: Any, y: Any, sample_weight: Any, args) -> tuple:
    """(loss value, gradient dict, example count) from gradkit.loss_and_gradients, or with
    --batch-size (None, gradkit.accumulate's gradient, example count)."""
    from gradkit import accumulate, loss_and_gradients
    from gradkit._data import leaves

    with data_refusals(x, y):
        if args.batch_size is not None:
            data = (x, y) if sample_weight is None else (x, y, sample_weight)
            loss, grads = None, accumulate(model, data, loss=args.loss, layers=args.layers,
                                           training=args.training, progress=False,
                                           batch_size=args.batch_size)
        else:
            loss, grads = loss_and_gradients(model, x, y, loss=args.loss,
                                             sample_weight=sample_weight, layers=args.layers,
                                             training=args.training)
    return loss, grads, len(leaves(x)[0])


@contextlib.contextmanager
def data_refusals(x: Any, y: Any) -> Iterator[None]:
    """Turn the framework refusing the data (y or the loss do not fit) into a DataShapeError."""
    from gradkit._cli import describe

    try:
        yield
    except (ValueError, TypeError, RuntimeError, _tf_op_error()) as exc:
        if isinstance(exc, GradkitError):
            raise
        raise DataShapeError(
            f"The model could not compute the loss on DATA ({describe(exc)}). Check that y "
            "(and sample_weight) fit the model's outputs and the loss. "
            + received(x=_shapes(x), y=_shapes(y))
        ) from None


def _tf_op_error() -> type:
    """TensorFlow's runtime error class if TensorFlow is loaded (shape errors in graphs)."""
    errors = sys.modules.get("tensorflow.python.framework.errors_impl")
    return getattr(errors, "OpError", ValueError)


def _shapes(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: tuple(v.shape) for k, v in data.items()}
    return None if data is None else tuple(data.shape)
