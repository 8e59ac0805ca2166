"""Helpers shared by the strategy builders: how many clients each round samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Sampling", "flower_sampling"]


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
