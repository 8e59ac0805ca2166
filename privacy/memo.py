"""A bounded memo: results of a pure function, the least recently used evicted first.

Shared by :class:`privacy.EpsilonMemo` and the client worker cache
(``clients.cache``); an instance belongs to whoever creates it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Lru"]

V = TypeVar("V")


class Lru(Generic[V]):
    """At most ``maxsize`` results (``None``: no bound; 0: keeps none, every call computes).

    ``max_bytes`` (with ``size_of``, a result's size in bytes) bounds the results'
    total size as well: the least recently used go until it fits, and a result
    larger than the bound alone is returned but not kept. ``hits`` and ``misses``
    count the calls answered from the memo and computed.
    """

    def __init__(self, maxsize: int | None, *, max_bytes: int | None = None,
                 size_of: Callable[[V], int] | None = None) -> None:
        for name, value in (("maxsize", maxsize), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name}={value!r}: must be None or an integer >= 0")
        if max_bytes is not None and size_of is None:
            raise ValueError("max_bytes needs size_of, the size of a result in bytes")
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.nbytes = 0  # of the results kept (0 without size_of)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The remembered result for ``key``, or ``compute()`` (then remembered)."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key][0]
        self.misses += 1
        value = compute()
        size = self._size_of(value) if self._size_of is not None else 0
        if self.maxsize == 0 or (self.max_bytes is not None and size > self.max_bytes):
            return value
        self._items[key] = (value, size)
        self.nbytes += size
        while ((self.maxsize is not None and len(self._items) > self.maxsize)
               or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            _, (_, dropped) = self._items.popitem(last=False)
            self.nbytes -= dropped
        return value

    def clear(self) -> None:
        """Forget every result (and the counts)."""
        self._items.clear()
        self.nbytes = 0
        self.hits = self.misses = 0
