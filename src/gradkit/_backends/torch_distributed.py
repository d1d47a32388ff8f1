"""torch.distributed: dataset-wide sums over processes, each passing its own share of data.

``strategy="torch.distributed"`` (the default group) or a ``torch.distributed`` process
group makes a dataset-wide call COLLECTIVE: every process of the group must make the same
call (same model weights, same options, same vector and seed) on its own share of the data,
and every process gets the result over the union of the shares. Two all-reduces frame a pass:

- `ProcessGroup.agree` runs the local preparation (data opened and checked, request built)
  on every process, then one MAX all-reduce of ``[failed flag per rank, signature,
  -signature]``: a failure on any process raises on every process (instead of leaving the
  others waiting in a collective), and unequal signatures (selected weight count, variable
  shapes and dtypes, a weight checksum, the vector, the seed) raise before any work.
- `ProcessGroup.total` runs the local pass, then one SUM all-reduce, in float64, of
  ``[failed flag per rank, example count, the flattened partial sums Σ_b w_b g_b]``, so the
  sums and the count are those of the union, the same on every process.

Only torch.distributed's own ``all_reduce`` moves data: CPU tensors on a gloo group, the
current CUDA device on an nccl one.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from gradkit._errors import InvalidArgumentError, ProcessGroupError, received
from gradkit._request import result_dtype

#: The compared signature, in this order (one float64 each, 0 where a call has none).
SIGNATURE = ("selected weights", "variable shapes and dtypes", "weights", "vector", "seed")
STRATEGY = "torch.distributed"


def distributed_sum(engine, request, batches, strategy):
    """(Σ over every process's batches of w_b ∇L_b, N): `Engine.distributed_sum` on torch."""
    group = ProcessGroup(strategy)
    weighted = request.objective.kind != "target"

    def local():
        acc = engine.accumulator(request, False)
        count = 0
        with acc.running():
            for batch in batches:
                acc.add(batch, float(batch.size) if weighted else 1.0)
                count += batch.size
        if count == 0:
            raise _no_examples(group)
        return acc.total(), count

    return group.total(local, request.variables)


class ProcessGroup:
    """The processes of a torch.distributed group, for one collective gradkit call."""

    def __init__(self, strategy: Any) -> None:
        self.group = resolve_group(strategy)
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        nccl = dist.get_backend(self.group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl \
            else torch.device("cpu")
        self.shared_seed = 0  # a random seed drawn by agree(), the same on every process

    def agree(self, prepare: Callable[[], Any], describe: Callable[[Any], dict]) -> Any:
        """``prepare()`` on every process; raise on all if any failed or their
        ``describe(prepared)`` (a dict over `SIGNATURE` names) differ; else the prepared."""
        prepared, error, signature = None, None, np.zeros(len(SIGNATURE))
        try:
            prepared = prepare()
            described = describe(prepared)
            signature = np.array([float(described.get(name, 0.0)) for name in SIGNATURE])
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the collective
            error = exc
        seed = float(np.random.default_rng().integers(2**31))
        reduced = self._reduce(np.concatenate([self._flags(error), [seed], signature,
                                               -signature]), dist.ReduceOp.MAX)
        self._raise_failures(error, reduced[:self.size], "preparing the call")
        self.shared_seed = int(reduced[self.size])
        high, low = np.split(reduced[self.size + 1:], 2)
        differ = [name for name, h, lo in zip(SIGNATURE, high, -low) if h != lo]
        if differ:
            raise InvalidArgumentError(
                f"The processes of the torch.distributed group disagree on: "
                f"{', '.join(differ)}. A collective gradkit call needs the same model, "
                "weights, layers=, options, vector= and seed= on every process (only the "
                "data differ): build the model after the same keras.utils.set_random_seed "
                "or load the same checkpoint on each. "
                + received(rank=self.rank, processes=self.size, differ=differ))
        return prepared

    def total(self, run: Callable[[], tuple], variables: list) -> tuple:
        """``run()`` -> (partial sums, one per variable or None, count, *rest) on every
        process; returns them with the sums (float64) and count added over the group."""
        shapes = [tuple(v.shape) for v in variables]
        sizes = [int(np.prod(s)) for s in shapes]
        result, error = None, None
        try:
            result = run()
            parts = [np.zeros(n) if s is None else np.ravel(np.asarray(s, np.float64))
                     for s, n in zip(result[0], sizes)]
            count = float(result[1])
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the collective
            error, parts, count = exc, [np.zeros(n) for n in sizes], 0.0
        reduced = self._reduce(np.concatenate([self._flags(error), [count], *parts]),
                               dist.ReduceOp.SUM)
        self._raise_failures(error, reduced[:self.size], "its pass over the data")
        flat = np.split(reduced[self.size + 1:], np.cumsum(sizes)[:-1])
        sums = [None if s is None else f.reshape(shape)
                for s, f, shape in zip(result[0], flat, shapes)]
        return (sums, int(round(reduced[self.size])), *result[2:])

    def signature(self, variables: list, **extra: float) -> dict:
        """`SIGNATURE` entries of the selected variables, plus `extra` ones: ``vector`` (a
        list of arrays, compared by `checksum`) and ``seed``."""
        if extra.get("vector") is not None:
            extra["vector"] = checksum(extra["vector"])
        return {**signature(variables), **{k: v for k, v in extra.items() if v is not None}}

    def _flags(self, error: Any) -> np.ndarray:
        flags = np.zeros(self.size)
        flags[self.rank] = float(error is not None)
        return flags

    def _reduce(self, values: np.ndarray, op: Any) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(values, np.float64)).to(self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.cpu().numpy()

    def _raise_failures(self, error: Any, flags: np.ndarray, stage: str) -> None:
        if error is not None:
            raise error
        failed = [int(r) for r in np.flatnonzero(flags)]
        if failed:
            raise ProcessGroupError(
                f"Process(es) {failed} of the torch.distributed group raised an error while "
                f"{stage} (their own traceback says which); this process stops too rather "
                "than wait for them in a collective. Fix that error and run again. "
                + received(rank=self.rank, failed=failed))


def resolve_group(strategy: Any) -> Any:
    """The process group `strategy` names, checked to be usable."""
    named = isinstance(strategy, str) and strategy == STRATEGY
    if isinstance(strategy, int) and strategy == dist.GroupMember.NON_GROUP_MEMBER:
        raise InvalidArgumentError(
            "strategy= is what torch.distributed.new_group returns to a process outside the "
            "group; only the group's members may make the collective call. Call it on the "
            "members only, or pass 'torch.distributed' (every process). "
            + received(strategy=strategy))
    if not named and not isinstance(strategy, dist.ProcessGroup):
        raise InvalidArgumentError(
            "On torch, strategy= takes 'torch.distributed' (the default process group, every "
            "process) or a torch.distributed process group (torch.distributed.new_group(...)). "
            + received(strategy=strategy))
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            f"strategy={strategy!r} needs an initialized torch.distributed: call "
            "torch.distributed.init_process_group('gloo', ...) (or run under torchrun) in "
            "every process first. " + received(strategy=strategy, initialized=False))
    return dist.group.WORLD if named else strategy


def signature(variables: list) -> dict:
    """The parts of `SIGNATURE` a model's selected variables give (weights: their bytes'
    CRC-32, so equal means bit-equal, whatever the machine)."""
    layout = ";".join(f"{tuple(v.shape)}:{result_dtype(v).name}" for v in variables)
    return {"selected weights": sum(int(np.prod(v.shape)) for v in variables),
            "variable shapes and dtypes": zlib.crc32(layout.encode()),
            "weights": checksum([_bytes(v.value) for v in variables])}


def checksum(arrays: list) -> int:
    """CRC-32 of the arrays' bytes, in order (differs, almost surely, when they differ)."""
    crc = 0
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).ravel(), crc)
    return crc


def _bytes(tensor: Any) -> np.ndarray:
    """A tensor's bytes on the host (any dtype, bfloat16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _no_examples(group: ProcessGroup) -> InvalidArgumentError:
    return InvalidArgumentError(
        "This process's share of the data has no examples. Every process of the "
        "torch.distributed group must pass a non-empty share (the call is collective). "
        + received(rank=group.rank, processes=group.size))
