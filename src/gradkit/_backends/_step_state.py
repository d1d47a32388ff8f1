"""State a step hook (`gradkit._backends._step_hook`) writes inside the compiled train step,
and the train function it is traced into.

- `add_state` makes a zero-filled variable a hook may assign in the step; on JAX it joins the
  optimizer's variables, which the trainer carries through the step, so `read_state` reads
  it from that carried state in the middle of a `fit`; `remove_state` forgets it. Saving
  the optimizer meanwhile (a ModelCheckpoint) stores its own variables only, as a plain fit
  would: with gradkit's too, loading the checkpoint would skip the optimizer's state.
- `refresh` and `fresh_train_function` make `fit` trace its train function again (once
  hooks are installed or removed, or one function per kind of step); `steps_per_call` is
  how many steps one call of it takes.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gradkit._backends._step_hook import kind, target


def add_state(model: Any, optimizer: Any, shape: tuple, name: str, dtype: str = "float32") -> Any:
    """A zero-filled variable a hook may assign inside the step (carried by the JAX trainer)."""
    opt = target(optimizer)
    flavour = kind(opt)
    if flavour == "keras3":
        import keras

        if keras.backend.backend() == "jax":
            variable = opt.add_variable(shape, dtype=dtype, name=name)
            _unsaved(opt).add(id(variable))
            return variable
        with strategy_scope(model):
            return keras.Variable(keras.ops.zeros(shape, dtype), trainable=False, name=name,
                                  aggregation="only_first_replica")
    import tensorflow as tf

    with strategy_scope(model):
        return tf.Variable(tf.zeros(shape, dtype), trainable=False, name=name,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def remove_state(optimizer: Any, variables: list) -> None:
    """Forget `variables` made by `add_state` (JAX: drop them from the optimizer's state)."""
    opt = target(optimizer)
    ids = {id(v) for v in variables}
    tracked = getattr(opt, "_variables", None)
    if kind(opt) == "keras3" and tracked is not None:
        for i in reversed([i for i, v in enumerate(tracked) if id(v) in ids]):
            del tracked[i]
    unsaved = vars(opt).get(_UNSAVED)
    if unsaved is not None:
        unsaved -= ids
        if not unsaved:
            for name in (_UNSAVED, *_SAVING):
                vars(opt).pop(name, None)


_UNSAVED = "_gradkit_unsaved"
_SAVING = ("save_own_variables", "load_own_variables")


def _unsaved(opt: Any) -> set:
    """The ids of `opt`'s variables its saving and loading leave out (a checkpoint written or
    read during fit: ModelCheckpoint, BackupAndRestore); Keras' own methods run on the
    optimizer's variables without them."""
    if _UNSAVED not in vars(opt):
        vars(opt)[_UNSAVED] = set()
        for name in _SAVING:
            vars(opt)[name] = lambda store, name=name: _without_ours(opt, name, store)
    return vars(opt)[_UNSAVED]


def _without_ours(opt: Any, method: str, store: Any) -> Any:
    tracked, ours = opt._variables, vars(opt)[_UNSAVED]
    kept = [(i, v) for i, v in enumerate(tracked) if id(v) in ours]
    for i, _ in reversed(kept):
        del tracked[i]
    try:
        return getattr(type(opt), method)(opt, store)
    finally:
        for i, variable in kept:
            tracked.insert(i, variable)


def read_state(model: Any, variables: list) -> list:
    """NumPy copies of `variables` (state, optimizer or trainable variables), also in the
    middle of a JAX `fit`, where the current values live in the state the trainer carries."""
    import numpy as np

    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        found = {}
        for group, owner in (("optimizer_variables", model.optimizer.variables),
                             ("trainable_variables", model.trainable_variables)):
            values = state.get(group) or []
            found.update({id(v): x for v, x in zip(owner, values)})
        return [np.array(found[id(v)]) for v in variables]
    if kind(target(model.optimizer)) == "keras3":
        import keras

        if keras.backend.backend() == "tensorflow":
            return [v.value.numpy() for v in variables]
        return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]
    return [np.array(v.numpy()) for v in variables]


def refresh(model: Any) -> None:
    """Make `fit` trace its train function again (it then sees installed or removed hooks)."""
    model.train_function = None
    model.make_train_function(force=True)
    _no_retrace_warning(model.train_function)


def _no_retrace_warning(function: Any) -> None:
    """TensorFlow warns when the code of one function is traced in 5 of 10 calls, counting
    every `tf.function` of Keras' train step together: the train functions made here for a
    short `fit` (one or two each) would set it off, though nothing of the user's retraces."""
    # (Keras 3 wraps its tf.function in a Python function: look in that one's closure too)
    cells = getattr(function, "__closure__", None) or ()
    for candidate in [function, *(c.cell_contents for c in cells if _filled(c))]:
        if hasattr(candidate, "_omit_frequent_tracing_warning"):
            candidate._omit_frequent_tracing_warning = True


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def fresh_train_function(model: Any) -> Any:
    """A new train function of a Keras 3 `model`, traced on its first call apart from any
    other (so a hook may trace differently into each); `model.train_function` is left set to
    it."""
    model.train_function = None
    if _backend() != "jax":
        model.make_train_function(force=True)  # a new tf.function: its own traces
        _no_retrace_warning(model.train_function)
        return model.train_function
    cls_step = type(model).train_step  # JAX shares traces between jits of equal functions

    def train_step(*args: Any, **kwargs: Any) -> Any:
        return cls_step(model, *args, **kwargs)

    model.train_step = train_step
    try:
        model.make_train_function(force=True)
    finally:
        del model.train_step
    return model.train_function


def _backend() -> str:
    import keras

    return keras.backend.backend()


def steps_per_call(model: Any) -> int:
    """How many steps one call of `model.train_function` takes (steps_per_execution)."""
    value = getattr(model, "steps_per_execution", None)
    if value is None:
        value = getattr(model, "_steps_per_execution", None)
    if value is None:
        return 1
    return int(value.numpy() if hasattr(value, "numpy") else value)


def strategy_scope(model: Any) -> Any:
    """The scope of the TF distribution strategy `model` was built in (else a no-op): its
    variables are created and its optimizer applied there."""
    strategy = getattr(model, "distribute_strategy", None) or getattr(
        model, "_distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()
