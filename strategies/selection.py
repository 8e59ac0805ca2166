"""Seeded client selection: which clients train in a round follows from (seed, round, client).

Flower's samplers draw from Python's global ``random``, so which clients
trained in a round with ``fraction_train < 1`` could not be reproduced. This
wrapper chooses them itself, as the ``k`` clients with the smallest
``sha256(seed, round, name)``, where ``name`` is the site's name (learned from
the run's identification query) or, for a node not yet named, its node id;
``k`` is Flower's own sample size, ``max(int(n · fraction_train),
min_train_nodes)`` of the ``n`` eligible clients. The wrapped strategy then
samples all of the chosen clients. With ``fraction_train = 1`` every client is
chosen and nothing changes.

Like any seeded choice it is predictable by whoever knows the seed: it gives
no amplification by sampling, and none is claimed (``strategies.client_dp``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.budget import _EligibleGrid
from strategies.utils import StrategyWrapper

__all__ = ["SeededSelection", "selection_order"]


def selection_order(seed: int, server_round: int, names: Iterable[str]) -> list[str]:
    """``names`` ordered by ``sha256("seed/round/name")``: the first k are selected."""
    def key(name: str) -> bytes:
        return hashlib.sha256(f"{seed}/{server_round}/{name}".encode()).digest()
    return sorted(names, key=key)


class SeededSelection(StrategyWrapper):
    """Wrap a strategy so that its training sample is chosen from the seed.

    Parameters
    ----------
    strategy : what is wrapped (perhaps other wrappers around a Flower strategy).
    seed : the run seed.
    sampler : the Flower strategy whose sampling settings (``fraction_train``,
        ``min_train_nodes``, ``min_available_nodes``) apply; default ``strategy``.

    Attributes
    ----------
    names : node id -> site name, for the nodes identified so far.
    selected : server round -> the names (or node ids) chosen, in order.
    """

    def __init__(self, strategy: Strategy, *, seed: int, sampler: Strategy | None = None) -> None:
        super().__init__(strategy)
        self.seed = seed
        self.sampler = sampler if sampler is not None else strategy
        self.names: dict[int, str] = {}
        self.selected: dict[int, list[str]] = {}

    def _name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = list(grid.get_node_ids())
        fraction = getattr(self.sampler, "fraction_train", 1.0)
        least = getattr(self.sampler, "min_train_nodes", 1)
        k = max(int(len(nodes) * fraction), least)
        if k >= len(nodes):
            self.selected[server_round] = sorted(self._name(n) for n in nodes)
            return self.strategy.configure_train(server_round, arrays, config, grid)
        by_name = {self._name(n): n for n in nodes}
        chosen = selection_order(self.seed, server_round, by_name)[:k]
        self.selected[server_round] = sorted(chosen)
        view = _EligibleGrid(grid, set(nodes) - {by_name[c] for c in chosen})
        # Flower's sampler then takes every one of the k chosen nodes.
        saved = {a: getattr(self.sampler, a) for a in
                 ("fraction_train", "min_train_nodes", "min_available_nodes")
                 if hasattr(self.sampler, a)}
        for attr, value in (("fraction_train", 1.0), ("min_train_nodes", k),
                            ("min_available_nodes", k)):
            if attr in saved:
                setattr(self.sampler, attr, value)
        try:
            return list(self.strategy.configure_train(server_round, arrays, config, view))
        finally:
            for attr, value in saved.items():
                setattr(self.sampler, attr, value)
