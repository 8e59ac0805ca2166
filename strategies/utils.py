"""Helpers shared by the strategies: client sampling per round, the wrapper base."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["ForwardsSampling", "Sampling", "StrategyWrapper", "flower_sampling"]


@dataclass(frozen=True)
class Sampling:
    """Client sampling per round, as every ``flwr.serverapp.strategy`` takes it.

    Attributes
    ----------
    fraction_train, fraction_evaluate : share of connected clients asked to
        train / evaluate each round (Flower samples ``max(int(n * f), min)``).
    min_train_clients, min_evaluate_clients : the least sampled per round.
    num_clients : how many clients exist; Flower waits for all of them.
    """

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    num_clients: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction_train={self.fraction_train}: must be in (0, 1]")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(f"fraction_evaluate={self.fraction_evaluate}: must be in [0, 1]")
        if self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients}: must be >= 1")
        if not 1 <= self.min_train_clients <= self.num_clients:
            raise ValueError(f"min_train_clients={self.min_train_clients}: must be in "
                             f"[1, {self.num_clients}] (the number of clients)")

    @property
    def train_sample_size(self) -> int:
        """How many clients Flower's sampler asks to train each round."""
        return max(int(self.num_clients * self.fraction_train), self.min_train_clients)


def flower_sampling(s: Sampling) -> dict[str, Any]:
    """The keyword arguments every Flower message strategy takes for sampling."""
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_clients,
        "min_evaluate_nodes": s.min_evaluate_clients if s.fraction_evaluate > 0 else 0,
        "min_available_nodes": s.num_clients,
    }


class ForwardsSampling:
    """Mixin for a strategy that wraps ``strategy``: ``min_available_nodes`` is read and
    written through to it, so that an outer wrapper (budget-aware selection) can lower
    it whatever sits in between."""

    strategy: Strategy

    @property
    def min_available_nodes(self) -> int:
        return int(self.strategy.min_available_nodes)  # type: ignore[attr-defined]

    @min_available_nodes.setter
    def min_available_nodes(self, value: int) -> None:
        self.strategy.min_available_nodes = value  # type: ignore[attr-defined]


class StrategyWrapper(ForwardsSampling, Strategy):
    """A wrapper in Flower's style: it holds ``strategy`` and forwards what it leaves alone.

    Sampling settings (``min_available_nodes``) are read and written through to
    the wrapped strategy, so that an outer wrapper (budget-aware selection)
    can lower them whatever sits in between.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
