"""`gradkit check` and `gradkit hessian` through `gradkit._cli.main` in this process (the
same code path after argument parsing; tests/test_cli.py runs the command's start-up in a
subprocess), compared with the library functions on the original (never saved) model.
Keras 3 only."""

from __future__ import annotations

import re

import numpy as np
import pytest

import gradkit
from gradkit._check import GradientCheck, VariableCheck
from gradkit._cli import main
from test_cli import mlp, run_in_process  # noqa: F401  (the fixture and the runner)

pytestmark = pytest.mark.flavours("tensorflow", "jax", "torch")


@pytest.mark.filterwarnings("ignore:check_gradients:RuntimeWarning")
def test_check_end_to_end_exits_0_when_gradients_are_right(mlp, tmp_path,  # noqa: F811
                                                           monkeypatch, capsys):
    code, out, err = run_in_process("check", "model.keras", "data.npz", "--directions", "2",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith(("hidden/", "out/"))]
    assert [r[0] for r in rows] == ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
    assert all(r[-1] == "ok" for r in rows)
    assert re.search(r"^OK: 4 ok", out, re.M)


def test_check_exits_1_on_a_mismatch_and_one_line_errors(mlp, tmp_path, monkeypatch,  # noqa: F811
                                                         capsys):
    import gradkit._check as check

    bad = VariableCheck(np.ones(1), np.ones(1), np.ones(1), 2.0, "mismatch")
    monkeypatch.setattr(check, "check_gradients", lambda *a, **k: GradientCheck(
        {"out/kernel": bad}, "float64", (1e-3, 1e-4), 1e-5))
    assert main(["check", str(tmp_path / "model.keras"), str(tmp_path / "data.npz")]) == 1
    assert "MISMATCH: 0 ok, 0 not smooth, 1 mismatch" in capsys.readouterr().out
    monkeypatch.undo()
    code = main(["check", str(tmp_path / "model.keras"), str(tmp_path / "missing.npz")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "No data file" in err
    code = main(["check", str(tmp_path / "model.keras"), str(tmp_path / "data.npz"),
                 "--directions", "0"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "directions=" in err
    with pytest.raises(SystemExit) as exit_:
        main(["check", "model.keras", "data.npz", "--directions", "many"])
    assert exit_.value.code == 2


def test_hessian_prints_the_library_eigenvalues_and_trace(mlp, tmp_path, capsys):  # noqa: F811
    model, x, y = mlp
    code = main(["hessian", str(tmp_path / "model.keras"), str(tmp_path / "data.npz"),
                 "--top", "2", "--trace", "--samples", "12", "--batch-size", "4",
                 "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    printed = [float(v) for v in re.findall(r"^\s+(-?\d\.\d+e[+-]\d+)\s+residual", out, re.M)]
    eigen = gradkit.hessian_eigenvalues(model, (x, y), k=2, seed=3, batch_size=4)
    np.testing.assert_allclose(printed, eigen.values, rtol=1e-4)
    trace = gradkit.hessian_trace(model, (x, y), samples=12, seed=3, batch_size=4)
    estimate, error = re.search(r"trace: (\S+) ± (\S+)", out).groups()
    np.testing.assert_allclose(float(estimate), trace.estimate, rtol=1e-4)
    np.testing.assert_allclose(float(error), trace.standard_error, rtol=0.1)
    assert main(["hessian", str(tmp_path / "model.keras"), str(tmp_path / "data.npz"),
                 "--top", "0"]) == 1
    assert "Nothing to compute" in capsys.readouterr().err
