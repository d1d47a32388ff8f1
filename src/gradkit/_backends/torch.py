"""PyTorch primitives for the Keras 3 engine: autograd, `torch.func` inside `torch.func.vmap`.

Eager, as Keras' own torch trainer runs by default: nothing is traced, so batch sizes never
cause recompilation. Every value is detached from the model's parameters, so autograd sees
only what an operation differentiates. Outside a vectorizer, `grad` is plain autograd, whose
None says "not connected"; inside `torch.func.vmap` it is `torch.func.grad`, which cannot
say so (it returns zeros), and the zero perturbations of taps are shaped by one recording
pass per shape. No `functional_call` on Keras layers: it silently zeroes Keras variables.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Callable

import keras
import numpy as np
import torch

from gradkit._backends import _keras3 as k3
from gradkit._backends import torch_modules
from gradkit._backends._cache import BoundedCache
from gradkit._data import leaves, map_structure
from gradkit._factors import Ops


def adapter():
    from gradkit._backends._engine import Engine

    return Engine(TorchPrimitives())


def _cast(x: Any, dtype: Any) -> torch.Tensor:
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)


class TorchPrimitives:
    """The engine's verbs (gradkit._backends._engine.Primitives) in PyTorch."""

    #: Plain torch calls (keras.ops adds a conversion check to each).
    ops = Ops(torch.reshape, _cast,
              lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    hazardous_ops: dict = {}
    #: torch's vmap of a customized convolution's kernel gradients took 0.17-0.55 of the
    #: user's loop (a Conv2D subclass, 16x16x4 to 32x32x32 inputs, batch 16)
    slow_vectorized_convolutions = False

    def __init__(self) -> None:
        self._vectorizing = False
        self._tap_shapes = BoundedCache()

    def compile(self, fn: Callable, model: Any, *, donate: tuple = (), pad: Any = None):
        model_ref = weakref.ref(model)
        fn = k3.seeded(fn, model_ref)
        wrappers = torch_modules.wrappers_of(model)

        def run(data, scale, *extra):
            values = tuple([v.detach() for v in group]
                           for group in k3.variable_values(model_ref()))
            data = k3.seed_data(model_ref(), data)
            seed = data.get("seed")
            data, extra = map_structure(to_tensor, data), map_structure(to_tensor, extra)
            with torch.enable_grad(), kept_rng(), quiet(), torch_modules.read_values(wrappers):
                if seed is not None:  # Keras draws unseeded dropout from the global generator
                    torch.manual_seed(int(seed[-1, 0]))
                return fn(values, data, float(scale), *extra)

        return run

    def grad(self, f: Callable, *, taps: bool = False, shape_key: Any = None) -> Callable:
        return self._functional_grad(f, taps, shape_key) if self._vectorizing \
            else _autograd_grad(f)

    def _functional_grad(self, f, taps: bool, shape_key: Any) -> Callable:
        def g(*args):
            zeros = []
            if taps:
                if shape_key not in self._tap_shapes:
                    seen: list = []
                    with torch.no_grad(), kept_rng():  # draws no dropout mask of the pass
                        f(lambda z: seen.append((z.shape, z.dtype, z.device)) or z, *args)
                    self._tap_shapes[shape_key] = seen
                zeros = [torch.zeros(s, dtype=d, device=v) for s, d, v in self._tap_shapes[shape_key]]

            def h(zeros, *args):
                feed = iter(zeros)
                return f(lambda z: z + next(feed), *args)

            grads, aux = torch.func.grad(h, argnums=tuple(range(len(args) + 1)),
                                         has_aux=True)(zeros, *args)
            return aux, [list(grad) for grad in grads[1:]], list(grads[0])

        return g

    def hvp(self, f: Callable) -> Callable:
        """Double backward: the gradient of ⟨∇f, tangents⟩."""
        def h(primals, tangents):
            primals = [p.detach().requires_grad_(True) for p in primals]
            value, aux = f(None, primals)
            grads = torch.autograd.grad(value, primals, create_graph=True, allow_unused=True) \
                if value.requires_grad else [None] * len(primals)
            inner = sum((g * t.to(g.dtype)).sum() for g, t in zip(grads, tangents)
                        if g is not None and g.requires_grad)
            products = torch.autograd.grad(inner, primals, allow_unused=True) \
                if torch.is_tensor(inner) else [None] * len(primals)
            return aux, [None if g is None else torch.zeros_like(p) if hv is None else hv
                         for g, hv, p in zip(grads, products, primals)]

        return h

    def linearize(self, f: Callable) -> Callable:
        """Double backward: J·tangents = ∇_r ⟨Jᵀ r, tangents⟩ (Jᵀ r is linear in r), on one
        forward graph that also serves the pullback. (Forward-mode dual tensors lack rules
        for some ops, scaled_dot_product_attention among them.)"""
        def lin(primals, tangents):
            primals = [p.detach().requires_grad_(True) for p in primals]
            outputs, aux = f(primals)
            live = [i for i, o in enumerate(outputs) if o.requires_grad]
            probes = [torch.zeros_like(outputs[i], requires_grad=True) for i in live]
            pulled = torch.autograd.grad([outputs[i] for i in live], primals, probes,
                                         create_graph=True, allow_unused=True) \
                if live else [None] * len(primals)
            inner = sum((g * t.to(g.dtype)).sum() for g, t in zip(pulled, tangents)
                        if g is not None and g.requires_grad)
            found = torch.autograd.grad(inner, probes, allow_unused=True) \
                if torch.is_tensor(inner) else [None] * len(live)
            jvps = [torch.zeros_like(o) for o in outputs]
            for i, jvp in zip(live, found):
                if jvp is not None:
                    jvps[i] = jvp

            def pullback(cotangents):
                if not live:
                    return [None] * len(primals)
                return list(torch.autograd.grad(
                    [outputs[i] for i in live], primals,
                    [cotangents[i].to(outputs[i].dtype) for i in live], allow_unused=True))

            return [o.detach() for o in outputs], jvps, aux, pullback

        return lin

    def vectorize(self, fn: Callable) -> Callable:
        vmapped = torch.func.vmap(fn, randomness="same")

        def run(data):
            self._vectorizing = True
            try:
                with _memory_format_kept():
                    return vmapped(data)
            finally:
                self._vectorizing = False

        return run

    def map_examples(self, fn: Callable) -> Callable:
        """`fn` of one example run for each example in a Python loop inside one call (one
        detach of the weights, one RNG guard, one host transfer, instead of one per
        example), the global RNG state reset before each example, as `vectorize`'s
        ``randomness="same"`` gives; the outputs stacked along a new leading axis."""
        def run(data):
            size = len(leaves(data)[0])
            state = torch.get_rng_state()
            outputs = []
            for i in range(size):
                torch.set_rng_state(state)
                outputs.append(fn(map_structure(lambda t: t[i], data)))
            return _stacked(outputs)

        return run

    # array verbs for gradkit._backends._accumulator
    stack, where, all = staticmethod(torch.stack), staticmethod(torch.where), \
        staticmethod(torch.all)
    sum, detached = staticmethod(torch.sum), staticmethod(torch.Tensor.detach)

    def zeros(self, shape: tuple, dtype: Any):
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        return torch.zeros(shape, dtype=dtype, device=keras.ops.zeros(()).device)

    def hazard(self, run) -> None:
        return None

    def all_finite(self, g):
        """On CPU a plain sum (NaN/Inf propagate) decides in one fast pass; isfinite().all(),
        many times slower there, only confirms a non-finite sum (a huge finite g can give
        one). Elsewhere (g * 0).sum(): exact and host-free."""
        if g.device.type != "cpu":
            return torch.isfinite((g * 0).sum())
        return torch.tensor(bool(torch.isfinite(g.sum())) or bool(torch.isfinite(g).all()))

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy()

    def asynchronous(self, tensor) -> bool:
        return tensor.device.type != "cpu"

    def guard(self):
        return kept_rng()

    def distributed_sum(self, adapter, request, batches, strategy):
        """Over the processes of a torch.distributed group (gradkit._backends.torch_distributed)."""
        from gradkit._backends import torch_distributed

        return torch_distributed.distributed_sum(adapter, request, batches, strategy)

    def kernel_rows(self, inputs: Any, deltas: Any, out: np.ndarray) -> None:
        """``out[i] = Σ_t a_it δ_itᵀ`` written by torch's own threads straight into the NumPy
        result: torch's OpenMP threads busy-wait after each operation, so NumPy threads of
        gradkit's would share the cores with them."""
        a, d, target = torch.as_tensor(inputs), torch.as_tensor(deltas), torch.from_numpy(out)
        if a.shape[1] == 1:
            torch.mul(a[:, 0, :, None], d[:, 0, None, :], out=target)
        else:
            torch.matmul(a.transpose(1, 2), d, out=target)


def _autograd_grad(f: Callable) -> Callable:
    def g(*args):
        args = [[a.detach().requires_grad_(True) for a in arg] for arg in args]
        zeros: list = []

        def perturb(z):
            zero = torch.zeros_like(z, requires_grad=True)
            zeros.append(zero)
            return z + zero

        value, aux = f(perturb, *args)
        sources = [a for arg in args for a in arg] + zeros
        grads = torch.autograd.grad(value, sources, allow_unused=True) \
            if value.requires_grad else [None] * len(sources)
        grads = iter(grads)
        arg_grads = [[next(grads) for _ in arg] for arg in args]
        return aux, arg_grads, list(grads)

    return g


def _stacked(outputs: list) -> Any:
    """One structure of the examples' equally structured `outputs`, each leaf stacked."""
    first = outputs[0]
    if isinstance(first, (list, tuple)):
        return type(first)(_stacked([o[k] for o in outputs]) for k in range(len(first)))
    if isinstance(first, dict):
        return {key: _stacked([o[key] for o in outputs]) for key in first}
    return torch.stack([o.detach() for o in outputs])


@contextmanager
def _memory_format_kept():
    """Keras' torch convolution asks whether its operands are laid out channels-last and
    converts them if not, a layout choice for speed; torch's vmap cannot answer that query
    ("NYI: querying is_contiguous inside of vmap"). Inside the vectorizer the operands keep
    their layout: the same values, and convolutions vectorize. (Keras' private helper;
    where a Keras release lacks it, nothing is changed.)"""
    module = sys.modules.get("keras.src.backend.torch.nn")
    original = getattr(module, "_maybe_convert_to_channels_last", None)
    if original is None:
        yield
        return
    module._maybe_convert_to_channels_last = _same_layout
    try:
        yield
    finally:
        module._maybe_convert_to_channels_last = original


def _same_layout(tensor: Any) -> Any:
    return tensor


def kept_rng():
    """Restore torch's global RNG afterwards: Keras draws unseeded dropout masks from it, and
    a gradkit call must not shift the random stream of the user's next `fit` step."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [])


#: torch's notes to its own developers, which a gradkit user can do nothing about: vmap's
#: fallback for an op without a batching rule, and attention kernel choices
_QUIET = (r"There is a performance drop because we have not yet implemented the batching rule",
          r".*(flash|[Ff]lash [Aa]ttention|[Mm]emory.efficient|efficient attention|"
          r"sdpa|scaled_dot_product).*kernel")


@contextmanager
def quiet():
    """Around a compiled call: torch's vmap-fallback and attention-kernel UserWarnings off."""
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def to_tensor(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else keras.ops.convert_to_tensor(value)
