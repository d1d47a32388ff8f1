"""The `gradkit` command line: ``gradkit grads MODEL DATA -o OUT.npz``, ``gradkit check``,
``gradkit hessian``, ``gradkit demo`` and ``gradkit plot LOG_DIR -o flow.png``.

Keras (and so the framework) is imported only after the arguments are parsed and the backend
is chosen (``--backend`` sets ``KERAS_BACKEND``). Every expected failure prints one line,
``gradkit: error: ...``, to stderr and exits 1 (2 for a usage error); ``--debug`` adds the
traceback. Framework warnings and start-up logs are kept off the terminal; gradkit's own
warnings (NaN/Inf gradients) are printed as ``gradkit: warning: ...`` lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from gradkit._errors import GradkitError, GradkitFileError, received

BACKENDS = ("tensorflow", "jax", "torch")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gradkit: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from gradkit._cli_check import add_check_command, add_hessian_command
    from gradkit._cli_grads import add_grads_command

    parser = _Parser(prog="gradkit", description="Concrete NumPy gradients of Keras models.")
    parser.add_argument("--version", action="version", version=f"gradkit {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", choices=BACKENDS,
                        help="Keras 3 backend (sets KERAS_BACKEND; default: the environment's "
                             "KERAS_BACKEND or ~/.keras/keras.json)")
    common.add_argument("--debug", action="store_true", help="show tracebacks and warnings")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="{grads,check,hessian,demo,plot}")
    add_grads_command(commands, common)
    add_check_command(commands, common)
    add_hessian_command(commands, common)
    _add_demo_command(commands, common)
    _add_plot_command(commands, common)
    return parser


def _add_demo_command(commands: Any, common: argparse.ArgumentParser) -> None:
    demo = commands.add_parser(
        "demo", parents=[common], help="train a small CNN on built-in data; show its gradients",
        description="Train a small convolutional classifier on synthetic images generated in "
                    "memory, then compute, print and save its gradients.")
    demo.add_argument("-o", "--output", metavar="OUT.npz",
                      help="where to write the gradients (default: ./gradkit-demo.npz, never "
                           "replacing a file that is not a gradkit demo output)")
    demo.set_defaults(run=_run_demo)


def _add_plot_command(commands: Any, common: argparse.ArgumentParser) -> None:
    plot = commands.add_parser(
        "plot", parents=[common], help="plot the gradients a GradientMonitor logged",
        description="Draw the per-layer gradient norms over steps and a layer x step heat "
                    "map (or the histograms) from the gradients.jsonl a GradientMonitor "
                    "wrote into LOG_DIR.")
    plot.add_argument("log_dir", metavar="LOG_DIR", help="the monitor's log_dir")
    plot.add_argument("-o", "--output", metavar="OUT.png", default="gradient-flow.png",
                      help="image to write (format from the suffix; default "
                           "gradient-flow.png)")
    plot.add_argument("--kind", choices=("flow", "histograms"), default="flow")
    plot.set_defaults(run=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from gradkit._monitor._plots import plot_gradient_flow, plot_histograms

    out = Path(args.output)
    if not out.parent.is_dir():
        raise GradkitFileError(f"Cannot write {str(out)!r}: its folder does not exist. "
                               + received(output=args.output))
    draw = plot_gradient_flow if args.kind == "flow" else plot_histograms
    draw(args.log_dir, path=out)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    _quiet_frameworks()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _select_backend(args.backend)
            code = args.run(args)
    except KeyboardInterrupt:
        print("gradkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure becomes one line; --debug shows the traceback
        if args.debug:
            traceback.print_exc()
        print("gradkit: error: " + one_line(describe(exc)), file=sys.stderr)
        return 1
    _report_warnings(caught, args.debug)
    return code


def _run_demo(args: argparse.Namespace) -> int:
    from gradkit._demo import output_path, run

    out = output_path(None if args.output is None else str(checked_output(args.output)))
    import_keras()
    run(str(out))
    return 0


def _quiet_frameworks() -> None:
    """Silence TensorFlow's start-up lines and absl/TF Python logs (before TF is imported).

    Also JAX's classic threefry: its default, partitionable one compiles each new shape of
    random numbers for seconds on CPU (6 s for the demo's 3x3x8x16 kernel), and the CLI's
    only random numbers are initial weights, seeded in the demo and replaced when a saved
    model loads. A user's own setting of either variable is kept."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
    for name in ("absl", "tensorflow", "jax", "keras"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _select_backend(backend: str | None) -> None:
    if backend is None:
        backend = installed_backend()
        if backend is None:
            return
    keras = sys.modules.get("keras")
    current = keras.backend.backend() if keras is not None else None
    if current not in (None, backend):
        raise GradkitError(
            f"Keras is already imported in this process with the {current!r} backend and "
            f"cannot switch to {backend!r}. Run gradkit in a fresh process. "
            + received(backend=backend)
        )
    os.environ["KERAS_BACKEND"] = backend


def installed_backend() -> str | None:
    """The backend to use when none was chosen: Keras' own choice (KERAS_BACKEND, then
    keras.json, then "tensorflow") if its framework is installed, else the first installed
    of tensorflow, jax, torch (so a JAX-only or torch-only install works as it is); None
    when Keras is already imported or the choice is explicit."""
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return None
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as handle:
            preferred = json.load(handle).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        preferred = "tensorflow"
    for name in (preferred, "tensorflow", "jax", "torch"):
        if name in ("tensorflow", "jax", "torch") and _installed(name):
            return name
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def import_keras() -> Any:
    """Import Keras 3 on the chosen backend, or raise one clear error."""
    try:
        import keras
    except ImportError as exc:
        backend = os.environ.get("KERAS_BACKEND", "the default")
        raise GradkitError(
            f"Keras could not be imported with backend {backend} ({exc}). Install it, e.g. "
            "pip install 'gradkit[tensorflow]' (or [jax], [torch]), or choose another "
            "--backend. " + received(backend=backend)
        ) from None
    if not hasattr(keras, "saving") or not keras.__version__.startswith("3"):
        raise GradkitError(
            f"The gradkit command needs Keras 3, but Keras {keras.__version__} is installed. "
            "Install keras>=3.5, or use gradkit.gradients from Python with tf-keras. "
            + received(keras=keras.__version__)
        )
    return keras


def one_line(text: str, limit: int = 600) -> str:
    """Collapse a message onto one line of at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def condense(message: str) -> str:
    """The informative line of a framework error (drops traced-code and node noise)."""
    noise = ("File ", "in user code", "Detected at node", "Graph execution error", "[[")
    lines = [
        raw.strip() for raw in message.splitlines()
        if raw.strip() and not raw.startswith(" " * 8) and not raw.strip().startswith(noise)
    ]
    return lines[-1] if lines else message.strip()


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, its message condensed to the informative line."""
    if isinstance(exc, GradkitError):
        return str(exc)
    name = type(exc).__name__
    text = condense(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    return f"{name}: {text.removeprefix(name + ': ')}"


def _report_warnings(caught: list, debug: bool) -> None:
    from gradkit._errors import NonFiniteGradientWarning

    for record in caught:
        if issubclass(record.category, NonFiniteGradientWarning):
            print("gradkit: warning: " + one_line(str(record.message)), file=sys.stderr)
        elif debug:
            print(warnings.formatwarning(record.message, record.category, record.filename,
                                         record.lineno).rstrip(), file=sys.stderr)


def _version() -> str:
    from gradkit import __version__

    return __version__


def checked_output(output: str) -> Path:
    """The .npz path to write; its folder must exist (checked before any slow work)."""
    from gradkit._io import npz_path

    path = npz_path(output, "output")
    if not path.parent.is_dir():
        raise GradkitFileError(
            f"Cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist. "
            "Create it first or choose another -o path. " + received(output=output)
        )
    return path
