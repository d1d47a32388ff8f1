"""The written contracts: every adapter meets `Adapter`/`Accumulator`, every Keras 3 backend's
primitives meet `Primitives`, and the package's modules import no other module's private
names and form no import cycle."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradkit as gk
from gradkit import _backends
from gradkit._backends import Accumulator, Adapter
from gradkit._request import prepare

PACKAGE = Path(gk.__file__).parent


def _members(protocol) -> set[str]:
    own = set(vars(protocol)) | set(getattr(protocol, "__annotations__", {}))
    return {name for name in own if not name.startswith("_")}


def test_the_flavour_adapter_meets_the_contract(keras, flavour):
    adapter = _backends.for_flavour(flavour)
    assert _backends.for_flavour(flavour) is adapter  # one per flavour
    assert isinstance(adapter, Adapter)
    for name in _members(Adapter):
        assert hasattr(adapter, name), name
        expected = getattr(Adapter, name, None)
        if callable(expected):
            got = inspect.signature(getattr(adapter, name)).parameters
            want = [p for p in inspect.signature(expected).parameters if p != "self"]
            assert list(got)[:len(want)] == want, name
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss="mse")
    request = prepare(model, y=np.zeros((1, 2), "float32"), data=False)
    accumulator = adapter.accumulator(request, False)
    assert isinstance(accumulator, Accumulator)
    assert {"connected", "flag_lag"} <= set(dir(accumulator))


@pytest.mark.flavours("tensorflow", "jax", "torch")
def test_keras3_primitives_meet_the_contract(flavour):
    from gradkit._backends._engine import Primitives

    primitives = _backends.for_flavour(flavour).p
    for name in _members(Primitives):
        assert hasattr(primitives, name), name


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every `from gradkit... import name` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradkit"):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_another_modules_private_names():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        for module, name in _imports(path):
            target = PACKAGE.parent.joinpath(*module.split("."))
            is_module = (target / f"{name}.py").exists() or (target / name).is_dir()
            if name.startswith("_") and not name.startswith("__") and not is_module:
                offences.append(f"{_module_name(path)} imports {module}.{name}")
    assert offences == []


def test_no_import_cycles_at_module_level():
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        edges = set()
        for node in tree.body:  # module level only: imports inside functions are deferred
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradkit"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    known = PACKAGE.parent.joinpath(*child.split(".")).with_suffix(".py")
                    edges.add(child if known.exists() else node.module)
        graph[_module_name(path)] = edges
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [module]))
        if state.get(module) == 2 or module not in graph:
            return
        state[module] = 1
        for child in graph[module]:
            if child != module and not module.startswith(child + "."):  # a package's own init
                visit(child, trail + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])


@pytest.mark.flavours("tf_keras")
def test_tf_keras_never_imports_keras3():
    """The tf-keras adapter loads none of the Keras 3 modules (tf_keras itself loads the
    `keras` package, so what counts is gradkit's own modules)."""
    code = (
        "import sys, numpy as np, tf_keras, gradkit as gk\n"
        "m = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])\n"
        "m.compile(loss='mse')\n"
        "x = np.ones((4, 3), 'float32'); y = np.ones((4, 2), 'float32')\n"
        "g = gk.gradients(m, x, y)\n"
        "gk.hvp(m, x, y, vector=g); gk.per_example_norms(m, x, y)\n"
        "gk.accumulate(m, (x, y), batch_size=2, progress=False)\n"
        "print(sorted(k for k in sys.modules if k.startswith('gradkit._backends.')))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = eval(done.stdout.strip().splitlines()[-1])  # tf_keras itself imports `keras`
    keras3 = {"gradkit._backends._engine", "gradkit._backends._keras3",
              "gradkit._backends._buckets", "gradkit._backends.jax", "gradkit._backends.torch"}
    assert "gradkit._backends.tf_keras" in loaded and not keras3 & set(loaded)
