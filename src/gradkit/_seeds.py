"""Dropout seeds for ``training=True``: ``seed=`` an int (reproducible masks) or None (fresh).

With ``training=True`` every call carries one int seed, as an INPUT of the compiled function
(``data["seed"]``), never a constant in it: a new seed does not compile again. Each backend's
compile turns it on the host into `rows` (one ``[a, b]`` row per random-number source of the
model, plus one for a framework's global generator) and, inside the compiled function, feeds
them where the model's random ops read their state (Keras 3: the SeedGenerator state values
given to ``stateless_call``; tf-keras: its RandomGenerators, stateless for the call; torch: the
global generator Keras' unseeded dropout uses, inside a saved-and-restored RNG). The model's
own seed state is never read or changed, so ``seed=None`` draws a fresh seed from gradkit's
own generator: new masks on each call, as ``fit`` would give. Within one call, every chunk of
per-example work uses the call's seed; each batch of an accumulation gets its own (`fold`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradkit._errors import InvalidArgumentError, received

_FRESH = np.random.default_rng()  # gradkit's own: NumPy's global stream is the user's
_TOP = 2**31 - 1  # seeds and rows stay valid int32, int64 and uint32 values


def check_seed(seed: Any, draws: str, name: str = "seed=") -> None:
    """Raise unless `seed` is None or a non-negative int: what every ``seed=`` takes
    (NumPy's ``default_rng`` would raise its own errors on floats, negatives and strings, and
    silently take a list or True)."""
    if seed is not None and (isinstance(seed, (bool, np.bool_))
                             or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InvalidArgumentError(
            f"{name} must be a non-negative int (reproducible {draws}) or None (fresh "
            f"{draws} on each call). " + received(seed=seed)
        )


def resolve_seed(seed: Any, training: bool) -> int | None:
    """The int seed of one call (``None`` when ``training=False``); raises on a bad `seed`."""
    check_seed(seed, "dropout masks")
    if not training:
        if seed is not None:
            raise InvalidArgumentError(
                "seed= sets the dropout masks of training=True; with training=False nothing "
                "is random. Pass training=True with it, or drop seed=. "
                + received(seed=seed, training=training)
            )
        return None
    return int(_FRESH.integers(_TOP)) if seed is None else int(seed) % _TOP


def fold(seed: int | None, step: int) -> int | None:
    """A seed of its own for step `step` of one call (e.g. each accumulated batch)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0]) % _TOP


def seed_rows(seed: Any, count: int) -> np.ndarray:
    """`count` independent int32 ``[a, b]`` rows drawn from `seed` (host side)."""
    rng = np.random.default_rng(int(np.asarray(seed).reshape(-1)[0]))
    return rng.integers(1, _TOP, size=(count, 2), dtype=np.int64).astype(np.int32)


def split_seed(data: dict) -> tuple[dict, Any]:
    """(`data` without its "seed" entry, that entry or None)."""
    if "seed" not in data:
        return data, None
    data = dict(data)
    return data, data.pop("seed")


def with_rows(data: dict, count: int) -> dict:
    """`data` with its int "seed" replaced by `count` rows, if it has one (host side)."""
    if "seed" not in data:
        return data
    return dict(data, seed=seed_rows(data["seed"], count))
