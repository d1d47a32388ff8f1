"""`gradkit check MODEL DATA` (gradients against finite differences; exit 1 on a mismatch) and
`gradkit hessian MODEL DATA --top K --trace` (curvature of the loss over the whole DATA).

MODEL and DATA are read as for ``gradkit grads`` (`gradkit._cli_grads.load_inputs`).
"""

from __future__ import annotations

import argparse
from typing import Any


def _model_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a .keras file (loaded with safe_mode)")
    parser.add_argument("data", metavar="DATA",
                        help="a .npz with x and y (or x_<input>/y_<output> per input/output)")
    parser.add_argument("--loss", metavar="NAME",
                        help="a Keras loss name instead of the compiled loss, e.g. mse")
    parser.add_argument("--layers", metavar="PATTERN", nargs="+", action="extend",
                        help="only these layers' weights: names, nested paths or globs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_check_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``check`` sub-command."""
    check = commands.add_parser(
        "check", parents=[common], help="check gradients against finite differences",
        description="Compare the model's gradients (the framework's autodiff) with central "
                    "finite differences of the same loss along random directions, per weight, "
                    "on a float64 copy of the model, in inference mode. Exits 1 if a weight's "
                    "gradient is wrong ('mismatch'); 'not smooth' (a kink such as ReLU at 0) "
                    "is reported but does not fail.")
    _model_and_data(check)
    check.add_argument("--directions", type=int, default=3, metavar="N",
                       help="random directions per weight (default 3)")
    check.set_defaults(run=run_check)


def add_hessian_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``hessian`` sub-command."""
    hessian = commands.add_parser(
        "hessian", parents=[common], help="top Hessian eigenvalues and trace over the data",
        description="Curvature of the mean loss over every example of DATA (compiled loss "
                    "or --loss, regularizers included, inference mode): the top K eigenvalues "
                    "by Lanczos and/or a randomized trace estimate with its standard error.")
    _model_and_data(hessian)
    hessian.add_argument("--top", type=int, default=1, metavar="K",
                         help="how many of the largest eigenvalues (default 1; 0: none)")
    hessian.add_argument("--trace", action="store_true", help="also estimate the trace")
    hessian.add_argument("--samples", type=int, default=100, metavar="N",
                         help="Hessian-vector products for the trace (default 100, Hutch++)")
    hessian.add_argument("--batch-size", type=int, default=None, metavar="B",
                         help="examples per pass (default: all of DATA at once)")
    hessian.set_defaults(run=run_hessian)


def run_check(args: argparse.Namespace) -> int:
    from gradkit._check import check_gradients
    from gradkit._cli_grads import data_refusals, load_inputs

    keras, model, x, y, _ = load_inputs(args)
    with data_refusals(x, y):
        report = check_gradients(model, x, y, loss=args.loss, layers=args.layers,
                                 directions=args.directions, seed=args.seed)
    print(f"model: {args.model} (Keras {keras.__version__}, {keras.backend.backend()} backend)")
    print(report)
    return 0 if report.ok else 1


def run_hessian(args: argparse.Namespace) -> int:
    from gradkit._curvature import hessian_eigenvalues, hessian_trace
    from gradkit._cli_grads import data_refusals, load_inputs
    from gradkit._errors import InvalidArgumentError, received

    if args.top < 0 or (args.top == 0 and not args.trace):
        raise InvalidArgumentError(
            "Nothing to compute: pass --top K (K >= 1) for eigenvalues and/or --trace. "
            + received(top=args.top, trace=args.trace))
    keras, model, x, y, sample_weight = load_inputs(args)
    data = (x, y) if sample_weight is None else (x, y, sample_weight)
    options = dict(loss=args.loss, layers=args.layers, batch_size=args.batch_size)
    print(f"model: {args.model} (Keras {keras.__version__}, {keras.backend.backend()} backend)")
    with data_refusals(x, y):
        if args.top:
            eigen = hessian_eigenvalues(model, data, k=args.top, seed=args.seed, **options)
            print(f"top {args.top} eigenvalue(s) ({eigen.hvps} Hessian-vector products):")
            for value, residual in zip(eigen.values, eigen.residuals):
                print(f"  {value: .6e}   residual {residual:.1e}")
        if args.trace:
            trace = hessian_trace(model, data, samples=args.samples, seed=args.seed, **options)
            print(f"trace: {trace.estimate:.6e} ± {trace.standard_error:.1e} (standard error, "
                  f"Hutch++, {args.samples} products)")
    return 0
