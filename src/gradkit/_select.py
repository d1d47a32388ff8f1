"""`layers=` resolution and the naming of result keys.

A layer is matched by its name, by its path inside nested models (``"encoder/dense"``), by a
glob over either (``"block*_conv"``), or by the Layer object itself. Keys of a gradient set
are variable paths (Keras 3 ``variable.path``; tf-keras ``variable.name`` without ``:0``),
made unique with a ``#n`` suffix in the rare case two variables share one.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator
from typing import Any

from gradkit._errors import InvalidArgumentError, UnknownLayerError, received


def walk_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, layer)`` for every layer inside `model`, nested ones included."""
    seen: set[int] = set()

    def visit(parent: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for layer in parent._flatten_layers(include_self=False, recursive=False):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = f"{prefix}{layer.name}"
            yield path, layer
            yield from visit(layer, path + "/")

    yield from visit(model, "")


def model_layers(model: Any) -> list[Any]:
    """The layers of `model`'s own graph in its order, and those of the models nested in it;
    not the sublayers a layer keeps inside (an LSTM's cell, called in its loop; attention's
    projections), no InputLayers, and, where the model was built symbolically and says so,
    no layer whose output is several tensors (an RNN returning its states) and no shared
    layer (called more than once; a shared nested model with its layers)."""
    chosen, seen = [], set()

    def visit(parent: Any) -> None:
        for layer in parent._flatten_layers(include_self=False, recursive=False):
            if id(layer) in seen or type(layer).__name__ == "InputLayer":
                continue
            seen.add(id(layer))
            if len(getattr(layer, "_inbound_nodes", ())) > 1:
                continue
            if not _several_outputs(layer):
                chosen.append(layer)
            if hasattr(layer, "layers") and hasattr(layer, "train_step"):  # a nested model
                visit(layer)

    visit(model)
    return chosen


def inside_recurrent_layers(model: Any, layers_module: Any) -> set[int]:
    """Ids of the layers an RNN layer of `model` holds (its cell and the cell's layers): they
    run inside the framework's loop over time steps (`tf.while_loop`, `lax.scan`)."""
    rnn = getattr(layers_module, "RNN", None)
    if rnn is None:
        return set()
    return {id(inner) for _, layer in walk_layers(model) if isinstance(layer, rnn)
            for _, inner in walk_layers(layer)}


def _several_outputs(layer: Any) -> bool:
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):  # never called symbolically
        return False
    return isinstance(output, (list, tuple, dict))


def variable_key(variable: Any) -> str:
    """The key of one variable: its Keras 3 path, or its tf-keras name without ``:0``."""
    path = getattr(variable, "path", None)
    if isinstance(path, str) and path:
        return path
    name = variable.name
    return name[:-2] if name.endswith(":0") else name


def layer_of(key: str) -> str:
    """The layer part of a variable key: ``"block/dense/kernel"`` -> ``"block/dense"``."""
    head, sep, _ = key.rpartition("/")
    return head if sep else key


def layer_keys(model: Any, layers: list[Any]) -> list[str]:
    """The one key of each layer in every result keyed by layer: the path its own variables
    carry (``layer_of`` of their keys, as per_example_norms(by_layer=True), GradientStats
    and the transforms see them); for a layer without variables of its own, its Keras path,
    else its path of names inside the model."""
    paths = {id(layer): path for path, layer in walk_layers(model)}
    keys = [_own_key(layer) or paths.get(id(layer), layer.name) for layer in layers]
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [paths.get(id(layer), key) if counts[key] > 1 else key
            for key, layer in zip(keys, layers)]


def _own_key(layer: Any) -> str | None:
    for attr in ("_trainable_variables", "_non_trainable_variables",  # Keras 3
                 "_trainable_weights", "_non_trainable_weights"):  # tf-keras
        own = getattr(layer, attr, None)
        if own:
            return layer_of(variable_key(own[0]))
    path = getattr(layer, "path", None)
    return path if isinstance(path, str) and path else None


def unique_keys(variables: Iterable[Any]) -> list[str]:
    """Keys for `variables` in order, a repeated key getting ``#1``, ``#2``, ... appended."""
    keys: list[str] = []
    counts: dict[str, int] = {}
    for variable in variables:
        key = variable_key(variable)
        n = counts.get(key, 0)
        counts[key] = n + 1
        keys.append(key if n == 0 else f"{key}#{n}")
    return keys


