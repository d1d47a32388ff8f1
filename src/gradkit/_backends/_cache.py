"""The one cache of compiled functions: per model (weakly keyed), bounded by recency of use.

`cached(model, key, build)` returns the entry for `key`, building it on first use. A key holds
its objective (a loss callable is keyed by identity), so a caller passing a new lambda on every
call would otherwise grow a model's cache, and the traces it keeps, without limit: beyond
MAX_ENTRIES_PER_MODEL the least recently used entry is dropped, and rebuilt on its next use.
Entries die with their model.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable

#: Entries kept per model; beyond it the least recently used one is dropped.
MAX_ENTRIES_PER_MODEL = 64

_STORE: "weakref.WeakKeyDictionary[Any, BoundedCache]" = weakref.WeakKeyDictionary()


class BoundedCache:
    """A least-recently-used mapping: ``key in c``, ``c[key]`` (marks it used), ``c[key] = v``
    (drops the oldest entries beyond MAX_ENTRIES_PER_MODEL), ``len(c)``, ``c.values()``."""

    __slots__ = ("_entries", "__weakref__")

    def __init__(self) -> None:
        self._entries: OrderedDict = OrderedDict()

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, key: Any) -> Any:
        self._entries.move_to_end(key)
        return self._entries[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > max(1, MAX_ENTRIES_PER_MODEL):
            self._entries.popitem(last=False)

    def values(self):
        return self._entries.values()


def for_model(model: Any) -> BoundedCache:
    """The cache of `model`, created on first use."""
    cache = _STORE.get(model)
    if cache is None:
        cache = _STORE[model] = BoundedCache()
    return cache


def cached(model: Any, key: Any, build: Callable[[], Any]) -> Any:
    """The entry of `model` under `key`, made by ``build()`` if absent (or evicted)."""
    cache = for_model(model)
    if key not in cache:
        cache[key] = build()
    return cache[key]
