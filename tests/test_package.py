"""The package surface: importable without a framework, __all__ complete and sorted."""

import subprocess
import sys

import gradkit


def test_all_is_sorted_and_complete():
    assert gradkit.__all__ == sorted(gradkit.__all__)
    public = {n for n in dir(gradkit) if not n.startswith("_")} - {"annotations"}
    assert public == set(gradkit.__all__)


def test_import_loads_no_framework():
    code = (
        "import sys, gradkit; "
        "print(sorted(m for m in ('tensorflow','jax','torch','keras','tf_keras') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
