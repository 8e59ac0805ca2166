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

    ``hits`` and ``misses`` count the calls answered from the memo and computed.
    """

    def __init__(self, maxsize: int | None) -> None:
        if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int)
                                    or maxsize < 0):
            raise ValueError(f"maxsize={maxsize!r}: must be None or an integer >= 0")
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The remembered result for ``key``, or ``compute()`` (then remembered)."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = compute()
        if self.maxsize != 0:
            self._items[key] = value
            if self.maxsize is not None and len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every result (and the counts)."""
        self._items.clear()
        self.hits = self.misses = 0