def resolve_layers(model: Any, layers: Any) -> list[Any]:
    """The Layer objects named by `layers` (a name, glob, Layer, or a list of them)."""
    specs = list(layers) if isinstance(layers, (list, tuple, set)) else [layers]
    if not specs:
        raise InvalidArgumentError(
            "layers= is empty; pass at least one layer name, glob or Layer, or leave it as "
            "None to select every trainable variable. " + received(layers=layers)
        )
    found = list(walk_layers(model))
    chosen: dict[int, Any] = {}
    for spec in specs:
        for layer in _match(spec, found, model):
            chosen.setdefault(id(layer), layer)
    return list(chosen.values())


def _match(spec: Any, found: list[tuple[str, Any]], model: Any) -> list[Any]:
    if not isinstance(spec, str):
        if any(layer is spec for _, layer in found):
            return [spec]
        if not hasattr(spec, "trainable_variables"):
            raise InvalidArgumentError(
                "layers= takes layer names, nested paths ('outer/inner'), globs ('dense*'), "
                "Layer objects or the model's variables (e.g. model.trainable_weights), or a "
                f"list of them, but it got an object of type {type(spec).__name__}. "
                + received(layers=spec)
            )
        name = getattr(spec, "name", type(spec).__name__)
        raise UnknownLayerError(
            f"The layer object {name!r} is not part of this model, so its variables cannot "
            "receive a gradient from the model's loss. Pass a layer taken from the model "
            f"itself (model.get_layer({name!r})) or its name. " + received(layers=spec)
        )
    exact = [layer for path, layer in found if spec in (path, layer.name)]
    if exact:
        return exact
    globbed = [
        layer
        for path, layer in found
        if fnmatch.fnmatchcase(path, spec) or fnmatch.fnmatchcase(layer.name, spec)
    ]
    if globbed:
        return globbed
    names = sorted({n for path, layer in found for n in (path, layer.name)})
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
    hint = f"Did you mean {', '.join(map(repr, close))}?" if close else (
        f"The model's layers are: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}."
    )
    raise UnknownLayerError(
        f"No layer of model {model.name!r} is named or matches {spec!r}. {hint} "
        "Names, nested paths ('outer/inner') and globs ('dense*') are accepted. "
        + received(layers=spec)
    )


def select_variables(model: Any, layers: Any = None) -> list[Any]:
    """The model's trainable variables (in model order) that belong to `layers` (layers,
    or variables themselves, as ``get_gradients(loss, weights)`` took them), or all."""
    trainable = list(model.trainable_variables)
    if layers is None:
        return trainable
    specs = list(layers) if isinstance(layers, (list, tuple, set)) else [layers]
    variables = [spec for spec in specs if is_variable(spec)]
    wanted = {id(v) for v in variables}
    _check_variables(model, variables, {id(v) for v in trainable})
    rest = [spec for spec in specs if not is_variable(spec)]
    chosen = resolve_layers(model, rest) if rest or not variables else []
    wanted |= {id(v) for layer in chosen for v in layer.trainable_variables}
    selected = [v for v in trainable if id(v) in wanted]
    if not selected:
        names = [layer.name for layer in chosen]
        raise InvalidArgumentError(
            f"The selected layers {names} have no trainable variables (they may be frozen with "
            "trainable=False, or hold no weights, like Dropout or Flatten). Select layers with "
            "weights, or use activation gradients for weightless layers. "
            + received(layers=layers)
        )
    return selected


def is_variable(spec: Any) -> bool:
    """A Keras or TensorFlow variable (not a layer, not a name)."""
    return all(hasattr(spec, a) for a in ("shape", "dtype", "assign", "trainable")) \
        and not hasattr(spec, "trainable_variables")


def _check_variables(model: Any, variables: list, trainable: set[int]) -> None:
    for variable in variables:
        if id(variable) not in trainable:
            frozen = any(v is variable for v in model.variables)
            why = ("is not trainable (a frozen layer's weight, a BatchNorm statistic or a seed "
                   "state)" if frozen else "is not a variable of this model")
            raise UnknownLayerError(
                f"The variable {variable_key(variable)!r} {why}, so it has no gradient. Pass "
                "variables from model.trainable_variables, or layers by name. "
                + received(layers=variable)
            )
