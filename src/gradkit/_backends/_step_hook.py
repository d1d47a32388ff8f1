"""A hook inside the optimizer step that `fit` compiles: see or change the applied gradients.

    hook = install(optimizer, fn, stage="before_clip")    # fn(grads, variables, step)
    ...model.fit(...)...                                     # fn runs inside every update
    hook.remove()                                            # the optimizer is as it was

`fn(grads, variables, step)` receives framework tensors, inside the compiled train step
(`tf.function`, `jax.jit` through ``stateless_apply``, torch eager), once per applied update:

- ``grads``: at true scale (a LossScaleOptimizer's scale and ``loss_scale_factor`` already
  divided out: the hook sits on the inner optimizer), global (under a TF distribution strategy
  summed over the replicas first), and under ``gradient_accumulation_steps`` the averaged
  accumulated gradient of the update step only (on the other steps ``fn`` is not called on TF
  and torch, and on JAX, which runs every branch, ``is_update`` is false: see `Step`).
- ``stage="before_clip"``: before the optimizer's ``clipnorm``/``global_clipnorm``/
  ``clipvalue``; ``"after_clip"``: what the update rule receives.
- It returns new gradients (a list like ``grads``; they are then clipped, for "before_clip")
  or None to leave them untouched bit for bit. Keras 3 clips each replica's share before its
  all-reduce: there the hook gets the replicas' sum, and under a TF strategy returned
  gradients are divided by the replica count, so that Keras' own all-reduce sums them back to
  exactly them (clipping then acts on each replica's share). tf-keras all-reduces first
  (``aggregate_gradients``) and clips the sum: there gradients pass as they are.
- ``step``: a `Step` of tensors: ``index`` (the update's number, optimizer.iterations),
  ``micro`` (the raw batch counter) and ``is_update``.
- ``stage="before_apply"`` / ``"after_apply"``: observers around the whole apply (weight decay,
  update rule, accumulation), outside any cond Keras adds; the variables hold the values
  before / after the update. ``grads`` is what apply received; the return value is ignored.

Variables ``fn`` writes must be made with `gradkit._backends._step_state.add_state` (on JAX
they travel with the optimizer state the trainer carries through the step) and read with its
`read_state`. Call its `refresh(model)` after installing or removing so that a compiled train
function is traced again.
Nothing is imported from a framework until a hook is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

STAGES = ("before_clip", "after_clip", "before_apply", "after_apply")
_ATTR = "_gradkit_step_hooks"


class Step(NamedTuple):
    """The update being taken, as tensors: see the module docstring."""

    index: Any
    micro: Any
    is_update: Any


class Hook:
    """One installed function; `remove()` takes it out (the last removal restores methods)."""

    def __init__(self, optimizer: Any, fn: Callable, stage: str) -> None:
        self.optimizer, self.fn, self.stage = optimizer, fn, stage

    def remove(self) -> None:
        hooks = vars(self.optimizer).get(_ATTR)
        if hooks is None or self not in hooks:
            return
        hooks.remove(self)
        if not hooks:
            for name in ("_clip_gradients", "_backend_apply_gradients", "apply_gradients",
                         "_transform_gradients", _ATTR):
                vars(self.optimizer).pop(name, None)


def target(optimizer: Any) -> Any:
    """The optimizer that receives true-scale gradients (a LossScaleOptimizer's inner one)."""
    if "LossScaleOptimizer" not in type(optimizer).__name__:
        return optimizer
    return getattr(optimizer, "inner_optimizer", None) or optimizer._optimizer


def kind(optimizer: Any) -> str:
    """"keras3", "tf_keras" (the optimizer.Optimizer) or "tf_keras_legacy" (optimizer_v2)."""
    modules = [c.__module__ for c in type(optimizer).__mro__]
    if any(m.startswith("keras.src") for m in modules):
        return "keras3"
    return "tf_keras_legacy" if any("optimizer_v2" in m for m in modules) else "tf_keras"


def install(optimizer: Any, fn: Callable, *, stage: str = "before_clip",
            first: bool = False) -> Hook:
    """Run `fn` inside each update `optimizer` applies; return the `Hook`. Hooks of one stage
    run in the order installed, each on what the one before returned; `first`: before the
    others (an observer that must see the gradients before any hook changes them)."""
    if stage not in STAGES:
        from gradkit._errors import InvalidArgumentError, received

        raise InvalidArgumentError(f"stage= must be one of {STAGES}: where in the step the "
                                   "hook runs. " + received(stage=stage))
    opt = target(optimizer)
    hooks = vars(opt).get(_ATTR)
    if hooks is None:
        hooks = vars(opt)[_ATTR] = []
        _patch(opt, kind(opt), hooks)
    hook = Hook(opt, fn, stage)
    hooks.insert(0 if first else len(hooks), hook)
    return hook


def _patch(opt: Any, flavour: str, hooks: list) -> None:
    seen: dict = {}
    outer_name = "_backend_apply_gradients" if flavour == "keras3" else "apply_gradients"
    outer = getattr(opt, outer_name)

    if flavour == "keras3":
        def outer_wrapper(grads, trainable_variables):  # remembers the grads' variables
            seen["variables"] = variables = list(trainable_variables)
            _observe(hooks, "before_apply", grads, variables, opt)
            out = outer(grads, trainable_variables)
            _observe(hooks, "after_apply", grads, variables, opt)
            return out
    else:  # tf-keras: apply_gradients takes an iterator of pairs; list it once
        def outer_wrapper(grads_and_vars, *args, **kwargs):
            grads_and_vars = list(grads_and_vars)
            seen["variables"] = variables = [v for g, v in grads_and_vars if g is not None]
            grads = [g for g, _ in grads_and_vars if g is not None]
            _observe(hooks, "before_apply", grads, variables, opt)
            out = outer(grads_and_vars, *args, **kwargs)
            _observe(hooks, "after_apply", grads, variables, opt)
            return out

    vars(opt)[outer_name] = outer_wrapper
    if flavour == "tf_keras_legacy":
        original = opt._transform_gradients

        def transform(grads_and_vars):
            grads_and_vars = list(grads_and_vars)
            variables = [v for _, v in grads_and_vars]
            grads = _run(hooks, "before_clip", [g for g, _ in grads_and_vars], variables, opt)
            out = original(list(zip(grads, variables)))
            grads = _run(hooks, "after_clip", [g for g, _ in out], variables, opt)
            return list(zip(grads, variables))

        vars(opt)["_transform_gradients"] = transform
        return
    clip = opt._clip_gradients

    def clip_wrapper(grads):
        variables = seen["variables"]
        grads = _run(hooks, "before_clip", list(grads), variables, opt)
        grads = clip(grads)
        return _run(hooks, "after_clip", list(grads), variables, opt)

    vars(opt)["_clip_gradients"] = clip_wrapper


def count_batches(optimizer: Any, counter: Any) -> Callable[[], None]:
    """Make a Keras 3 LossScaleOptimizer add 1 to `counter` (an int32 variable from
    `_step_state.add_state`) for every batch it is given, applied or skipped, before the rest of its step,
    so that hooks read the batch's own number (the inner optimizer counts only the updates it
    applies); return the function that undoes it."""
    import keras

    if keras.backend.backend() == "jax":  # the trainer passes the state in and takes it back out
        original = optimizer.stateless_apply

        def stateless_apply(optimizer_variables, grads, trainable_variables):
            at = [id(v) for v in optimizer.variables].index(id(counter))
            values = list(optimizer_variables)
            values[at] = values[at] + 1
            return original(values, grads, trainable_variables)

        vars(optimizer)["stateless_apply"] = stateless_apply
        return lambda: vars(optimizer).pop("stateless_apply", None)
    original = optimizer.apply

    def apply(grads, trainable_variables=None):
        counter.assign_add(1)
        return original(grads, trainable_variables)

    vars(optimizer)["apply"] = apply
    return lambda: vars(optimizer).pop("apply", None)


def _observe(hooks: list, stage: str, grads: list, variables: list, opt: Any) -> None:
    chosen = [h for h in hooks if h.stage == stage]
    if chosen:
        step = _step(opt)
        for hook in chosen:
            hook.fn(list(grads), variables, step)


def _run(hooks: list, stage: str, grads: list, variables: list, opt: Any) -> list:
    chosen = [h for h in hooks if h.stage == stage]
    if not chosen:
        return grads
    step = _step(opt)
    summed_later = kind(opt) == "keras3"  # tf-keras: summed over the replicas already
    for hook in chosen:
        reduced, replicas = replica_sum(grads) if summed_later else (grads, 1)
        new = hook.fn(reduced, variables, step)
        if new is not None:
            grads = list(new) if replicas == 1 else [g / replicas for g in new]
    return grads


def _step(opt: Any) -> Step:
    if kind(opt) != "keras3":
        it = opt.iterations
        return Step(it, it, True)
    from keras import ops

    micro = opt._iterations
    n = opt.gradient_accumulation_steps
    if not n:
        return Step(micro, micro, True)
    return Step(ops.floor_divide(micro, n), micro, ops.equal(ops.mod(micro + 1, n), 0))


def replica_sum(grads: list) -> tuple[list, int]:
    """(grads summed over a TF strategy's replicas, replica count); as they are elsewhere."""
    import sys

    tf = sys.modules.get("tensorflow")
    if tf is None or not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return grads, 1
    ctx = tf.distribute.get_replica_context()
    n = ctx.num_replicas_in_sync
    if n == 1:
        return grads, 1
    return list(ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)), n
