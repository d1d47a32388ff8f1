"""Per-model caches of compiled functions, bounded by recency of use.

A cache key holds its objective (a loss callable is keyed by identity), so a caller passing a
new lambda on every call would otherwise grow a model's cache, and the traces it keeps, without
limit. `per_model(store, model)` gives the model's `BoundedCache` from `store`, a
`weakref.WeakKeyDictionary` (entries die with the model); an evicted entry is rebuilt on its
next use.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

#: Entries kept per model and cache; beyond it the least recently used one is dropped.
MAX_ENTRIES_PER_MODEL = 64


class BoundedCache:
    """A least-recently-used mapping: ``key in c``, ``c[key]`` (marks it used), ``c[key] = v``
    (drops the oldest entries beyond MAX_ENTRIES_PER_MODEL), ``len(c)``, ``c.values()``."""

    __slots__ = ("_entries",)

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


def per_model(store: Any, model: Any) -> BoundedCache:
    """The cache of `model` in `store` (a WeakKeyDictionary), created on first use."""
    cache = store.get(model)
    if cache is None:
        cache = store[model] = BoundedCache()
    return cache
